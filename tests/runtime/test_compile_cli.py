"""``grapefx compile``: the dumps and the one-screen summary (passes and dumps only: --no-compile,
built on the meta device; the compiled path is tests/compiler/test_pipeline.py's)."""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from runtime.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SMALL = ["model.n_layers=8", "model.d_model=32", "model.vocab_size=257", "data.tokenizer.kind=byte",
         "data.tokenizer.vocab_size=null", "data.seq_len=32", "attention.local.window=8",
         "attention.local.heads=4", "attention.local.kv_heads=2", "attention.local.head_dim=8",
         "attention.global.heads=4", "attention.global.kv_heads=2", "attention.global.head_dim=8",
         "moe.experts=4", "moe.top_k=2", "moe.expert_hidden=16", "train.micro_batch=2"]


def _compile(example, *flags):
    args = ["compile", str(EXAMPLES / example), "--no-compile", *flags]
    for s in SMALL:
        args += ["--set", s]
    return main(args)


def test_baseline_dumps(tmp_path, capsys):
    assert _compile("baseline.yaml", "--dump", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "local/moe      layers 1-3, 5-7" in out and "global/moe     layers 4, 8" in out
    assert "rotary_attention: 6 matches in layers 1-3, 5-7" in out and "bias_softmax: 2 matches in layers 4, 8" in out
    assert "concat_linear: nothing — off (not in compile.passes)" in out    # opt-in (spec.schema.DEFAULT_PASSES)
    assert "compile: off" in out and "parameters" in out
    names = {p.name for p in tmp_path.iterdir()}
    assert {"lowered.py", "lowered.txt", "fused.py", "fused.txt", "passes.json", "passes.md", "graph.html"} <= names

    passes = json.loads((tmp_path / "passes.json").read_text())
    assert passes["rotary_attention"]["matches"] == 6 and passes["rotary_attention"]["layers"] == [1, 2, 3, 5, 6, 7]
    assert passes["bias_softmax"]["layers"] == [4, 8] and passes["attention_formation"]["layers"] == list(range(1, 9))

    fused = (tmp_path / "fused.py").read_text()
    assert fused.count("def forward") == 2                                    # each distinct block graph once
    assert "layers 1-3, 5-7 (shown as layer 1; layers 2-3, 5-7 run the same graph" in fused
    assert "torch.ops.grapefx.attention(layer1_attn_q, layer1_attn_k, layer1_attn_v, layer1_attn_theta, None, 8," in fused
    for op in ("grapefx.grape_m_rotate(", "grapefx.alibi_bias(", "torch.softmax(", "masked_fill("):
        assert op not in fused
    lowered = (tmp_path / "lowered.py").read_text()
    for op in ("grapefx.grape_m_rotate(", "grapefx.alibi_bias(", "torch.softmax(", "masked_fill("):
        assert op in lowered
    assert "def forward(self, x, targets)" in lowered                       # the head graph too

    table = (tmp_path / "lowered.txt").read_text()
    row = next(line for line in table.splitlines() if line.startswith("layer1_attn_qk "))
    assert re.search(r"call_function\s+torch\.matmul\s+\(2, 2, 64, 32\)\s+float32", row)   # (B, Hkv, G*T, T)
    assert "layer1_attn_fused *" in (tmp_path / "fused.txt").read_text()      # '*': made by a pass

    md = (tmp_path / "passes.md").read_text()
    assert "| `bias_softmax` | 2 | 4, 8 |" in md
    assert "grapefx.attention(q, k, v, theta=None, slopes=layer4_attn_alibi_slopes, window=0" in md

    page = (tmp_path / "graph.html").read_text()
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) == 4                                                      # 2 fused graphs + 2 lowered
    for svg in svgs:
        ET.fromstring(svg)                                                     # well-formed, self-contained
    assert page.count('fill="#fed7aa"') == 2                                  # made by a pass: each graph's attention
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")        # nothing fetched from outside


def test_concat_linear_on_request_stacks_qkv_and_the_shared_gate_up(tmp_path, capsys):
    passes = "attention_formation,bias_softmax,rotary_attention,concat_linear"
    assert _compile("baseline.yaml", "--dump", str(tmp_path), "--passes", passes) == 0
    assert "concat_linear: 16 matches in layers 1-8" in capsys.readouterr().out   # q|k|v and shared gate|up, each layer
    # made by a pass, in each of the two graphs: the attention, the q|k|v GEMM, the shared experts' gate|up GEMM
    assert (tmp_path / "graph.html").read_text().count('fill="#fed7aa"') == 6


