"""The pass registry: ordered selection, prerequisites, the report, and the example specs."""

from pathlib import Path

import pytest

from compiler.lower import lower
from compiler.passes import PASSES, apply_passes, check_pass_names, layers_text
from compiler.pipeline import block_groups
from spec import load_spec
from spec.errors import GrapefxError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
# the examples' structure (schedule, positions, windows) at CPU size
SMALL = ["model.n_layers=8", "model.d_model=32", "model.vocab_size=257", "data.tokenizer.kind=byte",
         "data.tokenizer.vocab_size=null", "data.seq_len=32", "attention.local.window=8",
         "attention.local.heads=4", "attention.local.kv_heads=2", "attention.local.head_dim=8",
         "attention.global.heads=4", "attention.global.kv_heads=2", "attention.global.head_dim=8",
         "moe.experts=4", "moe.top_k=2", "moe.expert_hidden=16"]
ALL = list(PASSES)


def _small(name):
    return load_spec(EXAMPLES / name, overrides=SMALL)


def test_baseline_rotary_matches_the_local_layers_and_bias_softmax_the_global_ones():
    spec = _small("baseline.yaml")
    model = lower(spec)
    report = apply_passes(model, ALL)
    kinds = spec.layer_kinds()
    local = [i + 1 for i, k in enumerate(kinds) if k == "local"]
    glob = [i + 1 for i, k in enumerate(kinds) if k == "global"]
    assert glob == [4, 8]
    d = report.as_dict()
    assert d["attention_formation"]["layers"] == list(range(1, 9))
    assert d["rotary_attention"]["matches"] == len(local) and d["rotary_attention"]["layers"] == local
    assert d["bias_softmax"]["matches"] == len(glob) and d["bias_softmax"]["layers"] == glob
    # every local block and every global block is one graph again after the passes
    assert [(g.label, g.layers) for g in block_groups(model)] == [("local/moe", [0, 1, 2, 4, 5, 6]),
                                                                  ("global/moe", [3, 7])]


def test_nope_global_ablation_bias_softmax_matches_nothing_and_says_so():
    spec = _small("ablation-nope-global.yaml")
    report = apply_passes(lower(spec), ALL)
    e = report.entries["bias_softmax"]
    assert e.matches == 0 and e.layers == []
    why = e.why_nothing()
    assert "layers 1-8" in why and "no dense bias" in why
    assert report.entries["rotary_attention"].layers == [1, 2, 3, 5, 6, 7]
    assert "bias_softmax: nothing — layers 1-8: the attention has no dense bias" in "\n".join(report.summary_lines())


def test_report_layout(make_spec):
    report = apply_passes(lower(make_spec()), ["attention_formation", "rotary_attention"], seq_len=12)
    d = report.as_dict()
    assert list(d) == ALL                                          # every known pass, in registry order
    assert d["bias_softmax"] == {"graph": "block", "matches": 0, "layers": [], "enabled": False, "skipped": None,
                                 "nodes_removed": 0, "nodes_added": 0, "reasons": {}}
    assert d["linear_cross_entropy"]["graph"] == "head" and not d["linear_cross_entropy"]["enabled"]
    assert report.entries["bias_softmax"].why_nothing() == "off (not in compile.passes)"
    assert d["rotary_attention"]["layers"] == [1, 2, 3] and d["rotary_attention"]["nodes_removed"] == 6
    assert report.order == ["attention_formation", "rotary_attention"]


def test_no_passes_leaves_the_graphs_as_lowered(make_spec):
    a, b = lower(make_spec()), lower(make_spec())
    report = apply_passes(b, [], seq_len=12)
    assert all(e.matches == 0 and not e.enabled for e in report.entries.values())
    assert [x.code for x in a.layers] == [y.code for y in b.layers]


def test_pass_names_are_checked():
    with pytest.raises(GrapefxError, match=r"--passes: unknown pass 'rotary' \(did you mean 'rotary_attention'\?\)"):
        check_pass_names(["attention_formation", "rotary"], "--passes")
    with pytest.raises(GrapefxError, match="listed twice"):
        check_pass_names(["bias_softmax", "bias_softmax"])


def test_layers_text():
    assert layers_text([1, 2, 3, 5, 7, 8]) == "layers 1-3, 5, 7-8"
    assert layers_text([4]) == "layer 4"
    assert layers_text([]) == "no layer"


def test_every_pass_module_is_registered_once_with_a_known_prerequisite():
    """One file per pass (compiler/passes/<name>.py, besides match.py), each in PASSES under its name."""
    folder = Path(__file__).resolve().parents[3] / "compiler" / "passes"
    files = sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "match"))
    assert sorted(PASSES) == files
    assert all(p.run.__module__ == f"compiler.passes.{name}" for name, p in PASSES.items())
    assert {p.graph for p in PASSES.values()} == {"block", "head"}
    assert all(p.needs in (None, *PASSES) and (p.needs is None or ALL.index(p.needs) < ALL.index(n))
               for n, p in PASSES.items())


def test_the_head_pass_is_switched_by_name(make_spec):
    off = apply_passes(lower(make_spec()), ["attention_formation"], seq_len=12).entries["linear_cross_entropy"]
    assert (off.enabled, off.matches, off.why_nothing()) == (False, 0, "off (not in compile.passes)")
    on = apply_passes(lower(make_spec()), ["linear_cross_entropy"], seq_len=12)
    assert on.entries["linear_cross_entropy"].matches == 1 and on.entries["attention_formation"].matches == 0
    assert "linear_cross_entropy: 1 match in the head" in "\n".join(on.summary_lines())
