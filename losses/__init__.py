"""Loss functions, by the name the node shows, and the prediction targets they compare with.

Every loss is elementwise on the residual, averaged over each sample's elements and then
over the batch. Huber and SmoothL1 use a threshold of 1.0 (torch's defaults).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .targets import TARGETS, add_noise, target_by_inversion

LOSSES = {
    "MSE": lambda p, t: F.mse_loss(p, t, reduction="none"),
    "L1": lambda p, t: F.l1_loss(p, t, reduction="none"),
    "Huber": lambda p, t: F.huber_loss(p, t, reduction="none", delta=1.0),
    "SmoothL1": lambda p, t: F.smooth_l1_loss(p, t, reduction="none", beta=1.0),
}


def per_sample_loss(name: str, prediction: torch.Tensor, target: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each sample (mean over its elements), computed in float32.

    ``mask`` (broadcastable to the prediction, one per sample, >= 0) weights the elements:
    each sample's loss is then the mask-weighted mean, so a zero region adds nothing (and
    gets no gradient) and the loss keeps the scale of an unmasked one."""
    elementwise = LOSSES[name](prediction.float(), target.float())
    if mask is None:
        return elementwise.flatten(1).mean(dim=1)
    weights = mask.to(elementwise.device, torch.float32).expand_as(elementwise)
    return (elementwise * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1)


__all__ = ["LOSSES", "TARGETS", "add_noise", "per_sample_loss", "target_by_inversion"]
