"""Megatron-LM recipe import/export (MATH.md §1): patterns, schedule, polarity trap, router, round trips."""

import builtins
import shlex
from pathlib import Path

import pytest

from spec import SpecError, load_spec, spec_from_dict
from spec.megatron import from_megatron, import_megatron, to_megatron
from spec.megatron.patterns import MAX_LEN, format_pattern, parse_int_or_pattern, parse_pattern
from spec.schema import GrapeA, GrapeM, NoPE, RoPE

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

# the baseline's recipe as Megatron-LM flags
BASELINE_FLAGS = ("--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --group-query-attention --num-query-groups 4 "
        "--window-size 127,0 --window-attn-skip-freq 4 --position-embedding-type grapem --grapem-learnable-freq "
        "--no-rope-freq 4 --grape-a --num-experts 64 --moe-router-topk 6 --moe-router-load-balancing-type none "
        "--moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3 --moe-router-score-function sigmoid "
        "--moe-router-dtype fp32 --bf16").split()

# a complete small recipe (nothing left to unmodelled Megatron defaults); tests append to it
BASE = ("--num-layers 12 --hidden-size 256 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
        "--swiglu --disable-bias-linear --normalization RMSNorm --attention-dropout 0 --hidden-dropout 0 "
        "--vocab-size 1000 --seq-length 512 --micro-batch-size 2 --train-iters 10 --lr 1e-3 "
        "--lr-decay-style cosine --position-embedding-type grapem --window-size 127,0").split()


def imp(extra: str = "", base=BASE, strict=False):
    spec_d, warnings = from_megatron(base + extra.split(), strict=strict)
    return spec_from_dict(spec_d), warnings


# ----------------------------------------------------------------------------- the pattern parser
@pytest.mark.parametrize("text, expected", [
    ("[0]*3+[1]", [0, 0, 0, 1]),
    ("([0]*3+[1])*3", [0, 0, 0, 1] * 3),
    ("[1,1,1,0]*3", [1, 1, 1, 0] * 3),
    ("([1]*3+[0]*1)*2", [1, 1, 1, 0] * 2),
    ("3*[1]", [1, 1, 1]),
    ("[0]*(2+1)", [0, 0, 0]),
    ("[1]+[0]*23", [1] + [0] * 23),
    ("[]", []),
])
def test_pattern_accepts(text, expected):
    assert parse_pattern(text, "--no-rope-freq") == expected


@pytest.mark.parametrize("text, match", [
    ("__import__('os').system('x')", r"character '_' at position 1: only digits and \[ \] \( \) , \+ \* are allowed; "
                                     r"the pattern is parsed, never evaluated"),
    ("[0] * 3", r"character ' ' at position 4: spaces are not allowed \(Megatron rejects them too\)"),
    ("[0]*3+[1]+x", r"character 'x'"),
    ("(1,2)", r"a comma inside \( \) makes a tuple"),
    ("[[0]]", r"list entries must be numbers"),
    ("[0]*[1]", r"cannot multiply two lists"),
    ("[0]+1", r"cannot add a list and a number"),
    ("4", r"a pattern must denote a list"),
    ("[0", r"expected '\]' at position 3, found the end"),
    ("[0]*3)", r"unexpected '\)' at position 6"),
    (f"[0]*{MAX_LEN + 1}", r"larger than"),
    ("([0]*1000)*1000", r"longer than 100000 entries"),
    ("(" * 100 + "[0]" + ")" * 100, r"nested deeper than"),
])
def test_pattern_rejects(text, match):
    with pytest.raises(SpecError, match=r"^<megatron flags>: --no-rope-freq: pattern .*" + match):
        parse_pattern(text, "--no-rope-freq")


def test_pattern_never_evaluates(monkeypatch):
    def no_eval(*a, **k):
        raise AssertionError("eval called")
    monkeypatch.setattr(builtins, "eval", no_eval)
    monkeypatch.setattr(builtins, "exec", no_eval)
    assert parse_pattern("([0]*3+[1])*6", "--x") == [0, 0, 0, 1] * 6
    with pytest.raises(SpecError):
        parse_pattern("__import__('os')", "--x")


def test_int_or_pattern():
    assert parse_int_or_pattern("4", "--x") == 4
    assert parse_int_or_pattern("[1]*2", "--x") == [1, 1]
    with pytest.raises(SpecError, match=r"--x: 'four' is neither an integer nor a list pattern"):
        parse_int_or_pattern("four", "--x")


