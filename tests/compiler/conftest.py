"""Small specs shared by the compiler tests."""

import pytest

from spec.schema import Attention, AttentionKinds, GrapeA, GrapeM, Model, MoE, NoPE, Router, Spec


def small_spec(*, global_position=None, learnable_freq=True, share="model", n_layers=4, moe=True,
               first_k_dense=0, window=4, **router) -> Spec:
    """4 layers (layer 4 global), C=32, Hq=4/Hkv=2, D=8, W=4, 4 experts top-2, vocab 64."""
    local = Attention(heads=4, kv_heads=2, head_dim=8, window=window,
                      position=GrapeM(learnable_freq=learnable_freq, share=share))
    glob = Attention(heads=4, kv_heads=2, head_dim=8, position=global_position or GrapeA())
    return Spec(
        model=Model(vocab_size=64, d_model=32, n_layers=n_layers, global_every=4),
        attention=AttentionKinds(local=local, global_=glob),
        moe=MoE(experts=4, top_k=2, shared_experts=1, expert_hidden=16, first_k_dense=first_k_dense,
                router=Router(**router)) if moe else None,
    )


@pytest.fixture
def make_spec():
    """The factory `small_spec(**overrides)`."""
    return small_spec
