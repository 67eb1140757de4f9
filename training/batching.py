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

    def pending(self) -> torch.Tensor:
        """The indices of the current epoch not taken yet (for a training state)."""
        return self._pending.clone()

    def restore(self, pending: torch.Tensor) -> None:
        if pending.numel() and (int(pending.min()) < 0 or int(pending.max()) >= self.count):
            raise ValueError(
                f"The training state's data order indexes samples up to {int(pending.max())}; "
                f"this run has {self.count}. Resume with the same dataset.")
        self._pending = pending.to(torch.long).clone()
