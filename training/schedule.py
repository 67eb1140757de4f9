"""The learning rate at each optimizer step: warm-up, then constant, linear or cosine.

``factor(step, config, planned)`` is the multiplier of ``learning_rate`` at optimizer step
``step`` (1-based) of a schedule planned over ``planned`` steps (``config.steps`` unless given:
a resumed run plans over its previous steps plus its own). Warm-up is linear from 0: step ``k <= warmup_steps`` uses ``k / (warmup_steps + 1)``
(so no step is wasted at 0). After it, with ``p`` going from 0 at the first step after the
warm-up to 1 at the last step and ``m = min_lr_ratio``:

- constant: 1;
- linear: ``m + (1 - m) (1 - p)``;
- cosine: ``m + (1 - m) (1 + cos(pi p)) / 2`` (Loshchilov & Hutter 2017, SGDR, without
  restarts).
"""

from __future__ import annotations

import math


def factor(step: int, config, planned: int | None = None) -> float:
    planned = config.steps if planned is None else planned
    warmup = config.warmup_steps
    if step <= warmup:
        return step / (warmup + 1)
    if config.lr_schedule == "constant":
        return 1.0
    after = planned - warmup
    progress = (step - warmup - 1) / (after - 1) if after > 1 else 1.0
    floor = config.min_lr_ratio
    if config.lr_schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
