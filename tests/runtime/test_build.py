"""runtime.build.cuda_graphs: Inductor's CUDA graphs run only where they were verified (one process on
CUDA, compiled, no activation checkpointing); elsewhere the option is dropped and the reason given."""

import torch

from runtime.build import cuda_graphs
from spec import spec_from_dict

CUDA, CPU = torch.device("cuda"), torch.device("cpu")     # only inspected: no GPU needed


def spec(graphs=True, enabled=True, checkpointing=False):
    options = {"triton.cudagraphs": True, "max_autotune": False} if graphs else {"max_autotune": False}
    return spec_from_dict({"name": "t", "model": {"vocab_size": 257, "d_model": 32, "n_layers": 2, "global_every": None},
                           "attention": {"local": {"heads": 2, "kv_heads": 1, "head_dim": 16, "window": 8}},
                           "compile": {"enabled": enabled, "inductor_options": options,
                                       "activation_checkpointing": checkpointing}})


def test_one_process_on_cuda_keeps_them():
    s = spec()
    assert cuda_graphs(s, CUDA, 1) == (s, True, None)


def test_nothing_to_do_where_they_are_not_asked_for_or_cannot_run():
    for s, device in ((spec(graphs=False), CUDA), (spec(), CPU), (spec(enabled=False), CUDA)):
        assert cuda_graphs(s, device, 2) == (s, False, None)


def test_several_ranks_or_checkpointing_drop_them_and_say_why():
    built, on, note = cuda_graphs(spec(checkpointing=True), CUDA, 4)
    assert not on
    assert built.compile.inductor_options == {"max_autotune": False}          # the other options stay
    assert note == ("CUDA graphs (compile.inductor_options triton.cudagraphs) are off for this run: they are "
                    "verified for one process without activation checkpointing, and this run has several ranks "
                    "and activation checkpointing")
    assert cuda_graphs(spec(), CUDA, 2)[2].endswith("this run has several ranks")
