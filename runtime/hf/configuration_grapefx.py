"""GrapefxConfig: the architecture of a grapefx model, for Hugging Face ``transformers``.

Written into an export folder by ``grapefx export RUN --out DIR --format hf`` (from the one
template in grapefx's ``runtime/hf/``) and loaded with ``trust_remote_code=True``. Plain data:
every field is JSON, read by ``modeling_grapefx.py`` of the same ``MODELING_VERSION``.

    vocab_size            embedding rows (the tokenizer's vocabulary padded up; the logits have this width)
    tokenizer_vocab_size  ids the tokenizer can produce (ids at or above it are padding, never generated)
    hidden_size           residual width C;  num_hidden_layers  L;  rms_norm_eps
    layer_kinds           per layer "local" (sliding window) or "global" (full causal)
    layer_types           the same as transformers' cache names ("sliding_attention" / "full_attention")
    sliding_window        W of the local layers: keys including the current token (query i sees i-W+1..i)
    attention             {"local": A, "global": A}, A = {mechanism: gqa | tpa, heads, kv_heads, head_dim,
                          window, position, tpa}; position = {kind: grape-m, share: model | layer,
                          log_freq_scale, base} | {kind: grape-a, learnable, slopes: [m_h]} |
                          {kind: rope, base} | {kind: nope}; tpa = {head_factors: heads | kv_groups,
                          r_q, r_k, r_v} (null for gqa)
    qk_norm               RMSNorm of q and k per head before the rotation (GQA)
    tied_embeddings       the LM head reads the embedding matrix
    ffn_kinds             per layer "moe" or "dense";  ffn_hidden  the dense SwiGLU width
    moe                   null, or {experts, top_k, shared_experts, expert_hidden, router: {score_function,
                          pre_softmax, expert_bias, topk_scaling_factor, num_groups, group_topk}}
    max_position_embeddings  the training context (tools such as lm-evaluation-harness read it as
                          their default maximum length; the model itself has no length limit)
    grapefx               where the weights came from: {name, version, run, step}
"""

from transformers import PretrainedConfig

MODELING_VERSION = "1"


class GrapefxConfig(PretrainedConfig):
    model_type = "grapefx"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size=320, tokenizer_vocab_size=257, hidden_size=128, num_hidden_layers=1,
                 layer_kinds=None, attention=None, qk_norm=False, rms_norm_eps=1e-6, tied_embeddings=False,
                 ffn_kinds=None, ffn_hidden=256, moe=None, max_position_embeddings=2048, sliding_window=None,
                 layer_types=None, grapefx=None, grapefx_modeling_version=MODELING_VERSION, **kwargs):
        if str(grapefx_modeling_version) != MODELING_VERSION:
            raise ValueError(f"config.json was written for grapefx modeling version {grapefx_modeling_version}, "
                             f"but configuration_grapefx.py is version {MODELING_VERSION}; export the model again "
                             "so that the files match")
        self.vocab_size = vocab_size
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.layer_kinds = list(layer_kinds or ["global"] * num_hidden_layers)
        self.layer_types = list(layer_types or ["sliding_attention" if k == "local" else "full_attention"
                                                for k in self.layer_kinds])
        self.sliding_window = sliding_window
        self.attention = attention or {}
        self.qk_norm = qk_norm
        self.rms_norm_eps = rms_norm_eps
        self.tied_embeddings = tied_embeddings
        self.ffn_kinds = list(ffn_kinds or ["dense"] * num_hidden_layers)
        self.ffn_hidden = ffn_hidden
        self.moe = moe
        self.max_position_embeddings = max_position_embeddings
        self.grapefx = grapefx or {}
        self.grapefx_modeling_version = MODELING_VERSION
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs["tie_word_embeddings"] = False          # the model reads the embedding itself when tied
        super().__init__(**kwargs)
