"""MoE routers: one class per router ``kind``, each holding its settings and its own rules.

``moe.router.kind`` names the router (only ``deepseek-v3`` today; it is the default, so a spec may
leave ``kind`` out). A router class is a frozen dataclass whose fields are the YAML keys of
``moe.router``; ``check`` states every rule its settings must satisfy (``spec.validate`` calls it,
so router settings are checked here and nowhere else), ``summary`` is its line in
``grapefx describe``, and ``megatron_flags`` / ``from_megatron`` translate it to and from
Megatron-LM flags (``spec.megatron``). A new router is a new class here plus an entry in
``ROUTERS``; the lowering (``compiler/lower/ffn.py``) and the expert-bias balancer
(``runtime/balance.py``) say what it computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from spec.fields import f

__all__ = ["DeepSeekV3Router", "ROUTERS", "divisors"]


@dataclass(frozen=True, kw_only=True)
class DeepSeekV3Router:
    """DeepSeek-V3 router (MATH.md §5): sigmoid scores, top-k over scores + expert bias, gates from
    the unbiased scores, the bias moved once per optimizer step toward equal loads."""
    kind: Literal["deepseek-v3"] = f("deepseek-v3", "router kind: deepseek-v3 (the only one today)")
    score_function: Literal["sigmoid", "softmax"] = f("sigmoid", "s = sigmoid(logits) (DSv3) or softmax")
    load_balancing: Literal["none", "seq_aux", "aux"] = f("none", "auxiliary loss: none (pure aux-free), seq_aux "
                                                                  "(DSv3), aux (Switch, for comparison)")
    aux_coeff: float = f(1e-4, "coefficient alpha of the seq_aux / aux loss (DSv3: 1e-4)")
    z_loss_coeff: float = f(0.0, "router z-loss coefficient (0 = off)")
    expert_bias: bool = f(True, "aux-loss-free balancing: top-k over s + b, gates from s (requires sigmoid)")
    bias_update_rate: float = f(1e-3, "gamma in b_i += gamma * sign(mean(c) - c_i), once per optimizer step")
    bias_freeze_after_steps: int | None = f(None, "stop updating b after this many optimizer steps (DSv3 froze it late)")
    bias_freeze_after_tokens: int | None = f(None, "stop updating b after this many training tokens")
    bias_centering: bool = f(False, "subtract the mean of each update so b stays zero-mean (torchtitan)")
    topk_scaling_factor: float = f(1.0, "gates are multiplied by this (DSv3: 2.5)")
    num_groups: int = f(1, "group-limited routing: split experts into this many groups (1 = off)", most=2**16)
    group_topk: int = f(1, "keep the best group_topk groups before the top-k", most=2**16)
    pre_softmax: bool = f(False, "softmax only: top-k after the softmax over all experts")
    dtype: Literal["fp32"] = f("fp32", "router logits, scores, bias and counts dtype (fp32 only: MATH.md §5)")

    def check(self, moe: Any, c: Any, p: tuple) -> None:
        """Every rule of these settings, given the ``moe`` section; ``c`` is the ``spec.validate`` checker
        (``err``, ``at_least``, ``positive``) and ``p`` the path of this section (``("moe", "router")``)."""
        mp = p[:-1]
        experts_ok = moe.experts >= 1 and moe.top_k >= 1
        if c.at_least(self, "num_groups", p, 1, "num_groups (1 = no group-limited routing)") and experts_ok:
            e, g = moe.experts, self.num_groups
            if e % g:
                c.err(p + ("num_groups",), f"{e} experts cannot be split into {g} equal groups (experts % num_groups "
                                           f"must be 0); use num_groups in {divisors(e)}", also=(mp + ("experts",),))
            elif c.at_least(self, "group_topk", p, 1):
                k, gk = moe.top_k, self.group_topk
                if gk > g:
                    c.err(p + ("group_topk",), f"keeps {gk} of {g} groups: group_topk must be <= num_groups",
                          also=(p + ("num_groups",),))
                elif k // gk < 1:
                    c.err(p + ("group_topk",), f"top_k // group_topk = {k} // {gk} = 0: each kept group is scored by "
                                               "its top (top_k // group_topk) experts, which must be >= 1; use "
                                               f"group_topk <= {k}", also=(mp + ("top_k",),))
                elif k > gk * (e // g):
                    c.err(p + ("group_topk",), f"the {gk} kept groups hold {gk * (e // g)} experts, fewer than "
                                               f"top_k = {k}; raise group_topk",
                          also=(mp + ("top_k",), mp + ("experts",), p + ("num_groups",)))
        if self.expert_bias and self.score_function != "sigmoid":
            c.err(p + ("expert_bias",), f"expert_bias needs score_function: sigmoid (MATH.md §5; Megatron refuses it "
                                        f"too): with {self.score_function} a per-expert offset reweights every expert; "
                                        "set score_function: sigmoid or expert_bias: false",
                  also=(p + ("score_function",),))
        if self.pre_softmax and self.score_function == "sigmoid":
            c.err(p + ("pre_softmax",), "pre_softmax means 'softmax over all experts before the top-k' and has no "
                                        "meaning with score_function: sigmoid; delete it (or use softmax)",
                  also=(p + ("score_function",),))
        if self.expert_bias:
            c.positive(self, "bias_update_rate", p, "bias_update_rate (gamma) with expert_bias on; to keep the bias "
                                                    "fixed use expert_bias: false")
        for k in ("bias_freeze_after_steps", "bias_freeze_after_tokens"):
            c.at_least(self, k, p, 1, k, optional=True)
        if self.bias_freeze_after_steps is not None and self.bias_freeze_after_tokens is not None:
            c.err(p + ("bias_freeze_after_tokens",), "give one freeze point: bias_freeze_after_steps or "
                                                     "bias_freeze_after_tokens, not both",
                  also=(p + ("bias_freeze_after_steps",),))
        if self.load_balancing != "none":
            c.positive(self, "aux_coeff", p, f"aux_coeff with load_balancing: {self.load_balancing} (to turn the "
                                             "loss off use load_balancing: none)")
        else:
            c.at_least(self, "aux_coeff", p, 0)
        c.at_least(self, "z_loss_coeff", p, 0, "z_loss_coeff (0 = off)")
        c.positive(self, "topk_scaling_factor", p)

    def megatron_flags(self, fail: Callable[[str, str], Exception]) -> list[str]:
        """Megatron-LM's flags for these settings; ``fail(key, what)`` is raised for what no flag can say."""
        from spec.megatron.flags import fmt_number

        fl = ["--moe-router-score-function", self.score_function, "--moe-router-load-balancing-type",
              {"none": "none", "aux": "aux_loss", "seq_aux": "seq_aux_loss"}[self.load_balancing]]
        if self.load_balancing != "none":
            fl += ["--moe-aux-loss-coeff", fmt_number(self.aux_coeff)]
        if self.z_loss_coeff:
            fl += ["--moe-z-loss-coeff", fmt_number(self.z_loss_coeff)]
        if self.expert_bias:
            fl += ["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", fmt_number(self.bias_update_rate)]
        for key in ("bias_freeze_after_steps", "bias_freeze_after_tokens"):
            if getattr(self, key) is not None:
                raise fail(f"moe.router.{key}", "a freeze point for the expert-bias updates")
        if self.bias_centering:
            raise fail("moe.router.bias_centering", "zero-mean expert-bias updates")
        if self.topk_scaling_factor != 1.0:
            fl += ["--moe-router-topk-scaling-factor", fmt_number(self.topk_scaling_factor)]
        if self.num_groups > 1:
            fl += ["--moe-router-num-groups", str(self.num_groups), "--moe-router-group-topk", str(self.group_topk)]
        if self.pre_softmax:
            fl.append("--moe-router-pre-softmax")
        return fl + ["--moe-router-dtype", "fp32"]

    @staticmethod
    def from_megatron(recipe: Any) -> dict:
        """The ``moe.router`` mapping of a Megatron-LM recipe; ``recipe`` is ``spec.megatron.importer``'s reader
        (``get``, ``has``, ``warn``, ``flags``)."""
        from spec.errors import SpecError
        from spec.megatron.patterns import RECIPE

        score = recipe.get("--moe-router-score-function", str)
        if score not in ("softmax", "sigmoid"):
            raise SpecError(RECIPE, "--moe-router-score-function", f"{score} is not modelled (softmax or sigmoid)")
        lb_vals = (recipe.flags.values.get("--moe-router-load-balancing-type") or ["aux_loss"])
        recipe.get("--moe-router-load-balancing-type", str)
        coeff_vals = recipe.flags.values.get("--moe-aux-loss-coeff") or ["0.0"]
        recipe.get("--moe-aux-loss-coeff", float)
        if len(lb_vals) > 1 or len(coeff_vals) > 1:
            raise SpecError(RECIPE, "--moe-router-load-balancing-type", f"{' '.join(lb_vals)}: combined load-balancing "
                                                                        "losses are not modelled; give one type")
        lb, coeff = lb_vals[0], float(coeff_vals[0])
        names = {"aux_loss": "aux", "seq_aux_loss": "seq_aux", "none": "none"}
        if lb not in names:
            raise SpecError(RECIPE, "--moe-router-load-balancing-type", f"{lb} is not modelled; grapefx has none, "
                                                                        "seq_aux_loss and aux_loss")
        balancing = names[lb]
        if balancing != "none" and coeff == 0:
            recipe.warn(f"--moe-router-load-balancing-type {lb} with --moe-aux-loss-coeff 0 (Megatron's defaults) adds "
                        "no loss: imported as load_balancing: none")
            balancing = "none"
        rate = recipe.get("--moe-router-bias-update-rate", float)
        bias = recipe.has("--moe-router-enable-expert-bias")
        if bias and rate == 0:
            recipe.warn("--moe-router-bias-update-rate 0 never moves the expert bias (it stays 0): imported as "
                        "expert_bias: false")
            bias = False
        pre = recipe.has("--moe-router-pre-softmax")
        if pre and score == "sigmoid":
            recipe.warn("--moe-router-pre-softmax does nothing with --moe-router-score-function sigmoid (it chooses "
                        "softmax-before-top-k); dropped")
            pre = False
        groups = recipe.get("--moe-router-num-groups", int)
        group_topk = recipe.get("--moe-router-group-topk", int)
        dtype = recipe.get("--moe-router-dtype", str)
        if dtype != "fp32":
            recipe.warn(f"--moe-router-dtype {dtype or 'unset (Megatron: the model dtype)'}: grapefx always computes "
                        "router logits, scores, bias and counts in fp32 (MATH.md §5)")
        z = recipe.get("--moe-z-loss-coeff", float)
        scale = recipe.get("--moe-router-topk-scaling-factor", float)
        return {
            "kind": "deepseek-v3", "score_function": score, "load_balancing": balancing,
            "aux_coeff": coeff if balancing != "none" else 1e-4,
            "z_loss_coeff": z if z is not None else 0.0, "expert_bias": bias, "bias_update_rate": rate,
            "topk_scaling_factor": scale if scale is not None else 1.0,
            "num_groups": groups if groups is not None else 1,
            "group_topk": group_topk if group_topk is not None else 1,
            "pre_softmax": pre, "dtype": "fp32",
        }

    def summary(self, top_k: int) -> str:
        """One line for ``grapefx describe``."""
        return (f"router: {self.kind}, {self.score_function} scores, top-{top_k}"
                + (f" in {self.group_topk} of {self.num_groups} groups" if self.num_groups > 1 else "")
                + f", load balancing {self.load_balancing}"
                + (f" (coeff {self.aux_coeff:g})" if self.load_balancing != "none" else "")
                + (f", expert bias on (rate {self.bias_update_rate:g}"
                   + (", centred" if self.bias_centering else "") + ")" if self.expert_bias else ", no expert bias")
                + f", gate scaling {self.topk_scaling_factor:g}, {self.dtype}")


def divisors(n: int) -> list[int]:
    """The divisors of n in increasing order, in O(sqrt n)."""
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


ROUTERS: dict[str, type] = {"deepseek-v3": DeepSeekV3Router}
