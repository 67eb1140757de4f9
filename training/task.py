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


class DiffusionTask(Protocol):
    network: nn.Module  # the module tree that receives adapters
    key_prefix: str  # prefix of the saved keys, e.g. "diffusion_model."
    device: torch.device

    def prepare_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the model's sampler feeds them (e.g. scaled by the latent format)."""

    def sample_sigmas(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` noise levels (CPU, float32) drawn from ``generator``."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        ...

    def target(self, x0, noise, sigma, x_t) -> torch.Tensor:
        """What the raw network output should equal (native prediction space)."""

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """The raw network output for ``x_t`` with the conditioning of dataset ``samples``."""

    def session(self, patches: ForwardPatches) -> ContextManager:
        """Install ``patches`` on the network for the run and remove them afterwards."""


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
    nearest; flow networks see ``x_t`` and ``1000 * sigma``. Sigmas are drawn uniformly from
    the ``sigmas`` table. ``context`` holds one conditioning per dataset sample.
    """

    key_prefix = "diffusion_model."

    def __init__(
        self, network: nn.Module, prediction: str, sigmas: torch.Tensor, context: torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> None:
        if prediction not in TARGETS:
            raise ValueError(f"prediction {prediction!r} must be one of {', '.join(TARGETS)}.")
        self.network = network
        self.prediction = prediction
        self.sigmas = sigmas.float().cpu()
        self.context = context
        self.device = torch.device(device)

    def prepare_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def sample_sigmas(self, count: int, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(self.sigmas), (count,), generator=generator)
        return self.sigmas[index]

    def add_noise(self, x0, noise, sigma):
        return add_noise(self.prediction, x0, noise, sigma)

    def target(self, x0, noise, sigma, x_t):
        return TARGETS[self.prediction](x0, noise, sigma)

    def model_input(self, x_t: torch.Tensor, sigma: torch.Tensor):
        s = sigma.to(x_t.device, torch.float32)
        if self.prediction == "flow":
            return x_t, s * 1000.0
        scaled = x_t / torch.sqrt(s * s + 1.0).reshape(-1, *([1] * (x_t.ndim - 1)))
        log_table = self.sigmas.to(x_t.device).log()
        timestep = (s.log()[:, None] - log_table[None]).abs().argmin(dim=1).float()
        return scaled, timestep

    def predict(self, x_t, sigma, samples):
        x_in, timestep = self.model_input(x_t, sigma)
        context = self.context[samples.cpu()].to(x_t.device)
        return self.network(x_in, timestep, context)

    @contextlib.contextmanager
    def session(self, patches: ForwardPatches) -> Iterator[None]:
        with patches:
            yield
