"""The training objective, in one place: timestep sampling, noise, target and weighting.

A task (the ComfyUI bridge, :class:`~lora_lab.training.task.TorchTask`) exposes only facts of
its model: the prediction kind (``"eps"``, ``"v"``, ``"flow"`` or ``None`` for any other
parameterisation), its noise levels (an ascending ``sigma_table`` and/or a
``percent_to_sigma``), its noising (``add_noise``), its denoiser (``denoise``, for targets by
inversion) and the forward (``predict``). Everything a run chooses about the objective is
here, in the form of minRF (Ryu, "minRF", github.com/cloneofsimo/minRF): draw the timesteps,
noise the latents, take the prediction's native target, weight each sample's loss.

Timesteps are drawn as a fraction ``t`` in [0, 1) of the way from the least to the most noise
and read from the model's own noise levels: ``t`` picks an entry of the sigma table (so the
model's schedule and its shift apply), or ``sigma = percent_to_sigma(1 - t)`` where a model
has no table. Every distribution is a transform of a uniform draw, so a step's uniforms can be
stratified first and every distribution keeps its density.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from . import per_sample_loss
from .targets import TARGETS, target_by_inversion

TIMESTEP_SAMPLING = ("auto", "uniform", "logit_normal", "mode")
LOSS_WEIGHTINGS = ("auto", "none", "min_snr", "x0", "sigma_sqrt", "cosmap")
FLOW_ONLY_WEIGHTINGS = ("sigma_sqrt", "cosmap")
PREDICTIONS = tuple(TARGETS)

# What "auto" means per prediction kind, chosen by the sample-quality benchmark
# (benchmarks/bench_quality.py; figures in README "How training works").
AUTO = "auto"
AUTO_CHOICES: dict[str, dict[str | None, str]] = {
    "loss_weighting": {"eps": "x0", "v": "x0", "flow": "x0", None: "none"},
    "timestep_sampling": {"eps": "logit_normal", "v": "logit_normal", "flow": "uniform",
                          None: "uniform"},
}

# keeps logit-normal's inverse CDF finite and percent_to_sigma inside its range
_EDGE = 1e-5


class ModelFacts(Protocol):
    """What the objective reads of a model (the tasks of ``training/task.py`` provide it)."""

    prediction: str | None  # "eps", "v", "flow", or None (target by inverting ``denoise``)
    sigma_table: torch.Tensor | None  # the model's noise levels (CPU float32), if tabulated

    def percent_to_sigma(self, percent: float) -> float:
        """The noise level ``percent`` of the way through sampling (0: the most noise)."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The noised latent at ``sigma`` (the model's own noising)."""

    def denoise(self, sigma: torch.Tensor, output: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The denoised estimate of a raw network ``output``."""


# -- timestep densities (peer_trainers (c.2); all map a uniform u in (0, 1) to t in (0, 1)) ----
def uniform(u: torch.Tensor) -> torch.Tensor:
    return u


def logit_normal(u: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t = sigmoid(mean + std * n), n ~ N(0, 1) drawn by its inverse CDF (Esser et al. 2024,
    "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", eq. 19;
    diffusers ``compute_density_for_timestep_sampling`` "logit_normal")."""
    n = torch.special.ndtri(u.double().clamp(_EDGE, 1 - _EDGE))
    return torch.sigmoid(mean + std * n).float()


def logit_normal_density(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """pi(t) = 1 / (std sqrt(2 pi)) / (t (1 - t)) exp(-(logit(t) - mean)^2 / (2 std^2))."""
    logit = torch.log(t / (1 - t))
    return torch.exp(-(logit - mean) ** 2 / (2 * std * std)) / (
        std * math.sqrt(2 * math.pi) * t * (1 - t))


def mode(u: torch.Tensor, scale: float = 1.29) -> torch.Tensor:
    """t = 1 - u - scale (cos^2(pi u / 2) - 1 + u) (Esser et al. 2024, eq. 20, "mode sampling
    with heavy tails"; diffusers and kohya default scale 1.29). Monotone for scale in
    [-1, 2 / (pi - 2)]."""
    return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3 shift t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024, section 5.3.2)."""
    return shift * t / (1 + (shift - 1) * t)


def stratified_uniform(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` uniforms, one in each of ``count`` equal strata of [0, 1), in random order
    (musubi-tuner ``num_timestep_buckets``, SimpleTuner's segmented sampling)."""
    offsets = torch.rand(count, generator=generator, dtype=torch.float64)
    order = torch.randperm(count, generator=generator)
    return ((order + offsets) / count).float()


# -- per-sample loss weights (peer_trainers (c.1), (c.4)) -----------------------------------
def snr(prediction: str, sigma: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio: 1 / sigma^2 for eps and v (k-diffusion sigma), ((1 - t) / t)^2
    for flow (sigma = t)."""
    sigma = sigma.double()
    if prediction == "flow":
        return ((1 - sigma) / sigma) ** 2
    return 1 / sigma**2


def x0_weight(prediction: str, sigma: torch.Tensor) -> torch.Tensor:
    """The weight that turns the native loss into the loss on denoised x0 (what ComfyUI's
    built-in trainer optimises): sigma^2 for eps, sigma^2 / (sigma^2 + 1) for v, t^2 for flow
    (||x0_hat - x0||^2 = ||eps_hat - eps||^2 / SNR = ||v_hat - v||^2 / (SNR + 1); for flow
    x0_hat = x_t - t v_hat)."""
    sigma = sigma.double()
    if prediction == "v":
        return sigma**2 / (sigma**2 + 1)
    return sigma**2


def min_snr_weight(prediction: str, sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy"): the x0 loss weighted by min(SNR, gamma), written on the native loss:
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v (the paper's two forms;
    diffusers ``train_text_to_image_lora.py``, kohya ``apply_snr_weight``), and
    min(SNR, gamma) t^2 for flow (the same x0 weighting through x0_hat = x_t - t v_hat)."""
    ratio = snr(prediction, sigma)
    return ratio.clamp(max=gamma) * x0_weight(prediction, sigma)


def sigma_sqrt_weight(sigma: torch.Tensor) -> torch.Tensor:
    """sigma^-2 (diffusers ``compute_loss_weighting_for_sd3`` "sigma_sqrt"; flow models)."""
    return sigma.double() ** -2


def cosmap_weight(sigma: torch.Tensor) -> torch.Tensor:
    """2 / (pi (1 - 2t + 2t^2)), the CosMap density as a loss weight (Esser et al. 2024,
    eq. 21; diffusers ``compute_loss_weighting_for_sd3`` "cosmap"; flow models)."""
    t = sigma.double()
    return 2 / (math.pi * (1 - 2 * t + 2 * t * t))


def loss_weight(name: str, prediction: str, sigma: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """The weight of each sample's native loss under ``name`` (float32)."""
    if name == "none":
        weight = torch.ones_like(sigma, dtype=torch.float64)
    elif name == "x0":
        weight = x0_weight(prediction, sigma)
    elif name == "min_snr":
        weight = min_snr_weight(prediction, sigma, gamma)
    elif name == "sigma_sqrt":
        weight = sigma_sqrt_weight(sigma)
    elif name == "cosmap":
        weight = cosmap_weight(sigma)
    else:
        raise ValueError(f"loss_weighting {name!r} is not one of {', '.join(LOSS_WEIGHTINGS)}.")
    return weight.float()


# -- the objective of a run -------------------------------------------------------------------
@dataclass
class StepDraws:
    """Everything random about one optimizer step's samples, drawn before it is split."""

    noise: torch.Tensor
    sigmas: torch.Tensor  # CPU float32
    dropped: torch.Tensor | None  # bool per sample: trains with the empty conditioning

    def part(self, index: slice) -> "StepDraws":
        """The draws of the micro-batch ``index``."""
        dropped = self.dropped[index] if self.dropped is not None else None
        return StepDraws(self.noise[index], self.sigmas[index], dropped)


def auto_text(name: str) -> str:
    """What "auto" chooses for option ``name``, e.g. "eps: x0, v: none, flow: none"."""
    return ", ".join(f"{kind}: {value}" for kind, value in AUTO_CHOICES[name].items()
                     if kind is not None)


def resolve(config, prediction: str | None):
    """``config`` with every ``"auto"`` replaced by its choice for ``prediction``."""
    chosen = {name: by_kind[prediction] for name, by_kind in AUTO_CHOICES.items()
              if getattr(config, name) == AUTO}
    return dataclasses.replace(config, **chosen) if chosen else config


class Objective:
    """The objective of one run over the model of ``task`` with the choices of ``config``;
    ``self.config`` is ``config`` with its "auto" choices resolved for the model.

    Raises a ValueError naming the option when a choice does not fit the model."""

    def __init__(self, task: ModelFacts, config, *, can_drop_captions: bool = False) -> None:
        self.task = task
        self.prediction = task.prediction
        self.config = resolve(config, self.prediction)
        table = task.sigma_table
        self.table = table.float().cpu().sort().values if table is not None and len(table) > 1 else None
        self._check(can_drop_captions)

    def _check(self, can_drop_captions: bool) -> None:
        c, kind = self.config, self.prediction
        described = kind if kind is not None else "neither eps, v nor flow"
        if c.loss_weighting != "none" and kind is None:
            raise ValueError(
                f"loss_weighting={c.loss_weighting!r} needs an eps, v or flow model; this "
                "model's prediction is none of them. Set loss_weighting to none.")
        if c.loss_weighting in FLOW_ONLY_WEIGHTINGS and kind != "flow":
            raise ValueError(
                f"loss_weighting={c.loss_weighting!r} is defined for flow models (SD3, Flux, "
                f"Wan...); this model is {described}. Use none, min_snr or x0.")
        if c.shift > 0 and kind != "flow":
            raise ValueError(
                f"shift={c.shift:g} applies to flow models; this model is {described}. Set "
                "shift to 0 (the model's own noise levels).")
        if c.noise_offset > 0 and kind not in ("eps", "v"):
            raise ValueError(
                f"noise_offset={c.noise_offset:g} applies to eps and v models; this model is "
                f"{described}. Set noise_offset to 0.")
        if c.caption_dropout > 0 and not can_drop_captions:
            raise ValueError(
                f"caption_dropout={c.caption_dropout:g} needs the conditioning of an empty "
                "prompt: connect a CLIP Text Encode with an empty text to empty_conditioning, "
                "or set caption_dropout to 0.")

    # -- timesteps ---------------------------------------------------------------------------
    def fractions(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` draws of t in [0, 1) from the run's distribution (stratified if asked)."""
        c = self.config
        if c.stratified:
            u = stratified_uniform(count, generator)
        else:
            u = torch.rand(count, generator=generator)
        if c.timestep_sampling == "logit_normal":
            return logit_normal(u, c.timestep_mean, c.timestep_std)
        if c.timestep_sampling == "mode":
            return mode(u, c.mode_scale).clamp(0, 1 - 1e-7)
        return u

    def sigmas_at(self, t: torch.Tensor) -> torch.Tensor:
        """The model's noise level at fractions ``t`` (CPU float32)."""
        if self.config.shift > 0:
            return flow_shift(t.double().clamp(1e-3, 1.0), self.config.shift).float()
        if self.table is not None:
            index = (t * len(self.table)).long().clamp(0, len(self.table) - 1)
            return self.table[index]
        percent = (1 - t).clamp(_EDGE, 1 - _EDGE)
        return torch.tensor([float(self.task.percent_to_sigma(float(p))) for p in percent])

    def sample_sigmas(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return self.sigmas_at(self.fractions(count, generator))

    def draw(self, shape: torch.Size, generator: torch.Generator) -> StepDraws:
        """Noise, noise levels and caption drops of ``shape[0]`` samples, all from
        ``generator``; offsets and drops are drawn only when their option is on."""
        return self.draw_groups([shape], generator)[0]

    def draw_groups(self, shapes: list[torch.Size], generator: torch.Generator) -> list[StepDraws]:
        """The draws of one optimizer step whose samples come in groups of different latent
        sizes (``shapes``, one per micro-batch): the noise of each group in turn, then the
        noise levels of all the step's samples at once (so ``stratified`` covers the step),
        then the offsets, then the drops. One group draws exactly what :meth:`draw` does."""
        counts = [shape[0] for shape in shapes]
        noises = [torch.randn(shape, generator=generator) for shape in shapes]
        sigmas = self.sample_sigmas(sum(counts), generator)
        if self.config.noise_offset > 0:
            for i, shape in enumerate(shapes):
                offset = torch.randn((*shape[:2], *[1] * (len(shape) - 2)), generator=generator)
                noises[i] = noises[i] + self.config.noise_offset * offset
        dropped = None
        if self.config.caption_dropout > 0:
            dropped = torch.rand(sum(counts), generator=generator) < self.config.caption_dropout
        draws, start = [], 0
        for noise, count in zip(noises, counts):
            part = slice(start, start + count)
            draws.append(StepDraws(noise, sigmas[part],
                                   None if dropped is None else dropped[part]))
            start += count
        return draws

    # -- noising, target, loss ----------------------------------------------------------------
    def target(self, x0, noise, sigma, x_t) -> torch.Tensor:
        """What the raw network output should equal (the prediction's native target)."""
        if self.prediction is not None:
            return TARGETS[self.prediction](x0, noise, sigma)
        return target_by_inversion(self.task.denoise, sigma, x_t, x0)

    def weights(self, sigma: torch.Tensor) -> torch.Tensor:
        c = self.config
        return loss_weight(c.loss_weighting, self.prediction, sigma.cpu(), c.min_snr_gamma)

    def losses(
        self, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each sample's weighted loss: noise ``x0`` at ``sigma``, run ``predict(x_t, sigma)``
        and compare with the native target (element-weighted by ``mask`` if given)."""
        x_t = self.task.add_noise(x0, noise, sigma)
        prediction = predict(x_t, sigma)
        target = self.target(x0, noise, sigma, x_t)
        loss = per_sample_loss(self.config.loss_function, prediction, target, mask)
        return loss * self.weights(sigma).to(loss.device)
