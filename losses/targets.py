"""Prediction targets in a model's native space, in the k-diffusion form ComfyUI uses.

With sigma the noise level of a sample (see ``comfy/model_sampling.py``):

- eps and v models (SD1.x, SD2.x, SDXL): ``x_t = x0 + sigma * noise``; the network sees
  ``x_t / sqrt(sigma^2 + 1)``.
  - eps target: ``noise``.
  - v target: ``(noise - sigma * x0) / sqrt(sigma^2 + 1)``, which is
    ``sqrt(abar) * noise - sqrt(1 - abar) * x0`` (diffusers ``get_velocity``) with
    ``abar = 1 / (sigma^2 + 1)``.
- flow models (SD3, Flux, Wan, ...): ``x_t = sigma * noise + (1 - sigma) * x0`` and the
  target is the velocity ``noise - x0`` (Esser et al. 2024, "Scaling Rectified Flow
  Transformers"; diffusers, kohya and ComfyUI's CONST sampling agree).

Training on these targets weights every timestep as the model family was trained. Comparing
denoised x0 instead (what ComfyUI's built-in trainer does) multiplies the eps loss by
``sigma^2`` and the flow loss by ``sigma^2`` too, so low-noise timesteps barely train.
"""

from __future__ import annotations

from typing import Callable

import torch


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(kind: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _expand(sigma, x0)
    if kind == "flow":
        return s * noise + (1.0 - s) * x0
    return x0 + s * noise


def eps_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _expand(sigma, x0)
    return (noise - s * x0) / torch.sqrt(s * s + 1.0)


def flow_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return noise - x0


def denoised(kind: str, sigma: torch.Tensor, output: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """The denoised estimate of a raw ``output`` (ComfyUI ``calculate_denoised`` of EPS,
    V_PREDICTION with sigma_data 1, and CONST): ``x_t - sigma out`` for eps and flow,
    ``x_t / (sigma^2 + 1) - sigma out / sqrt(sigma^2 + 1)`` for v."""
    s = _expand(sigma, x_t)
    if kind == "v":
        return x_t / (s * s + 1) - output * s / torch.sqrt(s * s + 1)
    return x_t - output * s


TARGETS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "eps": eps_target,
    "v": v_target,
    "flow": flow_target,
}


def target_by_inversion(
    calculate_denoised: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    sigma: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
) -> torch.Tensor:
    """The raw output that makes ``calculate_denoised(sigma, output, x_t)`` equal ``x0``.

    For any parameterisation where the denoised estimate is affine in the network output
    (``denoised = a + b * output``, true of every ComfyUI ``model_sampling``), this is
    ``(x0 - a) / b``. Used for prediction types without a formula in :data:`TARGETS`.
    """
    x_t, x0 = x_t.double(), x0.double()
    sigma = sigma.double()
    a = calculate_denoised(sigma, torch.zeros_like(x_t), x_t)
    b = calculate_denoised(sigma, torch.ones_like(x_t), x_t) - a
    return ((x0 - a) / b).float()
