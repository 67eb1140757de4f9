"""Sample quality of LoRA Lab's Train LoRA against ComfyUI core's TrainLoraNode.

Both trainers learn the same new concept on the same base model with the same user-facing
settings; the trained models are then sampled with ComfyUI's own KSampler and the samples
are compared with the training data (how much was learned) and with the base model's samples
on prompts that were not trained (how much else changed). Everything runs on tiny but real
ComfyUI models (``tests/comfyui/tiny_models.py``): SD1.x UNet (``sd15``, eps prediction) and
SD3 MMDiT (``sd3``, rectified flow).

Method, per family:

1. **A base model that knows a distribution.** The tiny model (small by default, ``--medium``)
   is pre-trained in full (every ``diffusion_model`` parameter; AdamW, ``--pretrain-lr``
   1e-3, 30 steps of linear warm-up then cosine decay to 0.1x, ``--pretrain-steps`` steps
   of ``--pretrain-batch`` fresh samples: sd15 600 x 16, sd3 2000 x 32) on ``--classes`` (6)
   synthetic base classes. Class ``k`` has its own conditioning (``sd15_cond`` /
   ``sd3_cond`` with a seed of its own) and its own latent generator: a per-channel mean
   plus a planar sinusoid (one or one and a half periods across the latent) of
   class-specific orientation and per-channel amplitude, with a small random phase shift and
   small smooth (bilinearly upsampled 3x3) noise per sample; latents are in the model's
   space with a std of about 1. The objective is the model's native one: noise levels drawn
   uniformly from ``model_sampling.sigmas``, ``x_t = model_sampling.noise_scaling(sigma,
   noise, x0)``, ``denoised = BaseModel.apply_model(x_t, sigma, ...)``, the native
   prediction ``(x_t - denoised) / sigma`` (eps for SD1.x, velocity for SD3) against its
   target (the noise; ``noise - x0``), MSE. For eps each sample's error is weighted by
   ``1 + sigma^2`` (the v-prediction loss; ``--pretrain-eps-weighting none``: unweighted):
   an unweighted eps loss hardly sees the high noise levels, where an eps error becomes a
   sigma-times larger error of the denoised latent, and a base trained with it lays its
   samples out badly. The trained state dict is saved as a safetensors file under
   ``--cache`` (named by family, size, base seed and a hash of every pre-training setting;
   a later run finds it there and skips pre-training) and loaded as the Load Diffusion Model
   node loads a file, ``comfy.sd.load_diffusion_model(path)`` under
   ``torch.inference_mode()`` (core's trainer reloads the model from that file for its
   private copy). A check is printed: the distance (MSE) of the base model's samples for
   each class prompt to that class's template (the class latent without phase shift and
   noise), to the other classes' templates, and the same for the untrained model; the run
   stops unless the own-class distance is below the untrained model's and below 0.75x the
   other classes'.
   One base model per family (``--base-seed``) serves every training seed.
2. **A new concept.** 4 training latents of a pattern no base class has: concentric rings
   (``cos(1.5 pi r)``) around a centre that moves a little from latent to latent, with a
   per-channel mean and amplitude of their own and small smooth noise per latent, each
   latent with its own new
   conditioning. They are drawn from the training seed, so each training seed is a new
   concept instance; the trainers of one seed all get the same one. The trainers receive
   them in the VAE's space (what VAE Encode gives: ``latent_format.process_out``).
3. **Training.** ComfyUI core's ``comfy_extras.nodes_train.TrainLoraNode`` (its inputs built
   from its own schema, so inputs this script does not name get their defaults; each value
   wrapped in a one-element list where the node takes input lists; its LORA_MODEL applied
   with ``comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)`` as Load LoRA Model does)
   and LoRA Lab's ``TrainLoRA`` (its MODEL output) once per ``--config NAME=JSON``, whose
   JSON dict is passed as the Training Options (``options=``). Identical settings for all:
   batch size 1, gradient accumulation 1, ``--steps`` (sd15 400, sd3 1000: enough for the
   LoRAs to learn the concept visibly), ``--lr`` (default: core's default, 0.0005),
   ``--rank`` (8), AdamW, MSE, the
   training seed, training_dtype and lora_dtype fp32, algorithm LoRA, gradient checkpointing
   off, no existing LoRA; the conditioning is one CONDITIONING list with one entry per latent.
   Both nodes run under ``torch.inference_mode()`` as ComfyUI runs nodes, on the same base
   MODEL object. Core's trainer draws its batch order and noise levels from torch's global
   generator, so it is seeded with the training seed before every trainer call (LoRA Lab
   draws from its own seeded generator). **ms/step** is the wall time of the node call
   divided by the steps (setup included), the median over the training seeds; **LoRA
   bytes** the sum of ``nbytes`` of the LoRA state dict's tensors.
4. **Sampling and metrics.** ``nodes.common_ksampler`` (the KSampler node): euler, scheduler
   ``normal`` for SD1.x and ``simple`` for SD3, ``--sample-steps`` (20) steps, cfg 1.0, denoise
   1.0, an all-zero latent of batch 1, the negative an all-zero conditioning of the positive's
   shape (cfg 1.0 does not evaluate it), noise seeds ``0 .. --sample-seeds - 1``. Samples are
   compared in the model's space (``latent_format.process_in`` of the KSampler output):

   - **dist**: the mean over the 4 training conditionings x noise seeds of
     MSE(sample, that conditioning's training latent). ``dist/base`` = dist of the trained
     model / dist of the untrained base model (lower: learned more); ``vs core`` = dist of a
     configuration / dist of core's LoRA for the same training seed (below 1: LoRA Lab's
     samples are closer to the training data than core's).
   - **drift**: on 2 base-class prompts that were not trained, the mean squared difference
     between the trained model's samples and the base model's samples from the same noise
     seeds, divided by the mean square of the base samples; ``drift vs core`` its ratio to
     core's for the same training seed.

   Every figure is a mean over the training seeds with the standard deviation over them
   (ratios are taken per seed, then averaged). After the trained models, the base model is
   sampled once more and must give the same samples as before (the trainers left it
   untouched).

Usage (from the repository root, with ComfyUI's Python)::

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_EXTRA_PATH=/path/to/stubs \\
        /path/to/comfy-venv/bin/python benchmarks/bench_quality.py \\
        --families sd15,sd3 --seeds 3 --config default={} \\
        --config normbias='{"train_norm_bias": true}'

Without ``--config`` one configuration, ``default={}``, is run. ``--json FILE`` writes every
raw number (per seed and trainer: distances, per-conditioning distances, drift, seconds,
LoRA bytes, losses). Progress goes to stderr, the report to stdout: the settings, then per
family a markdown table with the other processes' CPU load during it (from /proc/stat; the
ms/step figures are only comparable when it is about 0). ``OMP_WAIT_POLICY`` defaults to
``PASSIVE`` (waiting OpenMP threads sleep instead of spinning), which keeps a run usable
while other processes share the CPUs. On 2 CPU cores a run of both
families with two configurations takes about 13 minutes, 6 of them pre-training (cached
for later runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

# OpenMP threads that spin while waiting make every op crawl when another process holds a
# core (100x slower steps on a shared 2-core machine); sleeping waiters cost little when idle.
# Read when torch loads its OpenMP runtime, so set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import PACKAGE, REPO, busy_cpu_seconds, setup_comfy  # noqa: E402

CACHE_VERSION = 2  # bump when the pre-training or the data changes
CONCEPT_LATENTS = 4
DRIFT_CLASSES = 2
CORE = "core"


@dataclass(frozen=True)
class Family:
    name: str
    prediction: str  # "eps" or "flow"
    channels: int
    side: int  # latent height and width of the small model
    medium_side: int
    scheduler: str
    steps: int  # default training steps
    pretrain_steps: int  # default pre-training steps
    pretrain_batch: int  # default pre-training batch

    def latent_side(self, medium: bool) -> int:
        return self.medium_side if medium else self.side


# Defaults sized for a 2-core CPU: the LoRA must learn the concept visibly (sd3's tiny MMDiT
# needs more steps for that, and its steps are cheaper) and the base must know its classes.
FAMILIES = {
    "sd15": Family("sd15", "eps", 4, 8, 16, "normal", steps=400, pretrain_steps=600,
                   pretrain_batch=16),
    "sd3": Family("sd3", "flow", 16, 16, 32, "simple", steps=1000, pretrain_steps=2000,
                  pretrain_batch=32),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- synthetic data (model space) -----------------------------------------------------------
def coordinates(side: int):
    """``u, v``: [side, side] grids over [-1, 1] (x to the right, y down)."""
    import torch

    axis = torch.linspace(-1.0, 1.0, side)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    return u, v


def smooth_noise(generator, count: int, channels: int, side: int, std: float):
    """Low-frequency noise: a 3x3 random grid per channel, bilinearly upsampled."""
    import torch
    import torch.nn.functional as F

    coarse = torch.randn(count, channels, 3, 3, generator=generator) * std
    return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=True)


@dataclass(frozen=True)
class BaseClass:
    mean: tuple[float, ...]  # per channel
    amplitude: tuple[float, ...]  # per channel
    angle: float  # orientation of the sinusoid
    frequency: float  # periods across the latent


def base_classes(count: int, channels: int, seed: int) -> list[BaseClass]:
    """``count`` classes: evenly spread orientations, two frequencies, seeded channel stats."""
    import torch

    classes = []
    for k in range(count):
        g = torch.Generator().manual_seed(1_000 * seed + k)
        classes.append(BaseClass(
            mean=tuple((torch.randn(channels, generator=g) * 0.5).tolist()),
            amplitude=tuple(torch.randn(channels, generator=g).tolist()),
            angle=math.pi * k / count, frequency=1.0 + 0.5 * (k % 2)))
    return classes


def class_latents(cls: BaseClass, count: int, side: int, generator=None):
    """``count`` samples of ``cls`` [count, C, side, side]; ``generator`` None: the template
    (no phase shift, no noise)."""
    import torch

    u, v = coordinates(side)
    along = u * math.cos(cls.angle) + v * math.sin(cls.angle)
    channels = len(cls.mean)
    phase = (torch.zeros(count) if generator is None
             else (torch.rand(count, generator=generator) - 0.5) * 0.6)
    wave = torch.sin(math.pi * cls.frequency * along[None] + phase[:, None, None])
    mean = torch.tensor(cls.mean)[None, :, None, None]
    amplitude = torch.tensor(cls.amplitude)[None, :, None, None]
    x = mean + amplitude * wave[:, None]
    if generator is not None:
        x = x + smooth_noise(generator, count, channels, side, 0.25)
    return x


def concept_latents(count: int, channels: int, side: int, seed: int):
    """The new concept: concentric rings around a slightly moving centre [count, C, side, side]."""
    import torch

    g = torch.Generator().manual_seed(2_000_000 + seed)
    mean = (torch.randn(channels, generator=g) * 0.5)[None, :, None, None]
    amplitude = torch.randn(channels, generator=g)[None, :, None, None]
    u, v = coordinates(side)
    centres = (torch.rand(count, 2, generator=g) - 0.5) * 0.3
    radius = ((u[None] - centres[:, 0, None, None]) ** 2
              + (v[None] - centres[:, 1, None, None]) ** 2).sqrt()
    rings = torch.cos(1.5 * math.pi * radius)
    return mean + amplitude * rings[:, None] + smooth_noise(g, count, channels, side, 0.25)


# -- conditioning ---------------------------------------------------------------------------
def conditioning_entry(family: Family, seed: int):
    """One CONDITIONING entry ``[tensor, dict]`` of the family's tiny text encoder stand-in."""
    import tiny_models

    make = {"sd15": tiny_models.sd15_cond, "sd3": tiny_models.sd3_cond}[family.name]
    return make(seed=seed)[0]


