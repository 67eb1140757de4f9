"""Optimizers by the name the node shows; each takes ``(params, lr=...)``.

Defaults are torch's own (AdamW: betas (0.9, 0.999), weight decay 0.01). Adam and AdamW use
torch's fused kernel where this torch offers it for the parameters' device (one kernel for
all adapter tensors instead of a loop over them); otherwise the default implementation.
"""

from __future__ import annotations

from typing import Iterable

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}

_FUSED = {"AdamW", "Adam"}


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    params = list(params)
    if name in _FUSED:
        try:
            return OPTIMIZERS[name](params, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass  # this torch has no fused kernel for these parameters
    return OPTIMIZERS[name](params, lr=lr)


__all__ = ["OPTIMIZERS", "make_optimizer"]
