"""An exponential moving average of the adapter weights.

After every optimizer step ``shadow = decay * shadow + (1 - decay) * weight``, starting from
the weights before the first step; at the end the shadow replaces the weights, so the LoRA
returned and saved is the average (Polyak & Juditsky 1992; the EMA of diffusion training).
"""

from __future__ import annotations

from typing import Iterable

import torch


class EMA:
    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for shadow, param in zip(self.shadow, self.params):
            param.copy_(shadow)

    @torch.no_grad()
    def load(self, shadow: list[torch.Tensor]) -> None:
        """Continue from a saved shadow (a training state's)."""
        for mine, saved in zip(self.shadow, shadow):
            mine.copy_(saved)
