"""Which samples each micro-batch trains on, drawn from the run's generator."""

from __future__ import annotations

import torch


class EpochSampler:
    """Indices in shuffled epochs: every sample is seen once before any is seen twice."""

    def __init__(self, count: int, generator: torch.Generator) -> None:
        self.count = count
        self.generator = generator
        self._pending = torch.empty(0, dtype=torch.long)

    def take(self, n: int) -> torch.Tensor:
        while self._pending.numel() < n:
            epoch = torch.randperm(self.count, generator=self.generator)
            self._pending = torch.cat([self._pending, epoch])
        taken, self._pending = self._pending[:n], self._pending[n:]
        return taken