def class_conditioning(family: Family, base_seed: int, k: int):
    return conditioning_entry(family, 1_000_000 + 1_000 * base_seed + k)


def concept_conditioning(family: Family, seed: int, i: int):
    return conditioning_entry(family, 3_000_000 + 1_000 * seed + i)


def zero_conditioning(entry):
    import torch

    extras = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v
              for k, v in entry[1].items()}
    return [[torch.zeros_like(entry[0]), extras]]


def model_kwargs(family: Family, entries):
    """``apply_model`` keyword arguments for a batch of conditioning entries."""
    import torch

    kwargs = {"c_crossattn": torch.cat([e[0] for e in entries])}
    if family.name == "sd3":
        kwargs["y"] = torch.cat([e[1]["pooled_output"] for e in entries])
    return kwargs


# -- the base model -------------------------------------------------------------------------
@dataclass(frozen=True)
class Pretraining:
    classes: int
    steps: int
    batch: int
    lr: float
    warmup: int
    eps_weighting: str  # "v" or "none"
    base_seed: int
    medium: bool

    def key(self, family: Family) -> str:
        text = json.dumps(dict(dataclasses.asdict(self), family=family.name,
                               version=CACHE_VERSION), sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        size = "medium" if self.medium else "small"
        return f"{family.name}-{size}-seed{self.base_seed}-{digest}"


def build_tiny(family: Family, seed: int, medium: bool):
    import tiny_models

    build = {"sd15": tiny_models.tiny_sd15, "sd3": tiny_models.tiny_sd3}[family.name]
    return build(seed=seed, medium=medium)


def pretrain(family: Family, settings: Pretraining) -> dict:
    """Full fine-tune of a fresh tiny model on the base classes; its diffusion_model state dict."""
    import torch

    patcher = build_tiny(family, settings.base_seed, settings.medium)  # normal tensors
    base, network = patcher.model, patcher.model.diffusion_model
    network.requires_grad_(True).train()
    side = family.latent_side(settings.medium)
    classes = base_classes(settings.classes, family.channels, settings.base_seed)
    conds = [class_conditioning(family, settings.base_seed, k) for k in range(settings.classes)]
    sigmas = base.model_sampling.sigmas.detach().float().cpu()
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(7_000 + settings.base_seed)
    started, losses = time.perf_counter(), []
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step, settings.steps, settings.warmup)
        labels = torch.randint(0, settings.classes, (settings.batch,), generator=g).tolist()
        x0 = torch.cat([class_latents(classes[k], 1, side, g) for k in labels])
        noise = torch.randn(x0.shape, generator=g)
        sigma = sigmas[torch.randint(0, len(sigmas), (settings.batch,), generator=g)]
        loss = native_loss(family, base, x0, noise, sigma, [conds[k] for k in labels],
                           settings.eps_weighting)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"pre-training diverged at step {step + 1} (loss {losses[-1]})")
        if (step + 1) % max(1, settings.steps // 10) == 0:
            window = losses[-max(1, settings.steps // 10):]
            log(f"  pre-train {family.name} step {step + 1}/{settings.steps}: loss "
                f"{statistics.mean(window):.4f} ({time.perf_counter() - started:.0f} s)")
    network.eval().requires_grad_(False)
    return {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def native_loss(family: Family, base, x0, noise, sigma, entries, eps_weighting: str):
    """MSE of the native prediction (eps; flow velocity) against its target; for eps with
    ``eps_weighting`` "v" each sample's error is weighted by 1 + sigma^2 (the v-prediction
    loss), so high noise levels, where the eps error is tiny but decides the sample's
    layout, are learnt too."""
    x_t = base.model_sampling.noise_scaling(sigma, noise, x0)
    denoised = base.apply_model(x_t, sigma, **model_kwargs(family, entries))
    prediction = (x_t - denoised) / sigma.view(-1, 1, 1, 1)
    target = noise if family.prediction == "eps" else noise - x0
    error = ((prediction - target) ** 2).flatten(1).mean(1)
    if family.prediction == "eps" and eps_weighting == "v":
        error = error * (1 + sigma ** 2)
    return error.mean()


def load_base(path: str):
    """The pre-trained model loaded from its file as Load Diffusion Model (UNETLoader) does."""
    import torch

    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(path)


def cached_pretraining(family: Family, settings: Pretraining, cache: str) -> tuple[str, float]:
    """The pre-trained model's safetensors file (trained now unless cached) and the seconds
    pre-training took now (0 from the cache)."""
    import comfy.utils

    path = os.path.join(cache, settings.key(family) + ".safetensors")
    if os.path.exists(path):
        log(f"  pre-trained {family.name} base from {path}")
        return path, 0.0
    started = time.perf_counter()
    state = pretrain(family, settings)
    seconds = time.perf_counter() - started
    os.makedirs(cache, exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"  # concurrent runs never share a partial file
    comfy.utils.save_torch_file(state, partial)
    os.replace(partial, path)
    log(f"  pre-trained {family.name} base in {seconds:.0f} s, cached at {path}")
    return path, seconds


# -- sampling -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    seeds: int
    steps: int
    side: int


def sample(model, family: Family, entry, sampling: Sampling):
    """KSampler samples [seeds, C, H, W] in model space for one conditioning entry."""
    import torch

    import nodes

    negative = zero_conditioning(entry)
    out = []
    with torch.inference_mode():
        for seed in range(sampling.seeds):
            latent = {"samples": torch.zeros(1, family.channels, sampling.side, sampling.side)}
            (result,) = nodes.common_ksampler(
                model, seed, sampling.steps, 1.0, "euler", family.scheduler, [entry], negative,
                latent, denoise=1.0)
            out.append(model.model.latent_format.process_in(result["samples"].float()))
    samples = torch.cat(out).clone()
    if not torch.isfinite(samples).all():
        raise RuntimeError("KSampler returned NaN or Inf samples")
    return samples


def sample_all(model, family, concept_entries, drift_entries, sampling: Sampling) -> dict:
    return {"concept": [sample(model, family, e, sampling) for e in concept_entries],
            "drift": [sample(model, family, e, sampling) for e in drift_entries]}


def distance(samples: list, targets) -> float:
    """Mean over conditionings and seeds of MSE(sample, that conditioning's target)."""
    return statistics.mean(
        float(((s - targets[i][None]) ** 2).mean()) for i, s in enumerate(samples))


def drift(samples: list, base_samples: list) -> float:
    """Mean squared difference to the base model's samples / mean square of those."""
    import torch

    trained, base = torch.cat(samples), torch.cat(base_samples)
    return float(((trained - base) ** 2).mean() / (base ** 2).mean())


def base_check(family, base, untrained, classes, class_entries, sampling: Sampling) -> dict:
    """Distances of each class prompt's samples to its own and the other classes' templates."""
    templates = [class_latents(c, 1, sampling.side)[0] for c in classes]

    def distances(model) -> tuple[float, float]:
        own, other = [], []
        for k, entry in enumerate(class_entries):
            samples = sample(model, family, entry, sampling)
            for j, template in enumerate(templates):
                d = float(((samples - template[None]) ** 2).mean())
                (own if j == k else other).append(d)
        return statistics.mean(own), statistics.mean(other)

    own, other = distances(base)
    untrained_own, untrained_other = distances(untrained)
    return dict(own=own, other=other, untrained_own=untrained_own,
                untrained_other=untrained_other)


# -- the trainers ---------------------------------------------------------------------------
@dataclass
class Trained:
    model: object
    lora_bytes: int
    seconds: float
    losses: list


def node_values(node, values: dict) -> dict:
    """Every input of a ComfyUI node class: ``values``, else the default of its schema
    (for a combo without a default, its first option). Combo values are checked against the
    node's options."""
    inputs = node.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            kind, settings = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            options = kind if isinstance(kind, (list, tuple)) else settings.get("options")
            if name in values:
                value = values[name]
                if options is not None and value not in options:
                    raise ValueError(f"{node.__name__}: {name}={value!r} is not one of {options}")
            elif "default" in settings:
                value = settings["default"]
            elif options:
                value = options[0]
            elif section == "optional":
                continue
            else:
                raise ValueError(f"{node.__name__}: no value for its required input {name!r}")
            out[name] = value
    unknown = set(values) - set(out)
    if unknown:
        raise ValueError(f"{node.__name__} has no inputs {sorted(unknown)}")
    return out


def run_node(node, values: dict) -> tuple:
    """Call a ComfyUI node class as the executor does (input lists; V3 or V1 API); its outputs."""
    import torch

    if getattr(node, "INPUT_IS_LIST", False):
        values = {k: [v] for k, v in values.items()}
    with torch.inference_mode():
        if hasattr(node, "define_schema"):
            output = node.execute(**values)
            return tuple(output.args)
        return tuple(getattr(node(), node.FUNCTION)(**values))


def lora_bytes(lora) -> int:
    import torch

    return sum(t.nbytes for t in lora.values() if isinstance(t, torch.Tensor))


def common_values(args, steps: int, seed: int) -> dict:
    return dict(batch_size=1, grad_accumulation_steps=1, steps=steps,
                learning_rate=args.lr, rank=args.rank, optimizer="AdamW", loss_function="MSE",
                seed=seed, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
                gradient_checkpointing=False, existing_lora="[None]")


def train_core(base, latents, positive, args, steps: int, seed: int) -> Trained:
    import torch

    import comfy.sd
    from comfy_extras.nodes_train import TrainLoraNode

    values = node_values(TrainLoraNode, dict(
        common_values(args, steps, seed), model=base, latents={"samples": latents},
        positive=positive))
    torch.manual_seed(seed)  # core draws batch order and noise levels from the global generator
    started = time.perf_counter()
    outputs = run_node(TrainLoraNode, values)
    seconds = time.perf_counter() - started
    types = list(TrainLoraNode.RETURN_TYPES)
    lora = outputs[types.index("LORA_MODEL")]
    losses = outputs[types.index("LOSS_MAP")]["loss"]
    with torch.inference_mode():
        model = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0]
    return Trained(model, lora_bytes(lora), seconds, [float(v) for v in losses])


def train_lab(base, latents, positive, args, steps: int, seed: int, options: dict) -> Trained:
    import torch

    TrainLoRA = importlib.import_module(f"{PACKAGE}.nodes.train").TrainLoRA
    values = node_values(TrainLoRA, dict(
        common_values(args, steps, seed), model=base, latents={"samples": latents},
        positive=positive, options=dict(options)))
    torch.manual_seed(seed)
    started = time.perf_counter()
    model, lora, loss = run_node(TrainLoRA, values)[:3]
    seconds = time.perf_counter() - started
    return Trained(model, lora_bytes(lora), seconds, [float(v) for v in loss["loss"]])


# -- one family -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What one family runs: training steps, pre-training and sampling settings."""

    steps: int
    pretraining: Pretraining
    sampling: Sampling


def plan(family: Family, args) -> Plan:
    pretraining = Pretraining(
        classes=args.classes, steps=args.pretrain_steps or family.pretrain_steps,
        batch=args.pretrain_batch or family.pretrain_batch, lr=args.pretrain_lr,
        warmup=args.pretrain_warmup, eps_weighting=args.pretrain_eps_weighting,
        base_seed=args.base_seed, medium=args.medium)
    sampling = Sampling(args.sample_seeds, args.sample_steps, family.latent_side(args.medium))
    return Plan(args.steps or family.steps, pretraining, sampling)


def run_family(family: Family, args, configs: dict) -> dict:
    import torch

    started, load = time.perf_counter(), CpuLoad()
    settings = plan(family, args)
    log(f"[{family.name}] base model")
    path, pretrain_seconds = cached_pretraining(family, settings.pretraining, args.cache)
    base = load_base(path)
    with torch.inference_mode():
        untrained = build_tiny(family, args.base_seed, args.medium)
    classes = base_classes(args.classes, family.channels, args.base_seed)
    class_entries = [class_conditioning(family, args.base_seed, k) for k in range(args.classes)]
    check = base_check(family, base, untrained, classes, class_entries, settings.sampling)
    del untrained
    log(f"  check: class prompts' samples to own class template {check['own']:.3f} (other "
        f"classes {check['other']:.3f}); untrained model {check['untrained_own']:.3f} "
        f"({check['untrained_other']:.3f})")
    if not (check["own"] < 0.75 * check["other"] and check["own"] < check["untrained_own"]):
        raise RuntimeError(
            f"the pre-trained {family.name} base does not know its classes ({check}); raise "
            "--pretrain-steps or adjust --pretrain-lr")
    drift_entries = class_entries[:DRIFT_CLASSES]

    runs = [run_seed(family, args, configs, seed, base, drift_entries, settings)
            for seed in range(args.seeds)]
    return dict(family=family.name, prediction=family.prediction,
                latent_side=settings.sampling.side, scheduler=family.scheduler,
                steps=settings.steps, pretraining=dataclasses.asdict(settings.pretraining),
                pretrain_seconds=pretrain_seconds, base_check=check, seeds=runs,
                seconds=time.perf_counter() - started, other_load_cpus=load.other())


def run_seed(family, args, configs, seed, base, drift_entries, settings: Plan) -> dict:
    import torch

    sampling, steps = settings.sampling, settings.steps
    targets = concept_latents(CONCEPT_LATENTS, family.channels, sampling.side, seed)
    entries = [concept_conditioning(family, seed, i) for i in range(CONCEPT_LATENTS)]
    with torch.inference_mode():
        vae_latents = base.model.latent_format.process_out(targets.clone()).clone()
    log(f"[{family.name} seed {seed}] sampling the base model")
    base_samples = sample_all(base, family, entries, drift_entries, sampling)
    base_distance = distance(base_samples["concept"], targets)

    trainers = {CORE: lambda: train_core(base, vae_latents, entries, args, steps, seed)}
    for name, options in configs.items():
        trainers[name] = lambda options=options: train_lab(
            base, vae_latents, entries, args, steps, seed, options)
    results = {}
    for name, train in trainers.items():
        log(f"[{family.name} seed {seed}] training: {name}")
        trained = train()
        samples = sample_all(trained.model, family, entries, drift_entries, sampling)
        dist = distance(samples["concept"], targets)
        results[name] = dict(
            distance=dist, dist_over_base=dist / base_distance,
            distance_per_conditioning=[distance([s], targets[i:i + 1])
                                       for i, s in enumerate(samples["concept"])],
            drift=drift(samples["drift"], base_samples["drift"]),
            seconds=trained.seconds, ms_per_step=1e3 * trained.seconds / steps,
            lora_bytes=trained.lora_bytes, losses=trained.losses)
        log(f"  {name}: dist/base {dist / base_distance:.3f}, drift "
            f"{results[name]['drift']:.4f}, {results[name]['ms_per_step']:.0f} ms/step")
        del trained, samples
    for r in results.values():
        r["vs_core"] = r["distance"] / results[CORE]["distance"]
        r["drift_vs_core"] = r["drift"] / results[CORE]["drift"]

    again = sample(base, family, entries[0], sampling)
    if not torch.allclose(again, base_samples["concept"][0], atol=1e-5, rtol=1e-5):
        raise RuntimeError(f"training changed the base {family.name} model: its samples differ "
                           f"by {float((again - base_samples['concept'][0]).abs().max()):.3g}")
    return dict(seed=seed, base_distance=base_distance, trainers=results)


class CpuLoad:
    """CPUs that other processes kept busy since construction (from /proc/stat; None where
    unreadable): timings are only comparable when this is about 0."""

    def __init__(self) -> None:
        self.started, self.busy, self.own = time.perf_counter(), busy_cpu_seconds(), own_cpu()

    def other(self) -> float | None:
        busy = busy_cpu_seconds()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.started
        return max(0.0, (busy - self.busy) - (own_cpu() - self.own)) / wall


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- report ---------------------------------------------------------------------------------
def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary(result: dict, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        per_seed = [run["trainers"][name] for run in result["seeds"]]
        row = {"trainer": name}
        for key in ("dist_over_base", "vs_core", "drift", "drift_vs_core", "ms_per_step",
                    "lora_bytes"):
            row[key] = spread([r[key] for r in per_seed])
        row["ms_per_step_median"] = statistics.median(r["ms_per_step"] for r in per_seed)
        rows.append(row)
    return rows


def table(result: dict, names: list[str], configs: dict) -> str:
    def pm(pair, digits=3):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    family, side = FAMILIES[result["family"]], result["latent_side"]
    lines = [
        f"### {family.name} ({family.prediction}; latent {family.channels}x{side}x{side}; "
        f"{result['steps']} training steps; KSampler euler/{family.scheduler})",
        "",
        "| trainer | options | dist/base | vs core | drift | drift vs core | ms/step "
        "| LoRA bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary(result, names):
        name = row["trainer"]
        options = "ComfyUI TrainLoraNode" if name == CORE else json.dumps(configs[name])
        lines.append(
            f"| {name} | `{options}` | {pm(row['dist_over_base'])} | {pm(row['vs_core'])} "
            f"| {pm(row['drift'], 4)} | {pm(row['drift_vs_core'])} "
            f"| {row['ms_per_step_median']:.0f} | {row['lora_bytes'][0]:,.0f} |")
    return "\n".join(lines + ["", footnote(result)])


def footnote(result: dict) -> str:
    """What a family's table rests on: the base model, its check, the run's time and load."""
    pre, check, load = result["pretraining"], result["base_check"], result["other_load_cpus"]
    base_distance = statistics.mean(r["base_distance"] for r in result["seeds"])
    pretraining = (f"pre-training {result['pretrain_seconds']:.0f} s"
                   if result["pretrain_seconds"] else "pre-trained base from the cache")
    busy = f"{load:.2f}" if load is not None else "?"
    return (
        f"mean ± std over {len(result['seeds'])} training seeds (ms/step: median). Base: "
        f"pre-trained {pre['steps']} steps x batch {pre['batch']} (lr {pre['lr']:g}, "
        f"{pre['classes']} classes, base seed {pre['base_seed']}); its class prompts' samples "
        f"are at MSE {check['own']:.3f} from their class template and {check['other']:.3f} "
        f"from the other classes' (untrained model: {check['untrained_own']:.3f} / "
        f"{check['untrained_other']:.3f}); its samples for the concept prompts are at "
        f"{base_distance:.3f} from the training latents (dist of the base). "
        f"{result['seconds']:.0f} s for the family ({pretraining}); other processes kept "
        f"{busy} CPUs busy meanwhile.")


def git_commit(path: str) -> str:
    try:
        out = subprocess.run(["git", "-C", path, "describe", "--always", "--dirty"],
                             capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def comfyui_version(comfy_dir: str) -> str:
    path = os.path.join(comfy_dir, "comfyui_version.py")
    version = "unknown"
    if os.path.exists(path):
        scope: dict = {}
        with open(path) as f:
            exec(f.read(), scope)
        version = scope.get("__version__", "unknown")
    return f"{version} (commit {git_commit(comfy_dir)})"


def header(args, configs: dict) -> str:
    import torch

    comfy_dir = os.path.abspath(os.environ["COMFYUI_DIR"])
    pack = sys.modules[PACKAGE]
    plans = {name: plan(FAMILIES[name], args) for name in args.families}
    models = ", ".join(
        f"{name} {FAMILIES[name].channels}x{p.sampling.side}x{p.sampling.side}"
        for name, p in plans.items())
    steps = ", ".join(f"{name} {p.steps}" for name, p in plans.items())
    pretraining = ", ".join(
        f"{name} {p.pretraining.steps} x {p.pretraining.batch}" for name, p in plans.items())
    return "\n".join([
        "## Sample quality: LoRA Lab Train LoRA vs ComfyUI core TrainLoraNode",
        "",
        f"- ComfyUI {comfyui_version(comfy_dir)} at {comfy_dir}; LoRA Lab "
        f"{getattr(pack, '__version__', '?')} (commit {git_commit(REPO)}); torch "
        f"{torch.__version__}, Python {platform.python_version()}, CPU, "
        f"{args.threads} torch threads",
        f"- training (both trainers): steps {steps}; learning_rate {args.lr:g}, rank "
        f"{args.rank}, batch 1, grad accumulation 1, AdamW, MSE, seed = training seed "
        f"(0..{args.seeds - 1}), training/lora dtype fp32, LoRA, no gradient checkpointing, "
        f"{CONCEPT_LATENTS} concept latents each with its own conditioning",
        f"- models: tiny {'medium' if args.medium else 'small'} ({models}); base pre-trained "
        f"(steps x batch) {pretraining}, lr {args.pretrain_lr:g}, {args.classes} classes, base "
        f"seed {args.base_seed}",
        f"- sampling: KSampler euler, {args.sample_steps} steps, cfg 1.0, denoise 1.0, noise "
        f"seeds 0..{args.sample_seeds - 1} per prompt; drift on {DRIFT_CLASSES} base-class "
        "prompts",
        "- LoRA Lab configurations (Training Options): "
        + ", ".join(f"{name}={json.dumps(options)}" for name, options in configs.items()),
        "- dist/base: concept samples' MSE to their training latent / the untrained base's "
        "(lower: learned more); vs core: / core's (below 1: closer than core's); drift: base "
        "prompts' samples' MSE to the base model's / their mean square; drift vs core: / "
        "core's; ms/step: node wall time / steps",
    ])


# -- command line ---------------------------------------------------------------------------
def parse_config(text: str) -> tuple[str, dict]:
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--config {text!r}: expected NAME=JSON")
    try:
        options = json.loads(body)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--config {name}: invalid JSON ({error})") from error
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"--config {name}: JSON must be an object")
    if name == CORE:
        raise argparse.ArgumentTypeError(f"--config name {CORE!r} is the core trainer's row")
    return name, options


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--families", default="sd15,sd3", help="comma-separated: sd15,sd3")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1")
    parser.add_argument("--config", action="append", type=parse_config, metavar="NAME=JSON",
                        help="a LoRA Lab configuration: Training Options values as a JSON "
                             "object (repeatable; default: default={})")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: sd15 "
                             f"{FAMILIES['sd15'].steps}, sd3 {FAMILIES['sd3'].steps})")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: core TrainLoraNode's default)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--sample-seeds", type=int, default=4,
                        help="noise seeds per prompt")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--medium", action="store_true", help="the medium tiny models")
    parser.add_argument("--classes", type=int, default=6, help="base classes")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="pre-training steps (default: sd15 "
                             f"{FAMILIES['sd15'].pretrain_steps}, sd3 "
                             f"{FAMILIES['sd3'].pretrain_steps})")
    parser.add_argument("--pretrain-batch", type=int, default=None,
                        help="pre-training batch (default: sd15 "
                             f"{FAMILIES['sd15'].pretrain_batch}, sd3 "
                             f"{FAMILIES['sd3'].pretrain_batch})")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--pretrain-warmup", type=int, default=30)
    parser.add_argument("--pretrain-eps-weighting", choices=["v", "none"], default="v",
                        help="eps models' pre-training: weight each sample's eps error by "
                             "1 + sigma^2 (v) or not (none)")
    parser.add_argument("--base-seed", type=int, default=0,
                        help="seed of the base model's init, classes and pre-training")
    parser.add_argument("--cache", default="/tmp/lora_lab_quality_cache",
                        help="where pre-trained base models are kept")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--progress", action="store_true",
                        help="show ComfyUI's progress bars (off by default)")
    parser.add_argument("--json", help="also write every raw number to this file")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown or not args.families:
        parser.error(f"--families: unknown {unknown}; choose from {', '.join(FAMILIES)}")
    counts = [args.seeds, args.sample_seeds, args.sample_steps, args.rank, args.threads,
              *(v for v in (args.steps, args.pretrain_steps, args.pretrain_batch) if v is not None)]
    if min(counts) < 1 or args.classes < DRIFT_CLASSES or args.pretrain_warmup < 0:
        parser.error(f"counts must be at least 1, --classes at least {DRIFT_CLASSES}")
    names = [name for name, _ in args.config or []]
    if len(set(names)) != len(names):
        parser.error(f"--config names must differ: {names}")
    return args


def core_default_lr() -> float:
    from comfy_extras.nodes_train import TrainLoraNode

    spec = TrainLoraNode.INPUT_TYPES()["required"]["learning_rate"]
    return float(spec[1]["default"])


def main(argv=None) -> None:
    args = parse_args(argv)
    configs = dict(args.config or [("default", {})])
    setup_comfy("cpu")
    import torch

    import comfy.utils

    torch.set_num_threads(args.threads)
    comfy.utils.set_progress_bar_enabled(args.progress)
    if args.lr is None:
        args.lr = core_default_lr()
    print(header(args, configs), flush=True)
    names = [CORE, *configs]
    results = []
    for name in args.families:
        result = run_family(FAMILIES[name], args, configs)
        results.append(result)
        print("\n" + table(result, names, configs), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args={k: v for k, v in vars(args).items() if k != "config"},
                           configs=configs, results=results,
                           summary={r["family"]: summary(r, names) for r in results}),
                      f, indent=1)


if __name__ == "__main__":
    main()
