"""Every validation rule, with its message (file, key path, value, rule, fix)."""

import time

import pytest

from spec import SpecError, SpecProblems, spec_from_dict

ESCAPE = r"or set attention\.allow_position_mismatch: true"

RULES = [
    # --- model and schedule
    ({"model": {"vocab_size": 0}}, r"model\.vocab_size: 0 is too small: vocab_size must be >= 1"),
    ({"model": {"pad_vocab_to": 0}}, r"model\.pad_vocab_to: 0 is too small"),
    ({"model": {"d_model": 0}}, r"model\.d_model: 0 is too small: d_model must be >= 1"),
    ({"model": {"n_layers": 0}}, r"model\.n_layers: 0 is too small"),
    ({"model": {"norm_eps": 0.0}}, r"model\.norm_eps: 0\.0 is not allowed: the RMSNorm epsilon must be > 0"),
    ({"model": {"init": {"std": -1.0}}}, r"model\.init\.std: -1\.0 is not allowed"),
    ({"model": {"global_every": 4, "layer_kinds": ["local"] * 3 + ["global"]}},
     r"model\.layer_kinds: model\.global_every \(4\) and model\.layer_kinds both say which layers are global; keep "
     r"one: delete layer_kinds, or set `global_every: null`"),
    ({"model": {"global_every": 0}}, r"model\.global_every: 0 is not a period: layer l \(from 1\) is global iff "
                                     r"l % global_every == 0"),
    ({"model": {"n_layers": 4, "global_every": 8}},
     r"^my\.yaml: model\.global_every: global_every 8 places no global layer in a 4-layer model \(layer l is global iff l % 8 == 0, "
     r"and no l in 1\.\.4 is\): use global_every <= 4, or null for no global layers$"),
    ({"model": {"n_layers": 4, "layer_kinds": ["local", "global"]}},
     r"model\.layer_kinds: 2 kinds for n_layers = 4: give exactly one kind"),
    ({"model": {"n_layers": 2, "layer_kinds": ["local", "globl"]}},
     r"model\.layer_kinds\.1: layer 2: 'globl' is not a layer kind; use local or global - did you mean 'global'\?"),
    # --- attention shapes
    ({"attention": {"local": {"heads": 12, "kv_heads": 5}}},
     r"attention\.local\.kv_heads: 12 query heads cannot be shared evenly by 5 kv heads \(GQA: .*heads % kv_heads "
     r"must be 0\); use kv_heads in \[1, 2, 3, 4, 6, 12\]"),
    ({"attention": {"global": {"kv_heads": 0}}}, r"attention\.global\.kv_heads: 0 is too small: kv heads must be >= 1"),
    ({"attention": {"local": {"head_dim": 63}}},
     r"attention\.local\.head_dim: 63 is odd: the grape-m rotation pairs coordinate i with i \+ head_dim/2"),
    ({"attention": {"local": {"r_q": 4}}},
     r"attention\.local\.r_q: r_q applies to mechanism tpa only \(MATH\.md §4\); delete it or set "
     r"attention\.local\.mechanism: tpa"),
    ({"attention": {"local": {"mechanism": "tpa", "r_k": 0}}}, r"attention\.local\.r_k: 0 is too small: the TPA rank"),
    ({"model": {"qk_norm": True}, "attention": {"local": {"mechanism": "tpa"}}},
     r"attention\.local\.mechanism: tpa with model\.qk_norm: TPA rotates the B factors before the contraction"),
    # --- windows
    ({"attention": {"local": {"window": None}}}, r"attention\.local\.window: local layers need a window"),
    ({"attention": {"local": {"window": 0}}}, r"attention\.local\.window: 0 keys is not a window: .* W >= 1"),
    ({"attention": {"global": {"window": 64}}},
     r"attention\.global\.window: global layers attend to the whole causal context; a window \(64\) is only for "
     r"local layers"),
    ({"data": {"seq_len": 64}}, r"data\.seq_len: a 128-key window never binds in a 64-token context .* data\.seq_len "
                                r"must be >= attention\.local\.window"),
    # --- positions: parameters and the position rule
    ({"attention": {"local": {"position": {"base": 1.0}}}}, r"attention\.local\.position\.base: 1\.0 is not a "
                                                            r"usable base: .* base > 1"),
    ({"attention": {"local": {"position": {"log_freq_scale": 0.0}}}}, r"position\.log_freq_scale: 0\.0: .* c > 0"),
    ({"attention": {"global": {"position": {"kind": "rope"}}}},
     r"attention\.global\.position\.kind: rope rotates q and k, but by the position rule global layers never "
     r"rotate .*: use grape-a \(ALiBi bias\) or nope, " + ESCAPE),
    ({"attention": {"global": {"position": {"kind": "grape-m"}}}},
     r"attention\.global\.position\.kind: grape-m rotates"),
    ({"attention": {"local": {"position": {"kind": "grape-a"}}}},
     r"attention\.local\.position\.kind: grape-a \(the ALiBi bias\) appears only on global layers by the "
     r"position rule .* " + ESCAPE),
    ({"attention": {"local": {"position": {"kind": "nope"}}}},
     r"attention\.local\.position\.kind: nope: local layers rotate by the position rule .* " + ESCAPE),
    ({"attention": {"allow_position_mismatch": True, "global": {"position": {"kind": "grape-m", "base": 500.0}}}},
     r"attention\.global\.position: both layer kinds use GRAPE-M with share: model, .* make them equal, or use "
     r"share: layer"),
    # --- MoE and router
    ({"moe": {"experts": 4, "top_k": 5}}, r"moe\.top_k: top_k = 5 picks more experts than exist \(experts = 4\); "
                                          r"use top_k <= 4"),
    ({"moe": {"experts": 0}}, r"moe\.experts: 0 is too small: routed experts must be >= 1"),
    ({"moe": {"shared_experts": -1}}, r"moe\.shared_experts: -1 is too small: shared experts \(0 = none\) must be "
                                     r">= 0"),
    ({"moe": {"expert_hidden": 0}}, r"moe\.expert_hidden: 0 is too small"),
    ({"moe": {"first_k_dense": 5}}, r"moe\.first_k_dense: 5 dense layers in a 4-layer model: first_k_dense must be "
                                    r"in 0\.\.4"),
    ({"moe": {"experts": 8, "router": {"num_groups": 3}}},
     r"moe\.router\.num_groups: 8 experts cannot be split into 3 equal groups .* use num_groups in \[1, 2, 4, 8\]"),
    ({"moe": {"experts": 8, "router": {"num_groups": 2, "group_topk": 3}}},
     r"moe\.router\.group_topk: keeps 3 of 2 groups: group_topk must be <= num_groups"),
    ({"moe": {"experts": 8, "top_k": 2, "router": {"num_groups": 4, "group_topk": 3}}},
     r"moe\.router\.group_topk: top_k // group_topk = 2 // 3 = 0: .* use group_topk <= 2"),
    ({"moe": {"experts": 8, "top_k": 3, "router": {"num_groups": 4, "group_topk": 1}}},
     r"moe\.router\.group_topk: the 1 kept groups hold 2 experts, fewer than top_k = 3; raise group_topk"),
    ({"moe": {"router": {"score_function": "softmax", "expert_bias": True}}},
     r"moe\.router\.expert_bias: expert_bias needs score_function: sigmoid .* set score_function: sigmoid or "
     r"expert_bias: false"),
    ({"moe": {"router": {"pre_softmax": True}}},
     r"moe\.router\.pre_softmax: pre_softmax means 'softmax over all experts before the top-k' and has no meaning "
     r"with score_function: sigmoid"),
    ({"moe": {"router": {"bias_update_rate": 0.0}}},
     r"moe\.router\.bias_update_rate: 0\.0 is not allowed: bias_update_rate \(gamma\) with expert_bias on"),
    ({"moe": {"router": {"bias_freeze_after_steps": 10, "bias_freeze_after_tokens": 1000}}},
     r"moe\.router\.bias_freeze_after_tokens: give one freeze point"),
    ({"moe": {"router": {"bias_freeze_after_steps": 0}}}, r"moe\.router\.bias_freeze_after_steps: 0 is too small"),
    ({"moe": {"router": {"load_balancing": "seq_aux", "aux_coeff": 0.0}}},
     r"moe\.router\.aux_coeff: 0\.0 is not allowed: aux_coeff with load_balancing: seq_aux \(to turn the loss off "
     r"use load_balancing: none\)"),
    ({"moe": {"router": {"z_loss_coeff": -1.0}}}, r"moe\.router\.z_loss_coeff: -1\.0 is too small"),
    ({"moe": {"router": {"topk_scaling_factor": 0.0}}}, r"moe\.router\.topk_scaling_factor: 0\.0 is not allowed"),
    ({"ffn": {"hidden": 0}}, r"ffn\.hidden: 0 is not allowed: the dense FFN hidden width must be > 0"),
    # --- compile, data
    ({"compile": {"passes": ["bias_softmx"]}}, r"compile\.passes\.0: unknown pass 'bias_softmx' - did you mean "
                                               r"'bias_softmax'\?"),
    ({"compile": {"passes": ["bias_softmax", "bias_softmax"]}}, r"compile\.passes\.1: pass 'bias_softmax' is listed "
                                                                r"twice"),
    ({"data": {"sources": []}}, r"data\.sources: no data sources"),
    ({"data": {"sources": [{"path": "x.txt", "weight": 0.0}]}}, r"data\.sources\.0\.weight: 0\.0 is not allowed"),
    ({"data": {"valid_fraction": 1.0}}, r"data\.valid_fraction: 1\.0 is not a fraction of documents"),
    ({"data": {"tokenizer": {"kind": "byte", "vocab_size": 500}}},
     r"data\.tokenizer\.vocab_size: vocab_size applies to kind: bpe only"),
    ({"model": {"vocab_size": 256}}, r"model\.vocab_size: 256 is smaller than the byte tokenizer's 257 ids \(256 "
                                     r"bytes \+ end-of-document\): set model\.vocab_size: 257"),
    ({"data": {"tokenizer": {"kind": "bpe"}}}, r"data\.tokenizer\.vocab_size: a bpe tokenizer needs exactly one of "
                                               r"vocab_size .* or path"),
    ({"data": {"tokenizer": {"kind": "bpe", "vocab_size": 4096, "path": "t.json"}}}, r"needs exactly one of"),
    ({"data": {"tokenizer": {"kind": "bpe", "vocab_size": 200}}}, r"data\.tokenizer\.vocab_size: 200 leaves no room "
                                                                  r"for merges"),
    ({"model": {"vocab_size": 1000}, "data": {"tokenizer": {"kind": "bpe", "vocab_size": 4096}}},
     r"model\.vocab_size: 1000 is smaller than the tokenizer's 4096 ids"),
    # --- train
    ({"train": {"micro_batch": 8, "global_batch": 12}},
     r"train\.global_batch: 12 sequences cannot be made of whole micro-batches of 8: global_batch must be a "
     r"multiple of micro_batch \(e\.g\. 8 or 16\)"),
    ({"train": {"steps": 0}}, r"train\.steps: 0 is too small"),
    ({"train": {"optimizer": {"lr": 0.0}}},
     r"train\.optimizer\.lr: 0\.0 is not allowed: the learning rate must be > 0"),
    ({"train": {"optimizer": {"betas": [0.9, 1.0]}}}, r"train\.optimizer\.betas\.1: 1\.0: AdamW betas must be in "
                                                      r"\[0, 1\)"),
    ({"train": {"optimizer": {"eps": 0.0}}}, r"train\.optimizer\.eps: 0\.0 is not allowed"),
    ({"train": {"optimizer": {"weight_decay": -0.1}}}, r"train\.optimizer\.weight_decay: -0\.1 is too small"),
    ({"train": {"schedule": {"warmup_steps": -1}}}, r"train\.schedule\.warmup_steps: -1 is too small"),
    ({"train": {"schedule": {"min_lr_ratio": 2.0}}}, r"train\.schedule\.min_lr_ratio: 2\.0: .* 0 <= min_lr_ratio <= 1"),
    ({"train": {"grad_clip": 0.0}}, r"train\.grad_clip: 0\.0 is not allowed: grad_clip \(null = no clipping\)"),
    ({"train": {"log_every": 0}}, r"train\.log_every: 0 is too small"),
    # --- parallel
    ({"moe": {"experts": 8}, "parallel": {"expert": 3}},
     r"parallel\.expert: 8 experts cannot be split evenly over 3 ranks \(rank e holds experts \[e\*X/E, "
     r"\(e\+1\)\*X/E\), so moe\.experts % expert must be 0\); use expert in \[1, 2, 4, 8\]"),
    ({"parallel": {"expert": 0}}, r"parallel\.expert: 0 is too small: expert parallelism E \(1 = off\) must be >= 1"),
    ({"moe": None, "parallel": {"expert": 2}}, r"parallel\.expert: expert: 2 splits the routed experts over ranks, "
                                                r"but this model has none"),
    ({"parallel": {"capacity_factor": 0.0}}, r"parallel\.capacity_factor: 0\.0 is not allowed: capacity_factor "
                                             r"\(null = dropless\) must be > 0"),
    ({"name": "runs/x"}, r"name: 'runs/x' is not a usable run name"),
    ({"output": " "}, r"output: empty output folder"),
]


