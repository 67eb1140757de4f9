"""Data-parallel training over ``torch.distributed`` (started by ``torchrun``).

Every process draws the same samples, noise and noise levels from the run's seed (all hold
the same generator), and each one runs its share of every micro-batch: the micro-batch of
``batch_size x world size`` samples is cut into contiguous shares, the first ones one sample
larger when it does not divide (a share may be empty). Each process scales its losses by the
step's total sample count, so after an all-reduce (sum) of the adapter gradients every
process holds the gradient of the whole step and takes the same optimizer step: W processes
with batch ``b`` train the LoRA of one process with batch ``W x b``.

The adapters' gradients are summed with one ``all_reduce`` over all of them laid end to end
rather than through ``DistributedDataParallel``: the adapters are forward patches on a model
DDP does not own, micro-batches may be empty on some ranks, and the loop already knows the
one point where the gradients are complete (before clipping and the optimizer step). One
call rather than one per tensor: on 2 gloo processes of the built-in TinyUNet that took the
all-reduce from 74 to 2 ms per step (``benchmarks/bench_distributed.py``).

A rank that fails tells the others at the next agreement point (after setting up, and after
every step's backward): they stop with an error naming it, and nothing is written.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, count: int) -> slice:
        """This rank's contiguous part of ``count`` samples."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def sum_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Every parameter's gradient summed over the ranks (a missing one counts as 0), in
        one all-reduce per device and dtype over the gradients laid end to end (one call
        instead of one per tensor: each collective costs a round trip)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in groups.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            start = 0
            for g in grads:
                g.copy_(flat[start:start + g.numel()].view_as(g))
                start += g.numel()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def failed_ranks(self, failed: bool, device: torch.device) -> list[int]:
        flags = torch.zeros(self.size, device=device)
        flags[self.rank] = float(failed)
        return [int(r) for r in self.sum(flags).nonzero().flatten().tolist()]

    @contextlib.contextmanager
    def together(self, what: str, device: torch.device) -> Iterator[None]:
        """Run the block on every rank; if it fails on any, stop on all: the failing rank
        raises its own error, the others a RuntimeError naming it."""
        error = None
        try:
            yield
        except BaseException as caught:  # every rank must reach the agreement below
            if not self.distributed:
                raise
            error = caught
        if not self.distributed:
            return
        failed = self.failed_ranks(error is not None, device)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(
                f"Rank {failed[0]} of {self.size} failed while {what}; rank {self.rank} stops "
                "too and nothing is written. See that rank's error above.")


SINGLE = World()


def from_environment() -> World:
    """The world ``torchrun`` describes (``RANK``, ``WORLD_SIZE``); one process otherwise."""
    import os

    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size) if size > 1 else SINGLE
