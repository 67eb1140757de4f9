"""Autocast's state, read and re-entered the same way on every torch the pack supports
(2.3 and later; the per-device ``torch.get_autocast_dtype`` and
``torch.is_autocast_enabled(device)`` came in 2.4)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_DEVICES = ("cpu", "cuda")


def autocast_dtype(kind: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls and convolutions in on device type ``kind``
    (``cpu``, ``cuda``), None where it is off."""
    try:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    except (AttributeError, TypeError):  # torch < 2.4
        if kind == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def autocast_state() -> dict[str, torch.dtype | None]:
    """What :func:`autocast_as` re-enters: each device type's autocast dtype, or None."""
    return {kind: autocast_dtype(kind) for kind in _DEVICES}


@contextlib.contextmanager
def autocast_as(state: dict[str, torch.dtype | None]) -> Iterator[None]:
    """Run under the autocast ``state`` (from :func:`autocast_state`), whatever is on now."""
    with contextlib.ExitStack() as stack:
        for kind, dtype in state.items():
            if dtype is not None:
                stack.enter_context(torch.autocast(kind, dtype=dtype))
            elif autocast_dtype(kind) is not None:
                stack.enter_context(torch.autocast(kind, enabled=False))
        yield
