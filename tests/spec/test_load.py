"""Loader: safe YAML, line/column errors, typed conversion, extends, --set, dump round trip."""

from pathlib import Path

import pytest
import yaml

from spec import SpecError, dump_spec, load_spec, spec_from_dict
from spec.schema import GrapeA, GrapeM, NoPE, RoPE

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- YAML safety and syntax
def test_syntax_error_names_line_and_column(tmp_path):
    p = write(tmp_path, "bad.yaml", "model:\n  d_model: 128\n  n_layers 4\n  x: [1, 2\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: line \d+, column \d+: YAML syntax error") as e:
        load_spec(p)
    assert str(e.value).startswith(f"{p}: line ")


def test_syntax_error_exact_position(tmp_path):
    # a tab is not allowed for indentation: PyYAML reports it at line 2, column 1
    p = write(tmp_path, "tab.yaml", "model:\n\td_model: 8\n")
    with pytest.raises(SpecError, match=r"line 2, column 1: YAML syntax error"):
        load_spec(p)


def test_unsafe_tag_is_refused(tmp_path):
    p = write(tmp_path, "evil.yaml", "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match=r"evil\.yaml: line 1, column 7: tag .*python/object/apply:os\.system.* "
                                        r"is not allowed: specs are loaded with yaml\.safe_load"):
        load_spec(p)


def test_duplicate_key_is_an_error(tmp_path):
    p = write(tmp_path, "dup.yaml", "train:\n  steps: 5\n  steps: 6\n")
    with pytest.raises(SpecError, match=r"line 3, column 3: duplicate key 'steps' \(first written at line 2\)"):
        load_spec(p)


@pytest.mark.parametrize("text, kind, column", [("? [a, b]\n: 1\n", "list", 3),
                                                ("model:\n  ? {a: 1}\n  : 2\n", "mapping", 5)])
