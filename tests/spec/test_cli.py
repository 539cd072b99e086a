"""``grapefx validate | describe | from-megatron | to-megatron`` in-process: output, exit codes, first stderr line."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from runtime.cli import main
from spec import load_spec, spec_from_dict
from spec.megatron import from_megatron

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BASELINE = str(EXAMPLES / "baseline.yaml")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# every example spec; ablation matrices (a top-level `variants:`, for grapefx ablate) are tested in tests/runtime
SPECS = sorted(p.name for p in EXAMPLES.glob("*.yaml") if "variants" not in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("name", SPECS)
def test_validate_every_example(capsys, name):
    code, out, err = run(capsys, "validate", str(EXAMPLES / name))
    assert code == 0 and err == ""
    assert out.startswith(f"ok: {EXAMPLES / name} (") and " layers: " in out


def test_validate_baseline_summary(capsys):
    _, out, _ = run(capsys, "validate", BASELINE)
    assert out.strip() == (f"ok: {BASELINE} (24 layers: 18 local (W=128), 6 global; MoE 64 experts top-6 + 1 shared; "
                           "1.36B params, 263.77M active; training state 20.24 GiB)")
    # 1,358,480,416 parameters x 16 B (fp32 weight, gradient, AdamW m and v) = 21,735,686,656 B = 20.24 GiB


def test_validate_several_files_one_line_each_exit_2_if_any_fails(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {n_layers: 4, global_every: 8}\n")
    tiny = str(EXAMPLES / "tiny.yaml")
    code, out, err = run(capsys, "validate", tiny, str(bad), str(tmp_path / "missing.yaml"), tiny)
    assert code == 2
    assert out.splitlines() == [f"ok: {tiny} (4 layers: 3 local (W=32), 1 global; MoE 8 experts top-2 + 1 shared; "
                                "2.05M params, 873.62K active; training state 31.33 MiB)"] * 2
    assert err.splitlines() == [
        f"{bad}: model.global_every: global_every 8 places no global layer in a 4-layer model (layer l is global iff l % 8 == 0, "
        "and no l in 1..4 is): use global_every <= 4, or null for no global layers",
        f"{tmp_path / 'missing.yaml'}: no such spec file; check the path",
        "2 of 4 files failed",
    ]
    code, out, err = run(capsys, "validate", tiny, tiny)
    assert code == 0 and err == "" and len(out.splitlines()) == 2


def test_validate_error_exit_code_and_first_line(capsys, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("attention:\n  global:\n    window: 64\n")
    code, out, err = run(capsys, "validate", str(p))
    assert code == 2 and out == ""
    assert err.splitlines()[0].startswith(f"{p}: attention.global.window: global layers attend to the whole causal "
                                          "context")


def test_validate_syntax_error_first_line(capsys, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [1, 2\n")
    code, _, err = run(capsys, "validate", str(p))
    assert code == 2 and err.splitlines()[0].startswith(f"{p}: line 2, column 1: YAML syntax error")


def test_set_on_validate(capsys):
    code, _, err = run(capsys, "validate", BASELINE, "--set", "attention.local.window=8192")
    assert code == 2
    # the rule ties data.seq_len (baseline.yaml) to the window, which the --set wrote last: the --set is blamed
    assert err.splitlines()[0].startswith(f"{BASELINE} (--set): attention.local.window: a 8192-key window never binds "
                                          "in a 4096-token context")


def test_set_unknown_key(capsys):
    code, _, err = run(capsys, "validate", BASELINE, "--set", "train.stpes=5")
    assert code == 2 and err.splitlines()[0].startswith(f"{BASELINE} (--set): train.stpes: unknown key `stpes` in "
                                                        "train - did you mean `steps`?")


def test_describe_text(capsys):
    code, out, _ = run(capsys, "describe", str(EXAMPLES / "bench-small.yaml"))
    assert code == 0
    assert "training FLOPs per token: 813,662,208" in out
    assert "convention: 6 x active matmul params" in out
    assert "KV cache at context 2048 (bf16)" in out and "resolved spec:" in out


def test_describe_text_shows_tpa_beside_gqa(capsys):
    code, out, _ = run(capsys, "describe", str(EXAMPLES / "baseline-tpa.yaml"))
    lines = [line.split() for line in out.splitlines()]
    assert code == 0
    assert ["local", "tpa", "heads,", "R_Q", "6,", "R_K", "2,", "R_V", "2,", "Hq", "16,", "D", "64", "1,867,776",
            "640"] in lines
    assert ["(gqa", "Hq", "16,", "Hkv", "4,", "D", "64", "instead)", "2,621,440", "1,024"] in lines


def test_describe_json(capsys):
    code, out, _ = run(capsys, "describe", str(EXAMPLES / "bench-small.yaml"), "--json", "--context", "4096",
                       "--set", "train.steps=50")
    d = json.loads(out)
    assert code == 0 and list(d) == ["name", "summary", "layers", "params", "training_state_bytes", "flops_per_token",
                                     "flops", "kv_cache_bytes_per_token", "kv_cache", "router", "attention",
                                     "expert_parallel", "spec"]
    # 9 local layers * 128 tokens + 3 global * 4096, each 2*4*64*2 = 1024 B per cached token
    assert len(d["layers"]) == 12 and d["layers"][3] == {
        "index": 4, "kind": "global", "mechanism": "gqa", "window": None, "position": "grape-a", "rotary": False,
        "additive_bias": True, "ffn": "moe", "kv_tokens": 4096, "kv_bytes": 4096 * 1024}
    assert d["layers"][0]["kv_tokens"] == 128 and d["layers"][0]["kv_bytes"] == 128 * 1024
    assert d["flops_per_token"] == 813_662_208
    assert d["kv_cache"] == {"context": 4096, "total_bytes": (9 * 128 + 3 * 4096) * 1024, "dtype": "bf16"}
    assert d["kv_cache_bytes_per_token"] == (9 * 128 + 3 * 4096) * 1024 / 4096
    assert d["router"]["expert_bias"] is True and d["router"]["score_function"] == "sigmoid"
    assert d["expert_parallel"] == {"expert": 1, "bytes_per_token_per_moe_layer": {"forward": 0, "training": 0}}
    assert d["spec"]["train"]["steps"] == 50 and d["spec"]["name"] == d["name"]


def test_describe_json_carries_every_figure_of_the_text(capsys):
    """Each number the text shows (with thousands separators) is in the JSON document."""
    _, text, _ = run(capsys, "describe", str(EXAMPLES / "baseline-tpa.yaml"))
    _, out, _ = run(capsys, "describe", str(EXAMPLES / "baseline-tpa.yaml"), "--json")
    d = json.loads(out)
    numbers = set()

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool) and x == int(x):
            numbers.add(int(x))
    walk(d)
    shown = {int(n.replace(",", "")) for n in re.findall(r"\b\d{1,3}(?:,\d{3})+\b", text)}
    assert shown and shown <= numbers, shown - numbers
    assert d["summary"] in text and d["params"]["groups"]["routed_experts"] == 24 * 64 * 3 * 1024 * 256


def test_describe_bytes_moved_per_token_by_expert_parallelism(capsys):
    code, out, _ = run(capsys, "describe", str(EXAMPLES / "bench-small.yaml"), "--set", "parallel.expert=4")
    # bench-small: K = 2 rows of C = 768 bf16 values (2 B), 3 in 4 land on another rank, there and back:
    # 2 * 2 * 768 * 2 * 3/4 = 4,608 B in the forward, twice that with the backward
    assert code == 0 and "expert parallelism E = 4: 4,608 B per token per MoE layer to other ranks in the forward, " \
                         "9,216 B with the backward" in out


def test_describe_bad_context(capsys):
    code, _, err = run(capsys, "describe", BASELINE, "--context", "0")
    assert code == 2 and err.startswith("--context: 0 tokens")


def test_from_megatron_prints_yaml_and_warnings(capsys):
    words = shlex.split((EXAMPLES / "baseline.megatron.txt").read_text(), comments=True)
    code, out, err = run(capsys, "from-megatron", "--", *words, "--tensor-model-parallel-size", "2")
    assert code == 0
    assert "warning: ignored (execution only: no effect on what the model computes): --no-rope-fusion, " \
           "--tensor-model-parallel-size 2" in err
    assert out.startswith("# Generated by `grapefx from-megatron`.")
    s = spec_from_dict(yaml.safe_load(out))
    assert s.model == load_spec(BASELINE).model


def test_from_megatron_file_and_out(capsys, tmp_path):
    out_file = tmp_path / "seed.yaml"
    code, _, err = run(capsys, "from-megatron", "--file", str(EXAMPLES / "baseline.megatron.txt"),
                       "--out", str(out_file))
    assert code == 0 and f"wrote {out_file}" in err
    s = load_spec(out_file)
    assert s.name == "seed" and s.attention == load_spec(BASELINE).attention


def test_from_megatron_polarity_trap_exit_code(capsys):
    code, out, err = run(capsys, "from-megatron", "--", "--num-layers", "8", "--hidden-size", "64",
                         "--num-attention-heads", "4", "--position-embedding-type", "grapem", "--window-size", "15,0",
                         "--window-attn-skip-freq", "[1,1,1,0]*2", "--no-rope-freq", "[1,1,1,0]*2")
    assert code == 2 and out == ""
    assert err.splitlines()[0].startswith("<megatron flags>: --no-rope-freq: the layers that skip the rotation")


def test_from_megatron_strict(capsys):
    code, _, err = run(capsys, "from-megatron", "--strict", "--file", str(EXAMPLES / "baseline.megatron.txt"),
                       "--", "--eod-mask-loss")
    assert code == 2 and err.startswith("<megatron flags>: --eod-mask-loss: not modelled")


def test_from_megatron_without_flags(capsys):
    code, _, err = run(capsys, "from-megatron")
    assert code == 2 and err.startswith("<megatron flags>: no flags")


def test_to_megatron(capsys):
    code, out, err = run(capsys, "to-megatron", BASELINE)
    assert code == 0
    assert "--window-size 127,0 \\\n" in out and "--window-attn-skip-freq 4 \\\n" in out
    assert "--no-rope-freq 4 \\\n" in out and "--grape-a \\\n" in out
    assert "# note: Megatron applies weight decay to the embedding" in err
    words = shlex.split(out.replace("\\\n", " "))
    assert spec_from_dict(from_megatron(words)[0]).attention == load_spec(BASELINE).attention


def test_to_megatron_error_names_the_spec(capsys):
    code, _, err = run(capsys, "to-megatron", BASELINE, "--set", "moe.router.bias_centering=true")
    assert code == 2 and err.startswith(f"{BASELINE}: moe.router.bias_centering: zero-mean expert-bias updates")


@pytest.mark.parametrize("item, line", [
    ("attention.local.position.kind=[grape-m]",
     "attention.local.position.kind: position kind must be one of grape-m, grape-a, nope, rope; got a list ['grape-m']"),
    ("attention.global.position.kind={a: 1}",
     "attention.global.position.kind: position kind must be one of grape-m, grape-a, nope, rope; got a mapping"),
    ("model.n_layers=1099511627776",
     "model.n_layers: 1,099,511,627,776 is too large: n_layers must be <= 4,096 (grapefx bounds every size so that "
     "checking and counting a spec stay instant; real models stay far below it)"),
])
def test_inputs_that_used_to_crash_or_hang_exit_2_with_one_line(capsys, item, line):
    tiny = str(EXAMPLES / "tiny.yaml")
    code, out, err = run(capsys, "validate", tiny, "--set", item)
    assert code == 2 and out == "" and err == f"{tiny} (--set): {line}\n"