@pytest.mark.parametrize("bits", [[0, 0, 0, 1] * 6, [1] * 24, [1, 1, 1, 0] * 3, [0, 1, 1], [0] + [1] * 23, [1]])
def test_format_pattern_round_trips(bits):
    assert parse_pattern(format_pattern(bits), "--x") == bits
    assert format_pattern([0, 0, 0, 1] * 6) == "([0]*3+[1])*6"


# ----------------------------------------------------------------------------- schedule and windows
@pytest.mark.parametrize("ws", ["127,0", "(127,0)"])
def test_window_size_is_a_plus_one_keys(ws):
    s, _ = imp(f"--window-attn-skip-freq 4 --no-rope-freq 4 --grape-a --window-size {ws}")
    assert s.attention.local.window == 128


def test_window_size_off_by_one_warning():
    s, w = imp("--window-attn-skip-freq 4 --no-rope-freq 4 --window-size 128,0")
    assert s.attention.local.window == 129
    assert any("--window-size 128,0 is W = 129 keys" in x and "write --window-size 127,0" in x for x in w)


def test_window_size_must_be_causal():
    with pytest.raises(SpecError, match=r"^<megatron flags>: --window-size: '127,4' looks 4 keys ahead; grapefx is "
                                        r"causal: use --window-size 127,0"):
        imp("--window-size 127,4")


@pytest.mark.parametrize("skip, no_rope, kinds_global", [
    ("4", "4", [4, 8, 12]),
    ("[1,1,1,0]*3", "([0]*3+[1])*3", [4, 8, 12]),
    ("([1]*2+[0])*4", "[0,0,1]*4", [3, 6, 9, 12]),
])
def test_int_and_list_forms(skip, no_rope, kinds_global):
    s, _ = imp(f"--window-attn-skip-freq {skip} --no-rope-freq {no_rope} --grape-a")
    assert [i + 1 for i, k in enumerate(s.layer_kinds()) if k == "global"] == kinds_global
    assert s.model.global_every == kinds_global[0]  # periodic lists come back as global_every
    assert s.attention.local.position.kind == "grape-m" and s.attention.global_.position == GrapeA()
    assert not s.attention.allow_position_mismatch


def test_irregular_window_list_becomes_layer_kinds():
    s, _ = imp("--window-attn-skip-freq [0]+[1]*10+[0] --no-rope-freq [1]+[0]*10+[1]")
    assert s.model.layer_kinds == ("global",) + ("local",) * 10 + ("global",) and s.model.global_every is None


def test_no_window_means_every_layer_global():
    s, _ = imp("--position-embedding-type none", base=[t for t in BASE if t not in ("--window-size", "127,0")])
    assert set(s.layer_kinds()) == {"global"}


def test_no_rope_int_must_divide_num_layers():
    with pytest.raises(SpecError, match=r"--no-rope-freq: 5: Megatron expands N to \(\[0\]\*\(N-1\)\+\[1\]\)\*\(L/N\), "
                                        r"so --num-layers 12 must be a multiple of N"):
        imp("--window-attn-skip-freq 4 --no-rope-freq 5")


def test_list_length_must_match():
    with pytest.raises(SpecError, match=r"--window-attn-skip-freq: the list has 8 entries for --num-layers 12"):
        imp("--window-attn-skip-freq [1,1,1,0]*2")


# ----------------------------------------------------------------------------- the polarity trap
def test_polarity_trap_same_list_to_both_flags():
    with pytest.raises(SpecError) as e:
        imp("--window-attn-skip-freq [1,1,1,0]*3 --no-rope-freq [1,1,1,0]*3 --grape-a")
    msg = str(e.value)
    assert msg.startswith("<megatron flags>: --no-rope-freq: the layers that skip the rotation (1, 2, 3, 5, 6, 7, 9, "
                          "10, ... (9 layers)) are exactly the local (sliding-window) layers")
    assert "in a --window-attn-skip-freq list 1 means sliding window (a local layer), but in a --no-rope-freq list " \
           "1 means skip the rotation" in msg
    assert "the same list given to both flags inverts the layer plan - and this recipe does exactly that" in msg
    assert "Fix: --no-rope-freq '([0]*3+[1])*3'" in msg


