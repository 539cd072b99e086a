"""The learned GRAPE-M log-frequencies of a model, against their RoPE initialisation (for the ablation report)."""

from __future__ import annotations

import math

from compiler import GrapeModel
from runtime.optim import frequency_owner
from spec.schema import Spec

__all__ = ["grape_m_vectors"]


def grape_m_vectors(model: GrapeModel, spec: Spec) -> list[dict]:
    """Every GRAPE-M log-frequency vector of the model as ln(theta) and its RoPE initialisation ln(base^(-2j/D)).

    theta_j = exp(p_j / c) (MATH.md §2); the initial p_j gives theta_j = base^(-2j/D), j = 0..D/2-1.
    ``share: model`` gives one vector (``grape_m.log_freq``), ``share: layer`` one per rotating layer.
    """
    out = []
    for name, p in model.state_dict().items():
        if not name.endswith("grape_m.log_freq"):
            continue
        pos = frequency_owner(spec, name)
        half = p.numel()                                                      # D/2
        ln_init = [-2.0 * j / (2 * half) * math.log(pos.base) for j in range(half)]
        out.append({"name": name, "ln_theta": (p.double() / pos.log_freq_scale).tolist(), "ln_theta_init": ln_init,
                    "learnable": pos.learnable_freq})
    return out

