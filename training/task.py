"""What the training loop needs from a model family, and its plain-PyTorch implementation.

A :class:`DiffusionTask` hides where a model comes from: the ComfyUI bridge in ``nodes/``
implements it over a ModelPatcher, :class:`TorchTask` over any ``nn.Module`` that takes
``(x, timestep, context)``.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Protocol

import torch
from torch import nn

from ..lora.inject import ForwardPatches
from ..losses import TARGETS, add_noise
from ..losses.objective import ModelFacts
from ..losses.targets import denoised


class DiffusionTask(ModelFacts, Protocol):
    """A model's facts the objective reads (:class:`~lora_lab.losses.objective.ModelFacts`),
    and what the loop needs besides: the adapted network, latents and the forward."""

    network: nn.Module  # the module tree that receives adapters
    key_prefix: str  # prefix of the saved keys, e.g. "diffusion_model."
    device: torch.device
    can_drop_captions: bool  # an empty conditioning is known (for caption dropout)

    def prepare_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the model's sampler feeds them (e.g. scaled by the latent format)."""

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, samples: torch.Tensor,
                dropped: torch.Tensor | None = None) -> torch.Tensor:
        """The raw network output for ``x_t`` with the conditioning of dataset ``samples``
        (the empty conditioning where ``dropped``)."""

    def session(self, patches: ForwardPatches) -> ContextManager:
        """Install ``patches`` on the network for the run and remove them afterwards."""

    def for_data(self, conditioning, latents: torch.Tensor) -> "DiffusionTask":
        """A view of this task (same network, same session) with other conditioning, one
        entry per latent of ``latents`` (or, in ComfyUI, one for all): for validation data."""


def discrete_vp_sigmas(
    steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """The SD1.x "scaled linear" schedule as k-diffusion sigmas, ``sqrt((1-abar)/abar)``."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


def flow_sigmas(steps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """Rectified-flow noise levels t = i/steps with the SD3 shift ``a t / (1 + (a - 1) t)``."""
    t = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    return (shift * t / (1 + (shift - 1) * t)).float()


class TorchTask:
    """A plain ``nn.Module`` network ``network(x, timestep, context)``.

    eps/v networks see ``x_t / sqrt(sigma^2 + 1)`` and the discrete timestep whose sigma is
    nearest; flow networks see ``x_t`` and ``1000 * sigma``. ``sigmas`` is the table of
    noise levels. ``context`` holds one conditioning per dataset sample; ``empty_context``
    (one row) is the conditioning caption dropout trains with.
    """

    key_prefix = "diffusion_model."

    def __init__(
        self, network: nn.Module, prediction: str, sigmas: torch.Tensor, context: torch.Tensor,
        device: torch.device | str = "cpu", empty_context: torch.Tensor | None = None,
    ) -> None:
        if prediction not in TARGETS:
            raise ValueError(f"prediction {prediction!r} must be one of {', '.join(TARGETS)}.")
        self.network = network
        self.prediction = prediction
        self.sigmas = sigmas.float().cpu()
        self.sigma_table = self.sigmas
        self.context = context
        self.empty_context = empty_context
        self.can_drop_captions = empty_context is not None
        self.device = torch.device(device)

    def prepare_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def percent_to_sigma(self, percent: float) -> float:
        index = round((1 - percent) * (len(self.sigmas) - 1))
        return float(self.sigmas.sort().values[index])

    def add_noise(self, x0, noise, sigma):
        return add_noise(self.prediction, x0, noise, sigma)

    def denoise(self, sigma, output, x_t):
        return denoised(self.prediction, sigma, output, x_t)

    def model_input(self, x_t: torch.Tensor, sigma: torch.Tensor):
        s = sigma.to(x_t.device, torch.float32)
        if self.prediction == "flow":
            return x_t, s * 1000.0
        scaled = x_t / torch.sqrt(s * s + 1.0).reshape(-1, *([1] * (x_t.ndim - 1)))
        log_table = self.sigmas.to(x_t.device).log()
        timestep = (s.log()[:, None] - log_table[None]).abs().argmin(dim=1).float()
        return scaled, timestep

    def predict(self, x_t, sigma, samples, dropped=None):
        x_in, timestep = self.model_input(x_t, sigma)
        context = self.context[samples.cpu()]
        if dropped is not None and dropped.any():
            context = context.clone()
            context[dropped.cpu()] = self.empty_context.to(context.dtype)
        return self.network(x_in, timestep, context.to(x_t.device))

    def for_data(self, context: torch.Tensor, latents: torch.Tensor) -> "TorchTask":
        """The same network and noise levels with other conditioning (one row per latent)."""
        if context.shape[0] != latents.shape[0]:
            raise ValueError(f"context holds {context.shape[0]} rows for {latents.shape[0]} "
                             "latents; give one per latent.")
        return TorchTask(self.network, self.prediction, self.sigmas, context, self.device,
                         self.empty_context)

    @contextlib.contextmanager
    def session(self, patches: ForwardPatches) -> Iterator[None]:
        with patches:
            yield