@pytest.mark.parametrize("d, match", RULES, ids=[m[:40] for _, m in RULES])
def test_rule_message(d, match):
    with pytest.raises(SpecError, match=match):
        spec_from_dict(d, file="my.yaml")


def test_every_message_is_file_key_message():
    with pytest.raises(SpecProblems) as e:
        spec_from_dict({"attention": {"local": {"heads": 6, "kv_heads": 4}}, "train": {"optimizer": {"lr": 0.0}}},
                       file="my.yaml")
    lines = str(e.value).splitlines()
    assert len(e.value.problems) == 2 and len(lines) == 2
    assert lines[0].startswith("my.yaml: attention.local.kv_heads: 6 query heads")
    assert lines[1].startswith("my.yaml: train.optimizer.lr: 0.0 is not allowed")


@pytest.mark.parametrize("d", [
    {},
    {"attention": {"global": {"position": {"kind": "nope"}}}},                 # the follow-up ablation
    {"attention": {"allow_position_mismatch": True, "global": {"position": {"kind": "rope"}},
                   "local": {"position": {"kind": "nope"}}}},                  # the escape hatch
    {"attention": {"local": {"mechanism": "tpa", "head_factors": "kv_groups", "r_q": 4}}},
    {"moe": None},
    {"moe": {"experts": 8}, "parallel": {"data": "fsdp", "expert": 4, "capacity_factor": 1.25}},
    {"model": {"n_layers": 2, "layer_kinds": ["global", "global"]}, "data": {"seq_len": 16}},
    {"moe": {"experts": 8, "top_k": 4, "router": {"num_groups": 4, "group_topk": 2}}},
    {"moe": {"router": {"score_function": "softmax", "expert_bias": False, "pre_softmax": True,
                        "load_balancing": "aux", "aux_coeff": 0.01}}},
])
def test_valid_specs(d):
    spec_from_dict(d)


