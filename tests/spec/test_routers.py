"""Router kinds (spec.routers): the kind field, its default, and the router's own rules and summary."""

import pytest

from spec import SpecError, dump_spec, spec_from_dict
from spec.routers import ROUTERS, DeepSeekV3Router, divisors
from spec.schema import Router


def test_deepseek_v3_is_the_default_kind_and_is_written_out():
    s = spec_from_dict({})
    assert type(s.moe.router) is DeepSeekV3Router is Router is ROUTERS["deepseek-v3"]
    assert s.moe.router.kind == "deepseek-v3"
    assert "router:\n    kind: deepseek-v3\n" in dump_spec(s)


def test_unknown_router_kind_did_you_mean():
    with pytest.raises(SpecError) as e:
        spec_from_dict({"moe": {"router": {"kind": "deepseek"}}}, file="my.yaml")
    assert str(e.value) == ("my.yaml: moe.router.kind: expected one of deepseek-v3; got the string 'deepseek' - "
                            "did you mean 'deepseek-v3'?")


def test_router_rules_are_reported_at_the_router_keys():
    with pytest.raises(SpecError) as e:
        spec_from_dict({"moe": {"experts": 6, "router": {"num_groups": 4, "score_function": "softmax"}}},
                       file="my.yaml")
    assert str(e.value).splitlines() == [
        "my.yaml: moe.router.num_groups: 6 experts cannot be split into 4 equal groups (experts % num_groups must be "
        "0); use num_groups in [1, 2, 3, 6]",
        "my.yaml: moe.router.score_function: expert_bias needs score_function: sigmoid (MATH.md §5; Megatron refuses "
        "it too): with softmax a per-expert offset reweights every expert; set score_function: sigmoid or "
        "expert_bias: false",
    ]


def test_summary_line():
    r = DeepSeekV3Router(num_groups=4, group_topk=2, load_balancing="seq_aux", bias_centering=True)
    assert r.summary(6) == ("router: deepseek-v3, sigmoid scores, top-6 in 2 of 4 groups, load balancing seq_aux "
                            "(coeff 0.0001), expert bias on (rate 0.001, centred), gate scaling 1, fp32")


@pytest.mark.parametrize("n, expected", [(1, [1]), (12, [1, 2, 3, 4, 6, 12]), (16, [1, 2, 4, 8, 16]), (13, [1, 13])])
def test_divisors(n, expected):
    assert divisors(n) == expected
