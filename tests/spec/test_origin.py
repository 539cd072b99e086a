"""Blame: every type error of a spec in one run, each charged to the file or ``--set`` that wrote the
value; a rule over several keys is reported at the key written last (spec.origin, spec.convert)."""

import pytest

from spec import SpecProblems, load_spec


@pytest.fixture
def files(tmp_path):
    (tmp_path / "base.yaml").write_text("moe:\n  experts: 8\n  top_k: 2\n  router: {num_groups: 4, group_topk: 2}\n")
    def child(text):
        p = tmp_path / "child.yaml"
        p.write_text("extends: base.yaml\n" + text)
        return p
    return tmp_path, child


def test_a_rule_over_two_keys_blames_the_file_that_changed_one(files):
    tmp, child = files
    with pytest.raises(SpecProblems) as e:
        load_spec(child("moe: {top_k: 1}\n"))
    # group_topk = 2 is base.yaml's; top_k = 1 is child.yaml's: the child is blamed, at moe.top_k
    assert str(e.value) == (f"{tmp}/child.yaml: moe.top_k: top_k // group_topk = 1 // 2 = 0: each kept group is "
                            "scored by its top (top_k // group_topk) experts, which must be >= 1; use group_topk <= 1")


def test_a_set_written_last_is_blamed(files):
    tmp, child = files
    with pytest.raises(SpecProblems) as e:
        load_spec(child(""), ["moe.router.group_topk=3"])
    assert str(e.value).startswith(f"{tmp}/child.yaml (--set): moe.router.group_topk: top_k // group_topk = 2 // 3 = 0")


def test_every_type_error_in_one_run_each_with_its_writer(files):
    tmp, child = files
    with pytest.raises(SpecProblems) as e:
        load_spec(child("moe: {top_k: two}\ntrain: {steps: 1.5, stepz: 3}\n"), ["model.d_model=wide"])
    assert str(e.value).splitlines() == [
        f"{tmp}/child.yaml: moe.top_k: expected an integer, got the string 'two'",
        f"{tmp}/child.yaml: train.steps: expected an integer, got 1.5",
        f"{tmp}/child.yaml: train.stepz: unknown key `stepz` in train - did you mean `steps`? (valid keys: steps, "
        "micro_batch, global_batch, seed, optimizer, schedule, grad_clip, log_every, eval_every, eval_batches, "
        "checkpoint_every, keep_checkpoints)",
        f"{tmp}/child.yaml (--set): model.d_model: expected an integer, got the string 'wide'",
    ]


def test_a_default_is_never_blamed(tmp_path):
    # heads = 6 from the file, kv_heads = 4 from --set (written last): the --set is blamed
    p = tmp_path / "a.yaml"
    p.write_text("attention:\n  local: {heads: 6}\n")
    with pytest.raises(SpecProblems) as e:
        load_spec(p, ["attention.local.kv_heads=4"])
    assert str(e.value).startswith(f"{p} (--set): attention.local.kv_heads: 6 query heads cannot be shared evenly by "
                                   "4 kv heads")
    p.write_text("attention:\n  local: {heads: 5}\n")          # kv_heads is the default 2: the heads are blamed
    with pytest.raises(SpecProblems) as e:
        load_spec(p)
    assert str(e.value).startswith(f"{p}: attention.local.heads: 5 query heads cannot be shared evenly by 2 kv heads "
                                   "(GQA: query head h reads kv head h // (heads / kv_heads), so heads % kv_heads must "
                                   "be 0); use kv_heads in [1, 5]")
