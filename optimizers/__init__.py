"""Optimizers by the name the node shows; each takes ``(params, lr=...)``.

Defaults are torch's own (AdamW: betas (0.9, 0.999), weight decay 0.01).
"""

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}

__all__ = ["OPTIMIZERS"]