def test_a_list_or_mapping_as_a_key_is_an_error(tmp_path, text, kind, column):
    p = write(tmp_path, "k.yaml", text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    line = text.count("\n", 0, text.index("?")) + 1
    assert str(e.value) == (f"{p}: line {line}, column {column}: a key must be a name, not a {kind} (`? [...]` or "
                            "`? {...}`): write `name: value`")


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    p = write(tmp_path, "f.yaml", "moe:\n  router: {bias_update_rate: 2e-3}\ntrain:\n  optimizer: {lr: 1E-4}\n")
    s = load_spec(p)
    assert s.moe.router.bias_update_rate == 2e-3 and s.train.optimizer.lr == 1e-4


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(write(tmp_path, "l.yaml", "- 1\n- 2\n"))


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.yaml: no such spec file"):
        load_spec(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- typed conversion
def test_unknown_key_did_you_mean():
    with pytest.raises(SpecError, match=r"^<dict>: model\.d_modle: unknown key `d_modle` in model - did you mean "
                                        r"`d_model`\?"):
        spec_from_dict({"model": {"d_modle": 64}})


def test_unknown_key_names_the_section_that_has_it():
    with pytest.raises(SpecError, match=r"model\.window: unknown key `window` in model; `window` is a key of "
                                        r"attention\.local\.window"):
        spec_from_dict({"model": {"window": 64}})


@pytest.mark.parametrize("d, match", [
    ({"model": {"d_model": "128"}}, r"model\.d_model: expected an integer, got the string '128'"),
    ({"model": {"d_model": True}}, r"model\.d_model: expected an integer, got true"),
    ({"model": {"d_model": 128.0}}, r"expected an integer, got 128\.0 \(write it without a decimal point\)"),
    ({"model": {"norm_eps": "small"}}, r"model\.norm_eps: expected a number, got the string 'small'"),
    ({"model": {"qk_norm": "yes please"}}, r"model\.qk_norm: expected true or false"),
    ({"moe": {"router": {"score_function": "sigmoi"}}},
     r"moe\.router\.score_function: expected one of sigmoid, softmax; got the string 'sigmoi' - did you mean "
     r"'sigmoid'\?"),
    ({"train": {"optimizer": {"betas": [0.9]}}}, r"train\.optimizer\.betas: expected a list of 2 values, got 1"),
    ({"model": "big"}, r"^<dict>: model: expected a section"),
    ({"moe": {"router": None}}, r"moe\.router: expected a section \(a mapping of keys to values\), got null"),
    ({"data": {"tokenizer": {"kind": "bpe", "vocab_size": None, "path": None}, "seq_len": None}},
     r"data\.seq_len: expected an integer, got null"),
    ({"attention": {"local": {"heads": None}}}, r"attention\.local\.heads: expected an integer, got null"),
])
def test_wrong_types_name_the_expected_type(d, match):
    with pytest.raises(SpecError, match=match):
        spec_from_dict(d)


def test_yaml_key_global_maps_to_field_global_():
    s = spec_from_dict({"attention": {"global": {"heads": 8, "kv_heads": 2}}})
    assert s.attention.global_.heads == 8 and s.attention.of("global").kv_heads == 2


def test_position_is_a_tagged_union():
    s = spec_from_dict({"attention": {"local": {"position": {"kind": "rope", "base": 500000.0}},
                                      "global": {"position": "nope"}}})
    assert s.attention.local.position == RoPE(base=500000.0)
    assert s.attention.global_.position == NoPE()


def test_position_key_of_another_kind_is_an_error():
    with pytest.raises(SpecError, match=r"attention\.global\.position\.base: `base` does not apply to position kind "
                                        r"grape-a \(its keys: kind, learnable\); it belongs to kind grape-m / rope"):
        spec_from_dict({"attention": {"global": {"position": {"kind": "grape-a", "base": 10.0}}}})


def test_unknown_position_kind_did_you_mean():
    with pytest.raises(SpecError, match=r"attention\.local\.position\.kind: position kind must be one of grape-m, "
                                        r"grape-a, nope, rope; got the string 'grapem' - did you mean 'grape-m'\?"):
        spec_from_dict({"attention": {"local": {"position": {"kind": "grapem"}}}})


@pytest.mark.parametrize("kind, shown", [(["grape-m"], "a list ['grape-m']"), ({"a": 1}, "a mapping"), (3, "3")])
def test_position_kind_of_the_wrong_type_is_a_spec_error(kind, shown):
    with pytest.raises(SpecError) as e:
        spec_from_dict({"attention": {"local": {"position": {"kind": kind}}}}, file="my.yaml")
    assert str(e.value) == ("my.yaml: attention.local.position.kind: position kind must be one of grape-m, grape-a, "
                            f"nope, rope; got {shown}")


def test_partial_section_keeps_the_kind_defaults():
    # attention.local's default has window 128 and GRAPE-M; giving only heads must keep them
    s = spec_from_dict({"attention": {"local": {"heads": 8, "kv_heads": 4, "position": {"base": 5e5}}}})
    assert s.attention.local.window == 128
    assert s.attention.local.position == GrapeM(base=5e5)


def test_layer_kinds_without_global_every_means_no_period():
    s = spec_from_dict({"model": {"n_layers": 3, "layer_kinds": ["global", "local", "local"]}})
    assert s.model.global_every is None and s.layer_kinds() == ("global", "local", "local")


def test_extends_key_only_in_files():
    with pytest.raises(SpecError, match="a mapping cannot extend"):
        spec_from_dict({"extends": "x.yaml"})


# ----------------------------------------------------------------------------- extends
def test_extends_deep_merges_relative_to_the_file(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base", "root.yaml", "name: root\nmodel: {d_model: 64, n_layers: 8}\ntrain: {steps: 7}\n")
    write(tmp_path / "base", "mid.yaml", "extends: root.yaml\nname: mid\nmodel: {n_layers: 4}\n")
    child = write(tmp_path, "child.yaml", "extends: base/mid.yaml\ntrain: {steps: 9}\n")
    s = load_spec(child)
    assert (s.name, s.model.d_model, s.model.n_layers, s.train.steps) == ("mid", 64, 4, 9)


def test_extends_position_kind_change_replaces_the_mapping(tmp_path):
    write(tmp_path, "a.yaml", "attention:\n  global:\n    position: {kind: grape-a, learnable: true}\n")
    b = write(tmp_path, "b.yaml", "extends: a.yaml\nattention:\n  global:\n    position: {kind: nope}\n")
    assert load_spec(b).attention.global_.position == NoPE()


def test_extends_cycle_is_detected(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: c.yaml\n")
    write(tmp_path, "c.yaml", "extends: a.yaml\n")
    with pytest.raises(SpecError, match=r"c\.yaml: extends: `extends` cycle: a\.yaml -> b\.yaml -> c\.yaml -> "
                                        r"a\.yaml"):
        load_spec(tmp_path / "a.yaml")


def test_extends_missing_parent_names_the_referrer(tmp_path):
    p = write(tmp_path, "a.yaml", "extends: gone.yaml\n")
    with pytest.raises(SpecError, match=rf"^{p}: extends: file .*gone\.yaml' does not exist"):
        load_spec(p)


def test_error_names_the_file_that_wrote_the_value(tmp_path):
    base = write(tmp_path, "base.yaml", "attention:\n  local: {heads: 6, kv_heads: 4}\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\ntrain: {steps: 3}\n")
    with pytest.raises(SpecError, match=rf"^{base}: attention\.local\.kv_heads: 6 query heads"):
        load_spec(child)


def test_ablation_example_extends_baseline():
    base, abl = load_spec(EXAMPLES / "baseline.yaml"), load_spec(EXAMPLES / "ablation-nope-global.yaml")
    assert abl.attention.global_.position == NoPE() and base.attention.global_.position == GrapeA()
    assert abl.model == base.model and abl.moe == base.moe and abl.attention.local == base.attention.local


# ----------------------------------------------------------------------------- --set overrides
def test_set_parses_yaml_values(tmp_path):
    p = write(tmp_path, "s.yaml", "name: s\n")
    s = load_spec(p, ["train.steps=50", "moe.router.bias_update_rate=5e-4", "model.qk_norm=true",
                      "model.n_layers=3", "model.layer_kinds=[local, global, local]", "model.global_every=null",
                      "train.grad_clip=null", "name=renamed"])
    assert s.train.steps == 50 and s.moe.router.bias_update_rate == 5e-4 and s.model.qk_norm
    assert s.layer_kinds() == ("local", "global", "local") and s.train.grad_clip is None and s.name == "renamed"


def test_set_unknown_key_did_you_mean(tmp_path):
    p = write(tmp_path, "s.yaml", "name: s\n")
    with pytest.raises(SpecError, match=rf"^{p} \(--set\): train\.stpes: unknown key `stpes` in train - did you "
                                        r"mean `steps`\?"):
        load_spec(p, ["train.stpes=5"])


def test_set_position_kind_resets_the_position(tmp_path):
    p = write(tmp_path, "s.yaml", "attention:\n  global:\n    position: {kind: grape-a, learnable: true}\n")
    s = load_spec(p, ["attention.global.position.kind=nope"])
    assert s.attention.global_.position == NoPE()


@pytest.mark.parametrize("item, match", [
    ("train.steps", r"expected --set KEY=VALUE"),
    ("train..steps=3", r"empty key part"),
    ("train.steps.x=3", r"train\.steps is a value \(1000\), not a section"),
    ("train.steps=[1, 2", r"--set value '\[1, 2' is not a YAML value"),
    ("train.steps=fifty", r"train\.steps: expected an integer, got the string 'fifty'"),
])
def test_set_errors(tmp_path, item, match):
    p = write(tmp_path, "s.yaml", "train: {steps: 1000}\n")
    with pytest.raises(SpecError, match=match):
        load_spec(p, [item])


# ----------------------------------------------------------------------------- dump round trip
# every example spec; ablation matrices (a top-level `variants:`, for grapefx ablate) are tested in tests/runtime
SPECS = sorted(p.name for p in EXAMPLES.glob("*.yaml") if "variants" not in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("name", SPECS)
def test_dump_loads_back_equal(name):
    s = load_spec(EXAMPLES / name)
    assert spec_from_dict(yaml.safe_load(dump_spec(s))) == s


def test_dump_of_defaults_round_trips_and_writes_global():
    s = spec_from_dict({})
    text = dump_spec(s)
    assert "\n  global:\n" in text and "global_:" not in text
    assert spec_from_dict(yaml.safe_load(text)) == s