def test_polarity_trap_inverted_pattern():
    with pytest.raises(SpecError, match=r"exactly the local \(sliding-window\) layers.*Polarity: .*Fix: "
                                        r"--no-rope-freq '\(\[0\]\*3\+\[1\]\)\*3'"):
        imp("--window-attn-skip-freq 4 --no-rope-freq [1,1,1,0]*3")


def test_no_rope_layers_that_split_a_kind_are_refused():
    with pytest.raises(SpecError, match=r"--no-rope-freq: local layers 2, 6, 10 skip the rotation but local layers "
                                        r"1, 3, 5, 7, 9, 11 rotate; .* exactly the global layers \(4, 8, 12\)"):
        imp("--window-attn-skip-freq 4 --no-rope-freq 2")


def test_rotating_global_layers_need_the_escape_hatch():
    s, w = imp("--window-attn-skip-freq 4")
    assert s.attention.allow_position_mismatch and s.attention.global_.position.kind == "grape-m"
    assert any("the global layers (4, 8, 12) rotate (no --no-rope-freq: Megatron rotates every layer)" in x
               and "allow_position_mismatch: true" in x for x in w)


def test_grape_a_on_rotating_global_layers_is_refused():
    with pytest.raises(SpecError, match=r"--grape-a: the global layers \(4, 8, 12\) would both rotate and add the "
                                        r"ALiBi bias"):
        imp("--window-attn-skip-freq 4 --grape-a")


def test_nope_global_ablation():
    s, _ = imp("--window-attn-skip-freq 4 --no-rope-freq 4")
    assert s.attention.global_.position == NoPE() and not s.attention.allow_position_mismatch


def test_rope_recipe():
    s, _ = imp("--window-attn-skip-freq 4 --no-rope-freq 4 --position-embedding-type rope --rotary-base 500000")
    assert s.attention.local.position == RoPE(base=500000.0)


def test_learned_absolute_default_is_refused():
    base = [t for t in BASE if t not in ("--position-embedding-type", "grapem")]
    with pytest.raises(SpecError, match=r"--position-embedding-type: learned_absolute \(Megatron default\) is not "
                                        r"modelled"):
        imp("--window-attn-skip-freq 4", base=base)


# ----------------------------------------------------------------------------- GRAPE-M options
def test_grapem_per_head_refused_under_gqa():
    with pytest.raises(SpecError, match=r"^<megatron flags>: --grapem-per-head: refused under GQA \(4 query heads "
                                        r"share 2 kv heads\): .*\(the relative law, MATH\.md §2\)"):
        imp("--window-attn-skip-freq 4 --no-rope-freq 4 --grapem-per-head")


def test_grapem_per_head_without_gqa_is_a_not_modelled_warning():
    base = " ".join(BASE).replace("--group-query-attention --num-query-groups 2 ", "").split()
    s, w = imp("--window-attn-skip-freq 4 --no-rope-freq 4 --grapem-per-head", base=base)
    assert s.attention.local.kv_heads == 4 and s.attention.local.position.share == "model"
    assert any(x.startswith("not modelled: --grapem-per-head") for x in w)


def test_grapem_flags():
    s, _ = imp("--window-attn-skip-freq 4 --no-rope-freq 4 --no-grapem-learnable-freq --grapem-log-freq-scale 8")
    assert s.attention.local.position == GrapeM(learnable_freq=False, log_freq_scale=8.0)


# ----------------------------------------------------------------------------- router and MoE
def test_router_defaults_are_megatrons():
    r = import_megatron(BASE + "--window-attn-skip-freq 4 --no-rope-freq 4 --num-experts 8".split())
    s = spec_from_dict(r.spec)
    assert s.moe.top_k == 2 and s.moe.router.score_function == "softmax" and not s.moe.router.expert_bias
    assert s.moe.router.load_balancing == "none"  # aux_loss with coefficient 0 adds nothing
    assert s.moe.shared_experts == 0 and s.moe.expert_hidden == 640  # int(4*256*2/3/64)*64 with --swiglu
    assert "--moe-router-topk 2" in r.defaults and "--moe-router-score-function softmax" in r.defaults
    assert any("aux_loss with --moe-aux-loss-coeff 0" in w for w in r.warnings)


