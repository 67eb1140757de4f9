"""The training configuration: one frozen field per declared option (:mod:`.options`), with
the option's default, validated against its declaration when the config is made."""

from __future__ import annotations

import re
from dataclasses import field, make_dataclass

from ..optimizers import OPTIMIZERS
from .options import ALPHA_IS_RANK, BY_NAME, DECLARED, DTYPES

__all__ = ["DTYPES", "TrainConfig"]

_TYPES = {"INT": int, "FLOAT": float, "BOOLEAN": bool, "COMBO": str, "STRING": str}


def _validate(self) -> None:
    for option in DECLARED:
        option.check(getattr(self, option.name))
    optimizer = OPTIMIZERS[self.optimizer]
    if self.lora_plus_ratio != 1.0 and optimizer.one_lr:
        raise ValueError(
            f"lora_plus_ratio={self.lora_plus_ratio:g} cannot be used with {self.optimizer}, "
            "which needs one learning rate for all parameters; set lora_plus_ratio to 1 or "
            "pick another optimizer.")
    if self.ema_decay > 0 and optimizer.train_mode:
        raise ValueError(
            f"ema_decay={self.ema_decay:g} with {self.optimizer}: schedule-free already returns "
            "an average of its iterates; set ema_decay to 0 or pick another optimizer.")
    for name in ("include", "exclude"):
        try:
            re.compile(getattr(self, name))
        except re.error as error:
            raise ValueError(
                f"{name}={getattr(self, name)!r} is not a valid regular expression ({error}); "
                "fix the pattern, e.g. 'attn' or 'transformer_blocks\\.0\\.'.") from None


def _adapter_alpha(self) -> float:
    """The alpha adapters are made with: ``alpha``; when it is 0 (the default), the rank for
    the algorithms of ``ALPHA_IS_RANK`` and 1 for the others."""
    if self.alpha:
        return float(self.alpha)
    return float(self.rank) if self.algorithm in ALPHA_IS_RANK else 1.0


def _help(cls, name: str) -> str:
    return BY_NAME[name].help


TrainConfig = make_dataclass(
    "TrainConfig",
    [(o.name, _TYPES[o.kind], field(default=o.default)) for o in DECLARED],
    frozen=True,
    namespace={"__post_init__": _validate, "adapter_alpha": property(_adapter_alpha),
               "help": classmethod(_help), "__module__": __name__,
               "__doc__": "Every declared option of a training run (see training/options.py)."},
)
