"""A run's training samples: latents of one or several sizes, with their loss masks.

Latents come as one tensor ``[N, C, ...]`` or as a list of such batches, of any sizes
(images ``[C, H, W]`` and video ``[C, T, H, W]`` may mix): sample ``i`` is the ``i``-th of
them in order. Samples of one shape form a bucket; a micro-batch always holds one shape.
A mask (ComfyUI's LATENT ``noise_mask``) weights each sample's loss per element.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def fit_mask(mask: torch.Tensor, latents: torch.Tensor, where: str) -> torch.Tensor:
    """``mask`` (``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``, B = 1 or one per latent, any
    resolution: ComfyUI's Set Latent Noise Mask stores pixel-sized ones) as one weight map per
    latent of ``latents`` (``[N, C, ..., h, w]``): ``[N, 1, ..., h, w]``, bilinear-resized to
    the latent, the same for every frame of a video latent."""
    if not isinstance(mask, torch.Tensor) or mask.ndim < 2 or not mask.is_floating_point():
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{where}: noise_mask must be a float tensor [B, 1, H, W]; got {got}. "
                         "Connect Set Latent Noise Mask's output.")
    count = latents.shape[0]
    flat = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    if flat.shape[0] not in (1, count):
        raise ValueError(
            f"{where}: noise_mask holds {flat.shape[0]} masks for {count} latents; give one "
            "mask for all or one per latent.")
    size = tuple(latents.shape[-2:])
    if tuple(flat.shape[-2:]) != size:
        flat = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    flat = flat.clamp(0, 1).expand(count, 1, *size)
    return flat.reshape(count, 1, *[1] * (latents.ndim - 4), *size).clone()


class LatentSet:
    """Samples from ``batches`` (tensors ``[n_i, C, ...]``) in order, with optional
    per-batch ``masks`` (``noise_mask`` tensors or None)."""

    def __init__(self, batches: Sequence[torch.Tensor],
                 masks: Sequence[torch.Tensor | None] | None = None) -> None:
        masks = list(masks) if masks is not None else [None] * len(batches)
        self.samples: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []
        for b, (batch, mask) in enumerate(zip(batches, masks)):
            fitted = None if mask is None else fit_mask(mask, batch, f"latents[{b}]")
            for i in range(batch.shape[0]):
                self.samples.append(batch[i])
                self.masks.append(None if fitted is None else fitted[i])
        for index, mask in enumerate(self.masks):
            if mask is not None and not bool(mask.gt(0).any()):
                raise ValueError(
                    f"The noise_mask of sample {index} is zero everywhere: it would train on "
                    "nothing. Paint the region to learn in the mask, or remove the mask.")
        self.buckets: dict[tuple[int, ...], list[int]] = {}
        for index, sample in enumerate(self.samples):
            self.buckets.setdefault(tuple(sample.shape), []).append(index)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def uniform(self) -> bool:
        """One shape for every sample."""
        return len(self.buckets) == 1

    @property
    def masked(self) -> bool:
        return any(mask is not None for mask in self.masks)

    def batch(self, samples: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.samples[int(i)] for i in samples])

    def mask(self, samples: torch.Tensor) -> torch.Tensor | None:
        """The samples' masks (ones where a sample has none), or None when none has one."""
        chosen = [self.masks[int(i)] for i in samples]
        if all(mask is None for mask in chosen):
            return None
        like = next(mask for mask in chosen if mask is not None)
        return torch.stack([torch.ones_like(like) if mask is None else mask for mask in chosen])

    def shape_text(self) -> str:
        return ", ".join(f"{len(indices)} x {list(shape)}" for shape, indices in
                         self.buckets.items())


class BucketSampler:
    """Micro-batches of one shape each, in shuffled epochs: every epoch shuffles each bucket
    (``buckets``: shape -> sample indices), cuts it into batches of ``batch_size`` (a
    bucket's last one may be smaller) and shuffles the order of all those batches; every
    sample is seen once per epoch. All draws come from ``generator``."""

    def __init__(self, buckets: dict, batch_size: int, generator: torch.Generator) -> None:
        self.buckets = [torch.tensor(indices) for indices in buckets.values()]
        self.batch_size = batch_size
        self.generator = generator
        self._pending: list[torch.Tensor] = []

    def take(self, count: int) -> list[torch.Tensor]:
        """The next ``count`` micro-batches."""
        while len(self._pending) < count:
            batches = []
            for indices in self.buckets:
                order = indices[torch.randperm(len(indices), generator=self.generator)]
                batches += list(order.split(self.batch_size))
            order = torch.randperm(len(batches), generator=self.generator).tolist()
            self._pending += [batches[i] for i in order]
        taken, self._pending = self._pending[:count], self._pending[count:]
        return taken

    def pending(self) -> torch.Tensor:
        """The pending micro-batches as one tensor: their sizes, then their indices."""
        sizes = torch.tensor([len(b) for b in self._pending], dtype=torch.long)
        flat = torch.cat(self._pending) if self._pending else torch.empty(0, dtype=torch.long)
        return torch.cat([torch.tensor([len(self._pending)]), sizes, flat])

    def restore(self, pending: torch.Tensor) -> None:
        count = int(pending[0])
        sizes = pending[1:1 + count].tolist()
        flat = pending[1 + count:]
        self._pending = list(flat.split(sizes)) if count else []
