"""`grapefx ablate`: the matrix format, the fairness refusal, resume, the spread rule and the report."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from runtime.ablate.matrix import check_variants, load_matrix, run_spec
from runtime.ablate.report import throughput, write_report
from runtime.ablate.runner import Run, plan
from runtime.cli import main
from runtime.metrics import read_metrics
from spec import dump_spec
from spec.errors import GrapefxError, SpecError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PNG = b"\x89PNG\r\n\x1a\n"
NOPE = {"attention": {"global": {"position": {"kind": "nope"}}}}
TRAIN = {"steps": 2, "eval_every": 1, "checkpoint_every": 1, "keep_checkpoints": 3}


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def base(tmp_path, tiny_dict) -> Path:
    """The conftest tiny spec (2 layers, C=16, eager) as tmp/base.yaml."""
    return write(tmp_path / "base.yaml", tiny_dict(**TRAIN))


def matrix(tmp_path: Path, **fields) -> Path:
    data = {"baseline": "base.yaml", "variants": {"baseline": {}, "nope-global": NOPE}, "seeds": [1, 2]}
    data.update(fields)
    return write(tmp_path / "matrix.yaml", {k: v for k, v in data.items() if v is not None})


# ---------------------------------------------------------------------- the matrix format
@pytest.mark.parametrize("fields, message", [
    ({"baseline": None}, r"matrix.yaml: baseline: missing; a matrix needs baseline"),
    ({"baseline": "nowhere.yaml"}, r"matrix.yaml: baseline: file '.*nowhere.yaml' does not exist; the path is relative"),
    ({"seed": [1]}, r"matrix.yaml: seed: unknown key \(did you mean seeds\?\)"),
    ({"seeds": [1, 1]}, r"matrix.yaml: seeds: \[1, 1\]: a seed is listed twice"),
    ({"seeds": "1"}, r"matrix.yaml: seeds: expected a non-empty list of integers >= 0"),
    ({"variants": {}}, r"matrix.yaml: variants: expected a mapping of variant names to overlays"),
    ({"variants": {"a/b": {}}}, r"matrix.yaml: variants.a/b: a variant name becomes a folder name"),
    ({"variants": {"x": {"extends": "other.yaml"}}}, r"matrix.yaml: variants.x.extends: an inline overlay always "
                                                     r"applies to the baseline; .* give its path: x: FILE.yaml"),
    ({"variants": {"x": {"train": {"seed": 3}}}}, r"matrix.yaml: variants.x.train.seed: the seed of each run comes "
                                                  r"from the matrix's seeds"),
    ({"variants": {"x": "missing.yaml"}}, r"matrix.yaml: variants.x: file '.*missing.yaml' does not exist"),
    ({"shared": [1]}, r"matrix.yaml: shared: expected a spec overlay"),
    ({"eval": {"contexts": [0, 2]}}, r"matrix.yaml: eval.contexts: expected a non-empty list of positive integers"),
    ({"eval": {"batch": 2}}, r"matrix.yaml: eval.batch: unknown key \(did you mean batches\?\)"),
])
def test_matrix_errors_name_file_key_and_fix(tmp_path, base, fields, message):
    with pytest.raises(SpecError, match=message):
        load_matrix(matrix(tmp_path, **fields))


def test_matrix_error_on_the_command_line_exits_2(tmp_path, base, capsys):
    assert main(["ablate", str(matrix(tmp_path, seeds=[])), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (f"{tmp_path / 'matrix.yaml'}: seeds: expected a non-empty list of "
                                               "integers >= 0, e.g. [1, 2, 3], got []")


def test_the_example_matrices_load_and_differ_only_in_the_global_position():
    for name in ("ablation.yaml", "ablation-tiny.yaml"):
        diffs = check_variants(load_matrix(EXAMPLES / name))
        assert diffs["baseline"] == []
        assert [c.key for c in diffs["nope-global"]] == ["attention.global.position.kind",
                                                         "attention.global.position.learnable"]


def test_runs_of_one_seed_share_everything_but_the_overlay(tmp_path, base):
    m = load_matrix(matrix(tmp_path, shared={"train": {"steps": 5}}))
    a, b = (run_spec(m, v, 2, ["train.micro_batch=1"]) for v in m.variants)
    assert (a.train, a.data, a.moe, a.model) == (b.train, b.data, b.moe, b.model)
    assert (a.train.seed, a.train.steps, a.train.micro_batch) == (2, 5, 1)
    assert (a.name, b.name) == ("baseline-seed2", "nope-global-seed2")


def test_variants_of_one_seed_start_from_the_same_values_of_shared_parameters(tmp_path, base):
    from compiler.lower import lower

    m = load_matrix(matrix(tmp_path))
    a, b, a2 = (lower(run_spec(m, m.variant(v), k)).state_dict() for v, k in
                (("baseline", 1), ("nope-global", 1), ("baseline", 2)))
    shared = sorted(set(a) & set(b))
    assert "grape_m.log_freq" in shared and "layers.1.attn.wq" in shared
    assert all(torch.equal(a[k], b[k]) for k in shared)
    assert not torch.equal(a["layers.1.attn.wq"], a2["layers.1.attn.wq"])      # another seed, other values


# ---------------------------------------------------------------------- the fairness refusal
def test_refuses_a_variant_that_extends_another_file_and_lists_the_keys(tmp_path, base, tiny_dict, capsys):
    other = tiny_dict(**TRAIN)
    other["model"]["d_model"] = 32
    other["train"]["optimizer"] = {"lr": 0.01}
    write(tmp_path / "other.yaml", other)
    write(tmp_path / "nope.yaml", {"extends": "other.yaml", **NOPE})
    path = matrix(tmp_path, variants={"baseline": {}, "nope-global": "nope.yaml"})
    with pytest.raises(SpecError) as e:
        check_variants(load_matrix(path))
    assert str(e.value) == (
        f"{path}: variants.nope-global: variant nope-global ({tmp_path / 'nope.yaml'}) differs from the baseline "
        "base.yaml in 2 key(s) it does not declare: model.d_model (16 -> 32), train.optimizer.lr (0.0003 -> 0.01); "
        "a variant may differ only where its overlay says so (did it extend another file, or set something the "
        "others do not?)")
    # the command refuses before training anything, and `grapefx validate` says the same
    assert main(["ablate", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "model.d_model (16 -> 32), train.optimizer.lr (0.0003 -> 0.01)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["validate", str(path)]) == 2
    assert "model.d_model (16 -> 32), train.optimizer.lr (0.0003 -> 0.01)" in capsys.readouterr().err


def test_validate_checks_the_example_matrices(capsys):
    for name in ("ablation.yaml", "ablation-tiny.yaml"):
        assert main(["validate", str(EXAMPLES / name)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"ok: {EXAMPLES / name} (ablation matrix: 2 variants x ") and \
            "nope-global: attention.global.position.kind" in out


def test_a_file_variant_that_extends_the_baseline_declares_its_own_keys(tmp_path, base):
    write(tmp_path / "nope.yaml", {"extends": "base.yaml", "name": "anything", **NOPE})
    diffs = check_variants(load_matrix(matrix(tmp_path, variants={"baseline": {}, "nope-global": "nope.yaml"})))
    assert [str(c) for c in diffs["nope-global"]] == ["attention.global.position.kind (grape-a -> nope)",
                                                      "attention.global.position.learnable (false -> (absent))"]


def test_refuses_overlays_that_shared_or_set_would_undo(tmp_path, base):
    path = matrix(tmp_path, variants={"baseline": {}, "short": {"train": {"steps": 1}}}, shared={"train": {"steps": 3}})
    with pytest.raises(SpecError, match=r"variants.short: declares train.steps, which shared also sets \(train.steps\)"):
        check_variants(load_matrix(path))
    path = matrix(tmp_path)
    with pytest.raises(SpecError, match=r"variants.nope-global: declares attention.global.position.kind, which --set "
                                        r"also sets \(attention.global.position\)"):
        check_variants(load_matrix(path), ["attention.global.position=grape-a"])


def test_refuses_an_overlay_that_changes_nothing(tmp_path, base):
    path = matrix(tmp_path, variants={"baseline": {}, "same": {"model": {"d_model": 16}}})
    with pytest.raises(SpecError, match=r"variants.same: variant same declares model.d_model but resolves to the "
                                        r"baseline's spec"):
        check_variants(load_matrix(path))


def test_refuses_a_run_folder_trained_with_another_spec(tmp_path, base):
    m = load_matrix(matrix(tmp_path))
    folder = tmp_path / "out" / "runs" / "baseline-seed1"
    folder.mkdir(parents=True)
    earlier = dump_spec(run_spec(m, m.variant("baseline"), 1, ["train.steps=9"]))
    (folder / "spec.resolved.yaml").write_text(earlier)
    with pytest.raises(GrapefxError, match=r"baseline-seed1: this run was started with a different spec "
                                           r"\(train.steps \(9 -> 2\)\); .* re-run with the original arguments"):
        plan(m, tmp_path / "out")


# ---------------------------------------------------------------------- throughput
def test_throughput_skips_the_first_window():
    lines = [{"kind": "train", "tokens": 100, "tokens_per_s": 10.0},    # 100 tokens in 10 s (warm-up)
             {"kind": "eval", "val_loss": 1.0},
             {"kind": "train", "tokens": 300, "tokens_per_s": 20.0},    # 200 tokens in 10 s
             {"kind": "train", "tokens": 500, "tokens_per_s": 40.0}]    # 200 tokens in 5 s
    assert throughput(lines) == pytest.approx(400 / 15)
    assert throughput(lines[:1]) == pytest.approx(10.0)


# ---------------------------------------------------------------------- the report, from hand-made runs
def _record(rows_ref: list[list[float]], shift: list[float], T: int = 16, seed: int = 1) -> dict:
    """An eval.json record of 4 rows: bands [0,16) [16,32) [32,64) and contexts 1x, 4x, per row; ``shift`` per band."""
    bands = [[r[j] + shift[j] for j in range(3)] for r in rows_ref]
    ctx = [[b[0], (b[0] * 16 + b[1] * 16 + b[2] * 32) / 64] for b in bands]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"settings": {"contexts": [1, 4], "batches": 1, "batch_size": 4, "seed": 0, "buckets": 4,
                         "spacing": "linear", "seq_len": T, "length": 4 * T},
            "data": {"label": "the validation split of corpus.jsonl", "rows_used": 4, "rows_sha256": "ab" * 32},
            "device": "cpu", "dtype": "float32",
            "bands": [{"positions": p, "tokens": 4 * (p[1] - p[0]), "loss": mean([b[j] for b in bands])}
                      for j, p in enumerate([[0, 16], [16, 32], [32, 64]])],
            "contexts": [{"context": c, "positions": [0, c * T], "tokens": 4 * c * T, "loss": mean([x[i] for x in ctx])}
                         for i, c in enumerate([1, 4])],
            "buckets": [{"positions": [16 * k, 16 * k + 16], "tokens": 64, "loss": 2.0 + k * 0.1 + shift[min(k, 2)]}
                        for k in range(4)],
            "per_row": {"bands": bands, "contexts": ctx},
            "training_context": {"max_vio": 0.1 * seed, "max_vio_worst": 0.2 * seed},
            "grape_m": [{"name": "grape_m.log_freq", "ln_theta": [0.0, -1.0 + 0.01 * seed], "ln_theta_init": [0.0, -1.0],
                         "learnable": True}],
            "host": {"load_1min": 5.0, "cpu_count": 2}}


def test_report_pairs_rows_and_seeds_and_says_what_is_resolved(tmp_path, base):
    m = load_matrix(matrix(tmp_path, seeds=[1, 2, 3], eval={"contexts": [1, 4], "batches": 1}))
    diffs = check_variants(m)
    rows = [[2.0, 2.1, 2.3], [2.2, 2.3, 2.5], [2.4, 2.5, 2.7], [2.6, 2.7, 2.9]]
    # nope-global - baseline per seed (the same on every row): band [0,16) +0.01 -0.02 +0.02, band [32,64) +0.30 +0.32 +0.34
    shifts = {1: [0.01, 0.0, 0.30], 2: [-0.02, 0.0, 0.32], 3: [0.02, 0.0, 0.34]}
    tps = {("baseline", 1): 1000, ("baseline", 2): 1100, ("baseline", 3): 1050,
           ("nope-global", 1): 1200, ("nope-global", 2): 1250, ("nope-global", 3): 1300}
    runs, evals = [], {}
    for seed in (1, 2, 3):
        for variant in ("baseline", "nope-global"):
            run = Run(variant, seed, run_spec(m, m.variant(variant), seed),
                      tmp_path / "out" / "runs" / f"{variant}-seed{seed}")
            run.folder.mkdir(parents=True)
            lines = [{"kind": "train", "step": 1, "tokens": 64, "tokens_per_s": tps[variant, seed]},
                     {"kind": "eval", "step": 2, "val_loss": 2.5}]
            (run.folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            (run.folder / "env.json").write_text(json.dumps({"device": "cpu", "torch": "2.x", "cpu_threads": 2}))
            evals[run.name] = _record(rows, shifts[seed] if variant == "nope-global" else [0.0] * 3, seed=seed)
            runs.append(run)
    paths = write_report(tmp_path / "out", m, runs, diffs, evals, ["grapefx", "ablate", "matrix.yaml", "--out", "out"])
    assert [p.name for p in paths] == ["report.md", "report.json", "loss_by_position.png", "loss.png",
                                       "grape_m_spectrum.png"]
    assert all(p.read_bytes().startswith(PNG) for p in paths[2:])
    md = paths[0].read_text()
    assert md.startswith("# Ablation `matrix`: baseline vs nope-global\n\n2 variants (**baseline**, **nope-global**) "
                         "of `base.yaml`, 3 seeds each (seeds 1, 2, 3): 2 optimizer steps of 4 × 16 tokens per run, on "
                         "cpu. Every run is scored at every position of the same 4 validation rows of 64 tokens.")
    # band [32, 64): mean 0.32, s = 0.02, t(0.975, 2) = 4.303: 0.32 ± 4.303 · 0.02 / √3 = 0.32 ± 0.0497
    assert ("On the loss at 2–4× the training length (positions 32–63), nope-global's loss is higher than "
            "baseline's by 0.320 nats/token on average — resolved: the 95% interval over seeds, +0.270 to +0.370, "
            "excludes 0.") in md
    # band [0, 16): mean 0.00333, s = 0.02082: ± 0.0517
    assert ("On the loss within the training length (positions 0–15), nope-global's loss is higher than baseline's "
            "by 0.003 nats/token on average — not resolved: the 95% interval over seeds, −0.048 to +0.055, includes "
            "0, so these seeds do not tell the variants apart.") in md
    # throughput differences 200, 150, 250: 200 ± 4.303 · 50 / √3 = 200 ± 124.2
    assert ("Training throughput (indicative only: measured on a CPU shared with other work): nope-global is faster "
            "by 200 tokens/s (interval over seeds excludes 0).") in md
    assert ("| band [32, 64) | +0.3000 [+0.3000, +0.3000] | +0.3200 [+0.3200, +0.3200] | +0.3400 [+0.3400, +0.3400] | "
            "+0.3200 [+0.2703, +0.3697] | **resolved**: nope-global is higher than baseline |") in md
    assert "| band [0, 16) | +0.0100 [+0.0100, +0.0100] |" in md and "**not resolved**: the seed-level" in md
    assert "| baseline | 3 | 2.300 [2.300 to 2.300] | 2.400 [2.400 to 2.400] | 2.600 [2.600 to 2.600] |" in md
    assert ("- Throughput of nope-global against baseline, indicative only (a CPU, where other work changes the rate "
            "from run to run): nope-global − baseline = +200 [+76, +324] tokens/s over seeds: nope-global is faster.") in md
    assert "shared with other work: yes (1-minute load average 5.0–5.0" in md
    assert "Final val loss: the trainer's last evaluation at step 2" in md
    assert "    grapefx ablate matrix.yaml --out out\n" in md
    assert "  - `attention.global.position.kind`: grape-a → nope\n" in md
    report = json.loads(paths[1].read_text())
    far = report["paired"]["nope-global"]["band_32_64"]
    assert far["resolved"] and far["seeds"]["low"] == pytest.approx(0.32 - 4.303 * 0.02 / 3 ** 0.5)
    assert not report["paired"]["nope-global"]["band_0_16"]["resolved"]
    assert report["paired"]["nope-global"]["tokens_per_s"]["indicative"] is True
    assert report["results"]["nope-global"]["summary"]["band_32_64"]["mean"] == pytest.approx(2.92)


def test_report_with_two_seeds_judges_nothing_and_refuses_different_rows(tmp_path, base):
    m = load_matrix(matrix(tmp_path, eval={"contexts": [1, 4], "batches": 1}))
    rows = [[2.0, 2.1, 2.3]] * 4
    runs, evals = [], {}
    for seed in (1, 2):
        for variant in ("baseline", "nope-global"):
            run = Run(variant, seed, run_spec(m, m.variant(variant), seed),
                      tmp_path / "out" / "runs" / f"{variant}-seed{seed}")
            run.folder.mkdir(parents=True)
            (run.folder / "metrics.jsonl").write_text("")
            evals[run.name] = _record(rows, [0.1, 0.1, 0.1] if variant == "nope-global" else [0.0] * 3)
            runs.append(run)
    md = write_report(tmp_path / "out", m, runs, check_variants(m), evals, ["grapefx", "ablate"])[0].read_text()
    assert ("nope-global − baseline is +0.100, +0.100 nats/token per seed; with 2 seed(s) there is no seed-level "
            "interval (it needs 3), so the difference is not judged.") in md
    assert "not judged: 2 paired seed(s), a seed-level interval needs 3" in md
    evals["nope-global-seed2"]["data"] = {**evals["nope-global-seed2"]["data"], "rows_sha256": "cd" * 32}
    with pytest.raises(GrapefxError, match=r"the runs were evaluated on different rows \(.*\), so they cannot be "
                                           r"paired"):
        write_report(tmp_path / "out", m, runs, check_variants(m), evals, ["grapefx", "ablate"])


# ---------------------------------------------------------------------- end to end: the CPU example, shortened
def test_ablation_tiny_example_runs_resumes_and_reports(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    args = ["ablate", str(EXAMPLES / "ablation-tiny.yaml"), "--out", str(out),
            "--set", f"data.sources=[{{path: '{corpus / 'corpus.jsonl'}'}}]", "--set", f"data.cache_dir={corpus / 'cache'}",
            "--set", "data.valid_fraction=0.2", "--set", "data.seq_len=32", "--set", "model.d_model=32",
            "--set", "train.steps=2", "--set", "train.micro_batch=1", "--set", "train.global_batch=1",
            "--set", "train.checkpoint_every=1", "--set", "train.eval_batches=1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "ablate ablation-tiny: 2 variants x 3 seeds = 6 runs" in first
    assert "  nope-global: attention.global.position.kind (grape-a -> nope)" in first
    for name in ("report.md", "report.json", "loss_by_position.png", "loss.png", "grape_m_spectrum.png"):
        assert (out / name).read_bytes()[:8] == PNG or name.startswith("report")
    md = (out / "report.md").read_text()
    assert "| baseline | 3 |" in md and "| nope-global | 3 |" in md and "| nope-global-seed3 |" in md
    assert "## Paired differences: nope-global − baseline" in md and "| band [64, 128) |" in md
    report = json.loads((out / "report.json").read_text())
    assert report["eval"] == {"contexts": [1, 2, 4], "batches": 8, "batch_size": 1, "seed": 0, "buckets": 48,
                              "spacing": "log", "seq_len": 32, "length": 128}
    assert report["paired"]["nope-global"]["loss_4x"]["seeds"]["n"] == 3
    theta = json.loads((out / "runs" / "baseline-seed1" / "eval.json").read_text())["grape_m"][0]
    assert theta["name"] == "grape_m.log_freq" and len(theta["ln_theta"]) == 16     # head_dim 32 -> 16 pairs

    # a crash after step 1 of the last run: its final checkpoint and evaluation are gone
    last = out / "runs" / "nope-global-seed3"
    finished = out / "runs" / "baseline-seed1" / "checkpoints" / "step-000002" / "complete.json"
    stamp = finished.stat().st_mtime_ns
    shutil.rmtree(last / "checkpoints" / "step-000002")
    (last / "eval.json").unlink()
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("not training again") == 5 and again.count("not evaluating again") == 5
    assert "[6/6] nope-global-seed3: resuming at step 1 of 2" in again and "resumed from" in again
    assert finished.stat().st_mtime_ns == stamp
    assert [r["step"] for r in read_metrics(last) if r["kind"] == "train"] == [2]    # log_every 10: the last step
    assert (last / "eval.json").is_file()

    # --report-only: the report again from the run folders alone, showing the command that trained them
    (out / "report.md").unlink()
    assert main(args + ["--report-only"]) == 0
    md = (out / "report.md").read_text()
    assert "## Paired differences: nope-global − baseline" in md and " --report-only" not in md
    (last / "eval.json").unlink()
    assert main(args + ["--report-only"]) == 2
    assert "nope-global-seed3/eval.json: missing, or written for other evaluation settings" in capsys.readouterr().err