def test_nope_global_ablation_says_bias_softmax_matched_nothing(tmp_path, capsys):
    assert _compile("ablation-nope-global.yaml", "--dump", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "bias_softmax: nothing — layers 1-8: the attention has no dense bias" in out
    md = (tmp_path / "passes.md").read_text()
    assert "**Matched nothing**: layers 1-8: the attention has no dense bias" in md
    assert json.loads((tmp_path / "passes.json").read_text())["bias_softmax"]["matches"] == 0


def test_no_passes_writes_the_lowered_dumps(tmp_path, capsys):
    assert _compile("baseline.yaml", "--no-passes", "--dump", str(tmp_path)) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"lowered.py", "lowered.txt", "passes.json", "passes.md", "graph.html"} <= names
    assert "fused.py" not in names
    assert "passes: none" in capsys.readouterr().out
    assert "Passes run, in order: none" in (tmp_path / "passes.md").read_text()


def test_passes_option_and_prerequisite_off(tmp_path, capsys):
    assert _compile("baseline.yaml", "--passes", "rotary_attention", "--dump", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "rotary_attention: nothing — did nothing: it rewrites the grapefx.attention nodes that " \
           "attention_formation makes, and attention_formation is off" in out
    assert json.loads((tmp_path / "passes.json").read_text())["rotary_attention"]["skipped"]


def test_user_errors_exit_2(capsys):
    assert _compile("baseline.yaml", "--passes", "rotary") == 2
    assert "did you mean 'rotary_attention'" in capsys.readouterr().err
    assert _compile("baseline.yaml", "--inductor-code") == 2
    assert "--inductor-code: give --dump DIR" in capsys.readouterr().err


def test_inductor_code_compiles_a_spec_that_turns_the_compile_off(tmp_path, capsys, monkeypatch):
    """tiny.yaml has compile.enabled: false; --inductor-code asks for Inductor's code, so the model is
    built for compiling and warmed up with Inductor's trace on. The build runs eager here (a cold
    Inductor compile of CPU graphs costs minutes): what is pinned is the decision, not Inductor."""
    import torch

    import compiler

    asked, traced = [], []
    real_build, real_warm_up = compiler.build_model, compiler.warm_up

    def build_model(spec, device, *, compile=None, **kw):
        asked.append((spec.compile.enabled, compile, torch.device(device).type))
        model, report = real_build(spec, device, compile=False, **kw)
        report.compiled = compile
        return model, report

    def warm_up(*args):
        traced.append(torch._inductor.config.trace.enabled)
        return real_warm_up(*args)

    monkeypatch.setattr(compiler, "build_model", build_model)
    monkeypatch.setattr(compiler, "warm_up", warm_up)
    args = ["compile", str(EXAMPLES / "tiny.yaml"), "--dump", str(tmp_path), "--inductor-code"]
    for s in SMALL:
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert asked == [(False, True, "cpu")]
    assert traced == [True, False]                       # the first (compiling) call writes the code
    assert "compile: on for --inductor-code (the spec has compile.enabled: false)" in out
    assert (tmp_path / "inductor" / "INDEX.md").exists()


def test_inductor_code_with_no_compile_is_refused(tmp_path, capsys):
    assert _compile("tiny.yaml", "--dump", str(tmp_path), "--inductor-code") == 2
    assert ("--inductor-code asks for the code Inductor generates when it compiles, and --no-compile turns the "
            "compile off: drop one of them") in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_passes_only_dump_of_the_full_baseline_builds_no_weights(tmp_path):
    """The baseline at full size (1.36B parameters: 5.4 GB of fp32 weights) dumps from the meta
    device: the process's peak memory stays far under its weights (about 400 MB measured). A child
    process, so the peak is this command's alone."""
    code = ("import resource, sys, time\n"
            "from runtime.cli import main\n"
            "start = time.perf_counter()\n"
            f"rc = main(['compile', {str(EXAMPLES / 'baseline.yaml')!r}, '--no-compile', '--dump', {str(tmp_path)!r}])\n"
            "print('seconds', time.perf_counter() - start)\n"
            "print('peak_mib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
            "sys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "lowered on the meta device (shapes only, no weights" in out
    assert "24 matches in layers 1-24" in out                               # attention_formation, every layer
    figures = dict(line.split() for line in out.splitlines() if line.startswith(("seconds", "peak_mib")))
    assert float(figures["peak_mib"]) < 1500, out                           # the weights alone are 5.8 GB
    assert float(figures["seconds"]) < 60, out      # 31 s measured with imports on 2 cores shared with 8 jobs
    assert "layer1_attn_fused *" in (tmp_path / "fused.txt").read_text()