def test_dsv3_router_flags():
    s, w = imp("--window-attn-skip-freq 4 --no-rope-freq 4 --num-experts 16 --moe-router-topk 4 "
               "--moe-router-score-function sigmoid --moe-router-pre-softmax --moe-router-enable-expert-bias "
               "--moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4 --moe-router-num-groups 4 "
               "--moe-router-group-topk 2 --moe-router-topk-scaling-factor 2.5 --moe-router-dtype fp32 "
               "--moe-ffn-hidden-size 128 --moe-shared-expert-intermediate-size 256 --moe-layer-freq [0]*1+[1]*11")
    m = s.moe
    assert (m.experts, m.top_k, m.expert_hidden, m.shared_experts, m.first_k_dense) == (16, 4, 128, 2, 1)
    r = m.router
    assert (r.score_function, r.load_balancing, r.aux_coeff, r.expert_bias, r.num_groups, r.group_topk,
            r.topk_scaling_factor, r.pre_softmax) == ("sigmoid", "seq_aux", 1e-4, True, 4, 2, 2.5, False)
    assert any("--moe-router-pre-softmax does nothing with --moe-router-score-function sigmoid" in x
               and "dropped" in x for x in w)


def test_pre_softmax_kept_with_softmax():
    s, _ = imp("--window-attn-skip-freq 4 --no-rope-freq 4 --num-experts 8 --moe-router-pre-softmax")
    assert s.moe.router.pre_softmax


@pytest.mark.parametrize("extra, match", [
    ("--moe-layer-freq [1,0]*6", r"--moe-layer-freq: \(\[1\]\+\[0\]\)\*6 interleaves dense and MoE layers"),
    ("--moe-layer-freq 2", r"--moe-layer-freq: 2: one MoE layer in every 2 \(layers 1, 3, \.\.\.\) is not modelled"),
    ("--moe-ffn-hidden-size 128 --moe-shared-expert-intermediate-size 200",
     r"--moe-shared-expert-intermediate-size: 200 is not a whole number of experts of width 128"),
    ("--moe-router-load-balancing-type sinkhorn", r"--moe-router-load-balancing-type: sinkhorn is not modelled"),
    ("--num-layers x", r"--num-layers: 'x' is not an integer"),
])
def test_moe_refusals(extra, match):
    with pytest.raises(SpecError, match=match):
        imp("--window-attn-skip-freq 4 --no-rope-freq 4 --num-experts 8 " + extra)


# ----------------------------------------------------------------------------- ignored, not modelled, strict
def test_ignored_and_not_modelled_flags_are_listed():
    _, w = imp("--window-attn-skip-freq 4 --no-rope-freq 4 --tensor-model-parallel-size 2 --use-flash-attn "
               "--foo-bar 3 --fp16")
    assert "ignored (execution only: no effect on what the model computes): --tensor-model-parallel-size 2, " \
           "--use-flash-attn" in w
    assert "not modelled: --foo-bar 3: unknown to grapefx; if it changes the model, the imported spec does not " \
           "say so" in w
    assert any(x.startswith("not modelled: --fp16") for x in w)


def test_megatron_defaults_that_grapefx_cannot_model_are_warned():
    _, w = from_megatron("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --position-embedding-type rope "
                         "--window-size 15,0 --no-rope-freq 4 --window-attn-skip-freq 4".split())
    joined = "\n".join(w)
    for text in ("(no --swiglu)", "--normalization LayerNorm", "(no --disable-bias-linear)",
                 "--attention-dropout 0.1", "--lr-decay-style linear (Megatron default)"):
        assert text in joined


def test_strict_refuses_unmodelled_flags():
    with pytest.raises(SpecError, match=r"^<megatron flags>: --foo-bar 3: not modelled: .*--strict refuses"):
        imp("--window-attn-skip-freq 4 --no-rope-freq 4 --tensor-model-parallel-size 2 --foo-bar 3", strict=True)
    imp("--window-attn-skip-freq 4 --no-rope-freq 4 --tensor-model-parallel-size 2", strict=True)  # execution-only


