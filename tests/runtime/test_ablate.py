"""`grapefx ablate`: the matrix format, the fairness refusal, resume, the spread rule and the report."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from runtime.ablate.matrix import check_variants, load_matrix, run_spec
from runtime.ablate.report import (
    Metric,
    Summary,
    beyond_spread,
    compare,
    throughput,
    write_report,
)
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


# ---------------------------------------------------------------------- the spread rule
LOSS = Metric("loss", "loss", "loss", "nats/token", True, 3)
TPS = Metric("tps", "tokens/s", "throughput", "tokens/s", False, 0)


def test_the_spread_rule_is_non_overlapping_min_max_ranges():
    a, b = Summary.of([2.50, 2.52, 2.54]), Summary.of([2.56, 2.58, 2.60])
    assert (a.mean, a.min, a.max) == (pytest.approx(2.52), 2.50, 2.54)
    assert beyond_spread(a, b, lower_is_better=True) is True            # 2.54 < 2.56
    assert beyond_spread(Summary.of([2.50, 2.57]), b, True) is False    # 2.57 inside [2.56, 2.60]
    assert beyond_spread(Summary.of([3.0]), b, True) is None            # one seed: no spread
    assert beyond_spread(Summary.of([120.0, 130.0]), Summary.of([100.0, 119.0]), lower_is_better=False) is True


def test_compare_picks_the_best_mean_and_counts_paired_wins():
    # means 2.53 vs 2.55: A wins on the mean; ranges [2.50, 2.56] and [2.52, 2.58] overlap; paired: seed 1 and 3
    v = compare(LOSS, {"B": {1: 2.52, 2: 2.55, 3: 2.58}, "A": {1: 2.50, 2: 2.56, 3: 2.53}})
    assert (v.winner, v.runner_up, v.beyond_spread, v.paired_wins, v.paired, v.tie) == ("A", "B", False, 2, 3, False)
    assert (v.winner_mean, v.runner_up_mean) == (pytest.approx(2.53), pytest.approx(2.55))
    # paired gains (B - A per seed): 0.02, -0.01, 0.05
    assert (v.paired_gain.mean, v.paired_gain.min, v.paired_gain.max) == (pytest.approx(0.02), pytest.approx(-0.01),
                                                                          pytest.approx(0.05))
    v = compare(TPS, {"A": {1: 100.0, 2: 110.0}, "B": {1: 150.0, 2: 160.0}})
    assert (v.winner, v.beyond_spread, v.paired_wins) == ("B", True, 2)
    assert compare(LOSS, {"A": {1: 1.0}, "B": {1: 1.0}}).tie
    assert compare(LOSS, {"A": {1: 1.0}, "B": {1: None}}) is None        # (dense models have no MaxVio)


def test_throughput_skips_the_first_window():
    lines = [{"kind": "train", "tokens": 100, "tokens_per_s": 10.0},    # 100 tokens in 10 s (warm-up)
             {"kind": "eval", "val_loss": 1.0},
             {"kind": "train", "tokens": 300, "tokens_per_s": 20.0},    # 200 tokens in 10 s
             {"kind": "train", "tokens": 500, "tokens_per_s": 40.0}]    # 200 tokens in 5 s
    assert throughput(lines) == pytest.approx(400 / 15)
    assert throughput(lines[:1]) == pytest.approx(10.0)


# ---------------------------------------------------------------------- the report, from hand-made runs
def test_report_states_the_winner_and_whether_it_beats_the_seed_spread(tmp_path, base):
    m = load_matrix(matrix(tmp_path, eval={"contexts": [1, 4], "batches": 1}))
    diffs = check_variants(m)
    # (final val loss, loss @16, loss @64, MaxVio mean, tokens/s): nope-global is worse at 4x beyond the spread
    numbers = {("baseline", 1): (2.50, 2.40, 2.60, 0.10, 1000), ("baseline", 2): (2.52, 2.44, 2.62, 0.20, 1100),
               ("nope-global", 1): (2.51, 2.41, 2.90, 0.30, 1200), ("nope-global", 2): (2.55, 2.45, 2.80, 0.10, 1300)}
    runs, evals = [], {}
    for (variant, seed), (final, l1, l4, vio, tps) in numbers.items():
        run = Run(variant, seed, run_spec(m, m.variant(variant), seed), tmp_path / "out" / "runs" / f"{variant}-seed{seed}")
        run.folder.mkdir(parents=True)
        lines = [{"kind": "train", "step": 1, "tokens": 64, "tokens_per_s": tps},
                 {"kind": "eval", "step": 1, "val_loss": 3.0},
                 {"kind": "eval", "step": 2, "val_loss": final}]
        (run.folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (run.folder / "env.json").write_text(json.dumps({"device": "cpu", "torch": "2.x", "cpu_threads": 2}))
        grape = [{"name": "grape_m.log_freq", "ln_theta": [0.0, -1.0 + 0.01 * seed], "ln_theta_init": [0.0, -1.0],
                  "learnable": True}]
        evals[run.name] = {"eval": {"contexts": [1, 4], "batches": 1, "batch_size": 2, "seed": 0}, "grape_m": grape,
                           "contexts": [{"context": 1, "val_loss": l1, "max_vio": vio, "max_vio_worst": 2 * vio},
                                        {"context": 4, "val_loss": l4, "max_vio": vio, "max_vio_worst": 2 * vio}]}
        runs.append(run)
    paths = write_report(tmp_path / "out", m, runs, diffs, evals, ["grapefx", "ablate", "matrix.yaml", "--out", "out"])
    assert [p.name for p in paths] == ["report.md", "report.json", "loss.png", "grape_m_spectrum.png"]
    assert all(p.read_bytes().startswith(PNG) for p in paths[2:])
    md = paths[0].read_text()
    assert md.startswith("# Ablation `matrix`: baseline vs nope-global\n\n2 variants (**baseline**, **nope-global**) "
                         "of `base.yaml`, 2 seeds each (seeds 1, 2): 2 optimizer steps of 4 × 16 tokens per run, on cpu.")
    # loss at 4x: baseline 2.610 [2.600–2.620] vs nope-global 2.850 [2.800–2.900]: ranges do not overlap
    assert ("On validation loss at 4× the training context (64 tokens), **baseline** is lower: 2.610 vs 2.850 "
            "nats/token for nope-global — larger than the seed spread (the min–max ranges do not overlap); paired by "
            "seed it is better on 2 of 2 seeds, by 0.180–0.300.") in md
    # at 1x: 2.420 [2.40–2.44] vs 2.430 [2.41–2.45] overlap
    assert ("**baseline** is lower: 2.420 vs 2.430 nats/token for nope-global — within the seed spread (the min–max "
            "ranges overlap); paired by seed it is better on 2 of 2 seeds, by 0.010.") in md
    assert ("Larger than the seed spread: validation loss at 4× the training context (64 tokens) (**baseline**), "
            "training throughput (**nope-global**); every other difference is within it.\n") in md
    assert "    grapefx ablate matrix.yaml --out out\n" in md
    assert ("| baseline | 2 | 2.510 [2.500–2.520] | 2.420 [2.400–2.440] | 2.610 [2.600–2.620] | "
            "0.150 [0.100–0.200] | "
            "0.300 [0.200–0.400] | 1,050 [1,000–1,100] |") in md
    assert ("| nope-global | 2 | 2.530 [2.510–2.550] | 2.430 [2.410–2.450] | 2.850 [2.800–2.900] | "
            "0.200 [0.100–0.300] | "
            "0.400 [0.200–0.600] | 1,250 [1,200–1,300] |") in md
    assert ("| validation loss at 4× the training context (64 tokens) | **baseline** | nope-global | 0.240 nats/token | "
            "**yes** (ranges do not overlap) | 2/2 | 0.240 [0.180–0.300] |") in md
    assert ("| training throughput | **nope-global** | baseline | 200 tokens/s | **yes** (ranges do not overlap) | 2/2 | "
            "200 [200–200] |") in md
    assert "  - `attention.global.position.kind`: grape-a → nope\n" in md
    assert "- **baseline**: nothing (the baseline itself)" in md
    assert "Mean |ln(θ_j / θ_j,init)| over pairs j: baseline 0.0075 [0.005–0.01]" in md
    report = json.loads(paths[1].read_text())
    assert report["verdicts"]["val_loss_4x"]["winner"] == "baseline" and report["verdicts"]["val_loss_4x"]["beyond_spread"]
    assert report["results"]["nope-global"]["summary"]["val_loss_4x"]["min"] == 2.80
    assert report["results"]["nope-global"]["changes"][0] == {"key": "attention.global.position.kind",
                                                              "baseline": "grape-a", "variant": "nope"}


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
    assert "ablate ablation-tiny: 2 variants x 2 seeds = 4 runs" in first
    assert "  nope-global: attention.global.position.kind (grape-a -> nope)" in first
    for name in ("report.md", "report.json", "loss.png", "grape_m_spectrum.png"):
        assert (out / name).is_file()
    assert (out / "loss.png").read_bytes().startswith(PNG)
    md = (out / "report.md").read_text()
    assert "| baseline | 2 |" in md and "| nope-global | 2 |" in md and "| nope-global-seed2 |" in md
    assert "validation loss at 4× the training context (128 tokens)" in md
    report = json.loads((out / "report.json").read_text())
    assert report["eval"] == {"contexts": [1, 2, 4], "batches": 2, "batch_size": 1, "seed": 0, "buckets": 48,
                              "spacing": "log", "seq_len": 32, "length": 128}
    assert report["verdicts"]["val_loss_4x"]["winner"] in ("baseline", "nope-global")
    theta = json.loads((out / "runs" / "baseline-seed1" / "eval.json").read_text())["grape_m"][0]
    assert theta["name"] == "grape_m.log_freq" and len(theta["ln_theta"]) == 16     # head_dim 32 -> 16 pairs

    # a crash after step 1 of the last run: its final checkpoint and evaluation are gone
    last = out / "runs" / "nope-global-seed2"
    finished = out / "runs" / "baseline-seed1" / "checkpoints" / "step-000002" / "complete.json"
    stamp = finished.stat().st_mtime_ns
    shutil.rmtree(last / "checkpoints" / "step-000002")
    (last / "eval.json").unlink()
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("not training again") == 3 and again.count("not evaluating again") == 3
    assert "[4/4] nope-global-seed2: resuming at step 1 of 2" in again and "resumed from" in again
    assert finished.stat().st_mtime_ns == stamp
    assert [r["step"] for r in read_metrics(last) if r["kind"] == "train"] == [2]    # log_every 10: the last step
    assert (last / "eval.json").is_file()