# ----------------------------------------------------------------------------- bounded sizes
def test_sizes_are_bounded_before_any_rule_runs():
    # 2^40 layers used to take minutes (one entry per layer); now the bound answers at once, and the
    # rules that would loop over the size (here: layer_kinds against n_layers) do not run
    t0 = time.perf_counter()
    with pytest.raises(SpecProblems) as e:
        spec_from_dict({"model": {"n_layers": 2**40}, "attention": {"local": {"heads": 10**7}},
                        "moe": {"expert_hidden": 2**40}}, file="my.yaml")
    assert time.perf_counter() - t0 < 0.5
    bound = "(grapefx bounds every size so that checking and counting a spec stay instant; real models stay far below it)"
    assert str(e.value).splitlines() == [
        f"my.yaml: model.n_layers: 1,099,511,627,776 is too large: n_layers must be <= 4,096 {bound}",
        f"my.yaml: attention.local.heads: 10,000,000 is too large: heads must be <= 1,024 {bound}",
        f"my.yaml: moe.expert_hidden: 1,099,511,627,776 is too large: expert_hidden must be <= 1,048,576 {bound}",
    ]


def test_the_largest_sizes_validate_quickly():
    t0 = time.perf_counter()
    with pytest.raises(SpecProblems, match=r"kv_heads: 1024 query heads cannot be shared evenly by 1023 kv heads .* "
                                           r"use kv_heads in \[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024\]"):
        spec_from_dict({"model": {"n_layers": 4096, "global_every": 4096, "d_model": 2**16},
                        "attention": {"local": {"heads": 1024, "kv_heads": 1023}}}, file="my.yaml")
    assert time.perf_counter() - t0 < 0.5


def test_nan_is_never_in_range():
    with pytest.raises(SpecProblems, match=r"moe\.router\.z_loss_coeff: nan is too small: z_loss_coeff \(0 = off\) "
                                           r"must be >= 0"):
        spec_from_dict({"moe": {"router": {"z_loss_coeff": float("nan")}}})