def test_omitted_flags_take_megatron_defaults():
    r = import_megatron(BASELINE_FLAGS)
    s = spec_from_dict(r.spec)
    assert s.model.tied_embeddings  # no --untie-embeddings-and-output-weights
    assert s.model.norm_eps == 1e-5 and s.model.init.std == 0.02 and s.model.pad_vocab_to == 128
    assert s.moe.shared_experts == 0 and s.moe.expert_hidden == 4096 and s.ffn.hidden == 4096  # 4h, no --swiglu
    assert s.train.optimizer.betas == (0.9, 0.999) and s.train.optimizer.weight_decay == 0.01
    assert "--norm-epsilon 1e-05" in r.defaults and "--init-method-std 0.02" in r.defaults


# ----------------------------------------------------------------------------- the baseline recipe and round trips
def test_baseline_recipe_matches_baseline_schedule_positions_router():
    s = spec_from_dict(from_megatron(BASELINE_FLAGS)[0])
    b = load_spec(EXAMPLES / "baseline.yaml")
    assert s.layer_kinds() == b.layer_kinds() and s.model.global_every == 4
    assert s.attention.local.window == b.attention.local.window == 128
    assert s.attention.local.position == b.attention.local.position
    assert s.attention.global_.position == b.attention.global_.position == GrapeA()
    assert s.moe.router == b.moe.router
    assert (s.moe.experts, s.moe.top_k, s.attention.local.heads, s.attention.local.kv_heads) == (64, 6, 16, 4)


def test_baseline_recipe_file_is_the_baseline():
    words = shlex.split((EXAMPLES / "baseline.megatron.txt").read_text(), comments=True)
    s, b = spec_from_dict(from_megatron(words)[0]), load_spec(EXAMPLES / "baseline.yaml")
    assert (s.model, s.attention, s.ffn, s.moe, s.precision) == (b.model, b.attention, b.ffn, b.moe, b.precision)
    assert s.data.seq_len == b.data.seq_len and s.data.tokenizer == b.data.tokenizer
    assert s.train.schedule == b.train.schedule and s.train.steps == b.train.steps
    # Megatron decays every matrix including the embedding: the one training difference
    assert s.train.optimizer.decay_embeddings and not b.train.optimizer.decay_embeddings


@pytest.mark.parametrize("name", ["baseline.yaml", "ablation-nope-global.yaml", "tiny.yaml", "bench-small.yaml",
                                  "bench-medium.yaml"])
def test_spec_to_megatron_and_back(name):
    a = load_spec(EXAMPLES / name)
    b = spec_from_dict(from_megatron(to_megatron(a))[0])
    assert b.layer_kinds() == a.layer_kinds()
    assert (b.attention.local, b.attention.global_) == (a.attention.local, a.attention.global_)
    assert b.moe == a.moe and b.model.d_model == a.model.d_model and b.ffn == a.ffn
    assert b.train.optimizer.lr == a.train.optimizer.lr and b.train.schedule == a.train.schedule


def test_from_to_from_preserves_the_recipe():
    first = spec_from_dict(from_megatron(BASELINE_FLAGS)[0])
    again = spec_from_dict(from_megatron(to_megatron(first))[0])
    assert again == first


def test_to_megatron_list_patterns_for_irregular_schedules():
    s = spec_from_dict({"model": {"n_layers": 6, "layer_kinds": ["global", "local", "local", "local", "local",
                                                                 "global"]}, "data": {"seq_len": 256}})
    flags = to_megatron(s)
    assert flags[flags.index("--window-attn-skip-freq") + 1] == "[0]+[1]*4+[0]"
    assert flags[flags.index("--no-rope-freq") + 1] == "[1]+[0]*4+[1]"
    assert spec_from_dict(from_megatron(flags)[0]).layer_kinds() == s.layer_kinds()


@pytest.mark.parametrize("d, match", [
    ({"attention": {"local": {"position": {"share": "layer"}}}}, r"attention\.local\.position\.share: GRAPE-M "
                                                                 r"frequencies per layer"),
    ({"attention": {"global": {"position": {"kind": "grape-a", "learnable": True}}}}, r"learnable ALiBi slopes"),
    ({"moe": {"router": {"bias_centering": True}}}, r"moe\.router\.bias_centering: zero-mean"),
    ({"attention": {"global": {"heads": 8}}}, r"attention\.global: local and global layers have different head "
                                              r"shapes"),
])
def test_to_megatron_refuses_what_no_flag_can_say(d, match):
    with pytest.raises(SpecError, match=match + r".*\(Megatron-LM has no flag for it\)"):
        to_megatron(spec_from_dict(d))
