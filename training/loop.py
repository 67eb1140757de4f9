"""The training loop: one explicit function, read top to bottom.

Each optimizer step draws ``batch_size * grad_accumulation_steps`` samples, their noise and
their noise levels from the run's one generator, then runs the micro-batches, each loss
scaled by ``1 / grad_accumulation_steps``, and steps the optimizer once. Because all draws of
a step happen before it is split into micro-batches, 4 samples x 1 micro-batch and
2 x 2 train on exactly the same samples, noise and timesteps.

Before the first step, one forward of the first batch (without a graph) checks that the
latents and conditioning fit the model and finds the blocks that write into their inputs in
place (:mod:`.inplace`); it draws nothing from the run's generator.

After an optimizer step, when the options ask for them: a validation loss (fixed draws from
their own generator), a checkpoint (the LoRA as the run would return it now, and the
:class:`~.state.TrainingState` that continues it exactly), a preview (``on_preview``, with the
returned weights in place and the global RNG forked). None of them draws from the run's
generator or leaves the trained weights changed, so they do not alter the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..lora import Adapter
from ..lora.diff import NormDelta, create_norm_deltas
from ..lora.inject import (
    ForwardPatches, adapter_patches, create_adapters, find_targets, lora_state_dict,
)
from ..losses.objective import Objective, StepDraws
from ..optimizers import make_optimizer, set_training
from . import schedule
from .batching import EpochSampler
from .checkpointing import checkpoint_blocks, checkpointed
from .inplace import checkpointable, find_mutating_blocks, inplace_patches
from .latents import BucketSampler, LatentSet
from .config import DTYPES, TrainConfig
from .distributed import SINGLE, World
from .ema import EMA
from .state import MUST_MATCH as STATE_OPTIONS
from .state import (
    TrainingState, check_options, from_file, load_modules, load_optimizer, module_tensors,
    optimizer_tensors,
)
from .task import DiffusionTask

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StepReport:
    """What a run reports after each optimizer step (to ``on_step``)."""

    step: int  # optimizer steps done, a resumed run's earlier steps included
    total: int  # the steps the run will have done at its end
    loss: float  # the mean of the step's micro-batch losses
    learning_rate: float  # the learning rate this step used (LoRA+ up factors: x the ratio)
    adapters: Mapping[str, Adapter]  # the live adapters (read them, do not change them)
    validation: float | None = None  # the validation loss, on the steps it is computed


@dataclass(frozen=True)
class Checkpoint:
    """What a run hands ``on_checkpoint`` every ``checkpoint_every`` steps."""

    step: int  # optimizer steps done, a resumed run's earlier steps included
    lora: dict[str, torch.Tensor]  # the LORA_MODEL the run would return if it ended now
    state: TrainingState  # what continues the run exactly
    config: TrainConfig  # the run's configuration, "auto" choices resolved
    adapters: Mapping[str, Adapter]  # the live adapters (their algorithm, rank and alpha)


StepCallback = Callable[[StepReport], None]


class TrainingDiverged(ValueError):
    """The loss became NaN or Inf; nothing of that step was applied."""


@dataclass
class TrainResult:
    lora: dict[str, torch.Tensor]  # the LORA_MODEL state dict
    losses: list[float]  # one value per optimizer step: the mean of its micro-batches
    adapters: dict[str, Adapter]
    batch_size: int  # the batch size actually used
    config: TrainConfig  # the run's configuration, "auto" choices resolved for the model
    validation: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, loss)
    previous_steps: int = 0  # the steps of the training state this run resumed


Latents = "torch.Tensor | Sequence[torch.Tensor]"  # one batch, or batches of any sizes


def as_batches(latents) -> list[torch.Tensor]:
    """``latents`` (a tensor ``[N, C, ...]`` or a list of them) as a list of batches."""
    if isinstance(latents, torch.Tensor):
        return [latents]
    if isinstance(latents, (list, tuple)) and latents:
        return list(latents)
    raise ValueError("latents must be a tensor [N, C, ...] or a non-empty list of them; connect "
                     "a LATENT (or a list of LATENTs from ComfyUI's dataset nodes).")


def check_latents(latents) -> None:
    """Every batch of ``latents`` is a finite float tensor [N, C, ...] with N >= 1."""
    batches = as_batches(latents)
    for index, batch in enumerate(batches):
        try:
            _check_batch(batch)
        except ValueError as error:
            if len(batches) == 1:
                raise
            raise ValueError(f"latents[{index}]: {error}") from None


def _check_batch(latents: torch.Tensor) -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim < 3:
        shape = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(
            f"latents must be a tensor [N, C, ...] with a batch dimension; got {shape}. "
            "Connect a LATENT from VAE Encode or Load Latent.")
    if latents.shape[0] == 0:
        raise ValueError("latents hold 0 samples; connect a LATENT with at least one image.")
    if not latents.is_floating_point():
        raise ValueError(f"latents have dtype {latents.dtype}; a float tensor is expected.")
    if not torch.isfinite(latents).all():
        bad = (~torch.isfinite(latents)).flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"latents contain NaN or Inf (samples {bad[:8]}); re-encode those images.")


# What PyTorch says when tensors of incompatible shapes meet: on the first batch that means the
# latents or the conditioning do not fit the model. Any other error is the model's or ours and
# is raised as it is.
_SHAPE_ERRORS = (
    "shapes cannot be multiplied", "must match the size of tensor", "size mismatch",
    "expected input", "channels, but got", "invalid for input of size", "shape '[",
    "dimension out of range", "dimensions of ", "does not match the shape",
    "the size of tensor a",
)


def is_input_mismatch(error: BaseException) -> bool:
    """True for a shape error (what mismatched latents or conditioning raise)."""
    message = str(error).lower()
    return (not isinstance(error, torch.OutOfMemoryError)
            and any(phrase in message for phrase in _SHAPE_ERRORS))


@contextlib.contextmanager
def frozen(network: nn.Module) -> Iterator[None]:
    """No base-weight gradients during the run; every ``requires_grad`` flag restored after.

    Parameters created under ``torch.inference_mode`` (ComfyUI loads models there) can only
    get their flag back inside inference mode, so they are restored there.
    """
    flags = [(p, p.requires_grad) for p in network.parameters() if p.requires_grad]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            with torch.inference_mode(p.is_inference()):
                p.requires_grad_(flag)


def sample_losses(
    task: DiffusionTask,
    objective: Objective,
    dataset: LatentSet,
    samples: torch.Tensor,
    draws: StepDraws,
) -> torch.Tensor:
    """The weighted loss of each of ``samples`` (one shape) with their ``draws``."""
    device = task.device
    bf16 = objective.config.training_dtype == "bf16"

    def predict(x_t, sigma):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return task.predict(x_t, sigma, samples, draws.dropped)

    mask = dataset.mask(samples)
    return objective.losses(predict, dataset.batch(samples).to(device), draws.noise.to(device),
                            draws.sigmas.to(device), None if mask is None else mask.to(device))


def objective_of(task: DiffusionTask, config: TrainConfig) -> Objective:
    return Objective(task, config, can_drop_captions=getattr(task, "can_drop_captions", False))


def prepare(task: DiffusionTask, latents, masks=None) -> LatentSet:
    """The samples of ``latents`` as the model's sampler feeds them, on the CPU in float32."""
    return LatentSet([task.prepare_latents(b).float().cpu() for b in as_batches(latents)],
                     masks)


def fixed_draws(objective: Objective, dataset: LatentSet, draws: int, seed: int):
    """``draws`` (sample, noise, noise level) triples from their own generator, in chunks of
    one shape: the same on every call, whatever the run's generator did."""
    generator = torch.Generator().manual_seed(seed)
    samples = torch.arange(draws) % len(dataset)
    groups = [samples[torch.isin(samples, torch.tensor(indices))]
              for indices in dataset.buckets.values()]
    groups = [g for g in groups if len(g)]
    drawn = objective.draw_groups(
        [torch.Size((len(g), *dataset.samples[int(g[0])].shape)) for g in groups], generator)
    return [(g[start:start + 8], d.part(slice(start, start + 8)))
            for g, d in zip(groups, drawn) for start in range(0, len(g), 8)]


def mean_loss(task: DiffusionTask, objective: Objective, dataset: LatentSet, chunks) -> float:
    """The mean loss of fixed draws, without a graph (the network's patches as they are)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for samples, drawn in chunks:
            total += float(sample_losses(task, objective, dataset, samples, drawn).sum())
            count += len(samples)
    return total / count


def evaluation_objective(task: DiffusionTask, config: TrainConfig) -> Objective:
    """The objective without caption dropout (every sample with its own conditioning: dropout
    is a training device) and with stratified noise levels (an even cover for fewer draws)."""
    return objective_of(task, dataclasses.replace(config, caption_dropout=0.0, stratified=True))


def evaluate(
    task: DiffusionTask,
    latents: Latents,
    config: TrainConfig,
    adapters: Mapping[str, Adapter] | None = None,
    *,
    draws: int = 64,
    seed: int = 1234,
) -> float:
    """Mean loss over fixed (sample, noise, sigma) draws, with ``adapters`` applied if given.

    The draws come from their own generator, so before/after comparisons see the same ones.
    """
    objective = evaluation_objective(task, config)
    dataset = prepare(task, latents)
    chunks = fixed_draws(objective, dataset, draws, seed)
    patches = adapter_patches(task.network, adapters or {})
    with task.session(ForwardPatches(patches)):
        return mean_loss(task, objective, dataset, chunks)


@dataclass
class Validation:
    """The data a run's validation loss is computed on: ``task`` shares the trained network
    (the training task itself, or its ``for_data`` view of other latents and conditioning)."""

    task: DiffusionTask
    latents: Latents | None = None  # None: the training latents
    masks: Sequence[torch.Tensor | None] | None = None
    draws: int = 32
    seed: int = 0

    def prepare(self, config: TrainConfig, training: LatentSet):
        objective = evaluation_objective(self.task, config)
        if self.latents is None:
            dataset = training
        else:
            check_latents(self.latents)
            dataset = prepare(self.task, self.latents, self.masks)
        chunks = fixed_draws(objective, dataset, max(self.draws, len(dataset)), self.seed)
        return lambda: mean_loss(self.task, objective, dataset, chunks)


def train(
    task: DiffusionTask,
    latents: Latents,
    config: TrainConfig,
    *,
    masks: Sequence[torch.Tensor | None] | None = None,
    existing: Mapping[str, Adapter] | None = None,
    existing_deltas: Mapping[str, NormDelta] | None = None,
    on_step: StepCallback | None = None,
    resume: TrainingState | None = None,
    validation: Validation | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    on_preview: Callable[[int], None] | None = None,
    world: World = SINGLE,
) -> TrainResult:
    """Train adapters on ``latents`` and return the LoRA, the losses and the adapters.

    ``latents``: a tensor ``[N, C, ...]`` or a list of them, of any sizes (sample ``i`` is
    the ``i``-th latent in order; each micro-batch holds one size); ``masks``: one
    ``noise_mask`` (or None) per batch, weighting the loss per element.

    ``existing`` (and ``existing_deltas``, its file's norm/bias deltas) continue a LoRA from
    its weights; it may be a function returning both, called once the model runs with the
    weights of its session (so a LoRA already applied to the model is what DoRA reads);
    ``resume`` continues the run of a training state exactly: its adapters are recreated as
    that run made them, from the options, or, for a run that continued a LoRA file, from its
    checkpoint file given as ``existing``. A new LoRA gets deltas when ``train_norm_bias`` is on.
    ``validation`` (default: the training latents) is evaluated every ``validation_every``
    steps; ``on_checkpoint`` gets a :class:`Checkpoint` every ``checkpoint_every`` steps and
    ``on_preview`` the step number every ``preview_every`` steps and at the end. ``world``:
    this process's place in a data-parallel run (:mod:`.distributed`; ``batch_size`` is then
    per process); give the callbacks to one rank only."""
    check_latents(latents)
    if existing is not None and resume is not None and not from_file(resume.info):
        raise ValueError("This training state's adapters were made from its options: resume "
                         "it without existing adapters.")
    if resume is not None and from_file(resume.info) and existing is None:
        raise ValueError("This training state continued a LoRA file: give the adapters of its "
                         "checkpoint file (existing) to resume it.")
    with torch.inference_mode(False), torch.enable_grad():
        dataset = prepare(task, [b.clone() for b in as_batches(latents)], masks)
        return _train(task, dataset, config, existing, existing_deltas, on_step,
                      resume, validation, on_checkpoint, on_preview, world)


@contextlib.contextmanager
def returned_weights(params: list[torch.Tensor], ema: EMA | None,
                     optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The weights the run would return if it ended now (the EMA, a schedule-free
    optimizer's averaged point) in place of the trained ones; those are restored bit for bit
    afterwards (from a copy, not by reversing the arithmetic)."""
    modes = [group["train_mode"] for group in optimizer.param_groups if "train_mode" in group]
    if ema is None and not any(modes):
        yield
        return
    saved = [p.detach().clone() for p in params]
    if ema is not None:
        ema.copy_to_params()
    set_training(optimizer, False)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, copy in zip(params, saved):
                p.copy_(copy)
        for group in optimizer.param_groups:
            if "train_mode" in group:
                group["train_mode"] = True


@dataclass
class _Run:
    """What a run trains and steps with, made inside its session (:func:`_setup`)."""

    config: TrainConfig
    adapters: dict[str, Adapter]
    deltas: dict[str, NormDelta]
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    base_rates: list[float]  # each parameter group's learning rate before the schedule
    ema: EMA | None
    generator: torch.Generator
    sampler: EpochSampler | BucketSampler
    count: int  # samples in the dataset
    batch_size: int  # the micro-batch of all processes together
    done: int  # steps of the training state resumed
    total: int  # steps done at the end of this run
    adapters_from: str  # "options" (made from the config) or "file" (a LoRA file's)

    def state(self, step: int) -> TrainingState:
        """What continues this run exactly after ``step``."""
        tensors = {**module_tensors("adapter", self.adapters),
                   **module_tensors("delta", self.deltas)}
        optimizer_state, optimizer_info = optimizer_tensors(self.optimizer)
        tensors.update(optimizer_state)
        if self.ema is not None:
            tensors.update({f"ema.{i}": s.clone() for i, s in enumerate(self.ema.shadow)})
        tensors["generator"] = self.generator.get_state()
        tensors["sampler.pending"] = self.sampler.pending()
        options = {name: getattr(self.config, name) for name in STATE_OPTIONS}
        return TrainingState(step, self.total, tensors, {
            "options": options, "optimizer": optimizer_info, "latents": self.count,
            "adapters_from": self.adapters_from})

    def due(self, step: int, every: int, at_end: bool) -> bool:
        """Whether something done ``every`` steps (and at the end) is due after ``step``."""
        return every > 0 and (step % every == 0 or (at_end and step == self.total))


def _setup(task, dataset: LatentSet, config, existing, existing_deltas, resume, world: World,
           generator: torch.Generator, adapted: ForwardPatches) -> _Run:
    """The adapters (patched into ``adapted``), optimizer, EMA and sampler of a run, or of the
    run ``resume`` continues. Called once the clone is loaded: its layers hold the weights it
    runs with (a LoRA applied before Train LoRA included), which DoRA reads when it is made."""
    lora_dtype = DTYPES[config.lora_dtype]
    if callable(existing):  # read from a file: built from the weights the clone runs with
        adapters, deltas = existing()
    elif existing is None:
        targets = find_targets(task.network, config.target_layers, config.include,
                               config.exclude)
        adapters = create_adapters(
            task.network, config.algorithm, config.rank, config.adapter_alpha, lora_dtype,
            generator, targets=targets, rslora=config.rslora)
        deltas = create_norm_deltas(task.network, lora_dtype) if config.train_norm_bias else {}
    else:
        adapters, deltas = dict(existing), dict(existing_deltas or {})
    # deltas after adapters: OFT/BOFT rotate base(x) - bias, a bias delta must stay outside
    adapted.extend(adapter_patches(task.network, adapters) + adapter_patches(task.network, deltas))
    if resume is not None:
        load_modules("adapter", adapters, resume.tensors, "adapters")
        load_modules("delta", deltas, resume.tensors, "norm/bias deltas")
    trained = [*adapters.values(), *deltas.values()]
    for module in trained:
        module.compute_dtype = lora_dtype
        module.to(task.device)
    params = [p for module in trained for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = make_optimizer(
        config.optimizer, parameter_groups(trained, config), config.learning_rate,
        weight_decay=config.weight_decay)
    base_rates = [group["lr"] for group in optimizer.param_groups]
    ema = EMA(params, config.ema_decay) if config.ema_decay > 0 else None
    done = 0
    if resume is not None:
        load_optimizer(optimizer, resume.tensors, resume.info["optimizer"])
        if ema is not None:
            ema.load([resume.tensors[f"ema.{i}"] for i in range(len(params))])
        generator.set_state(resume.tensors["generator"])
        done = resume.step
        if resume.planned != done + config.steps:
            log.info("The resumed schedule was planned over %d steps; it now spans %d "
                     "(%d done + %d).", resume.planned, done + config.steps, done, config.steps)
    total = done + config.steps
    if config.warmup_steps and config.warmup_steps >= total:
        raise ValueError(
            f"warmup_steps={config.warmup_steps} is not shorter than the run (steps="
            f"{total}{f', {done} of them resumed' if done else ''}); use fewer warm-up "
            "steps or more steps.")

    count = len(dataset)
    batch_size = config.batch_size * world.size  # cut into shares in each step
    if batch_size > count:
        log.warning("batch_size %d is larger than the %d latents; training with batch_size %d.",
                    batch_size, count, count)
        batch_size = count
    if dataset.uniform:  # shuffled epochs over all samples, as one stream
        sampler = EpochSampler(count, generator)
    else:  # each micro-batch from one bucket of equal shapes
        sampler = BucketSampler(dataset.buckets, batch_size, generator)
        log.info("Latents of %d sizes (%s): each micro-batch holds one size.",
                 len(dataset.buckets), dataset.shape_text())
    if resume is not None:
        sampler.restore(resume.tensors["sampler.pending"])
    return _Run(config, adapters, deltas, params, optimizer, base_rates, ema, generator, sampler,
                count, batch_size, done, total, "options" if existing is None else "file")


def _train(task, dataset: LatentSet, config, existing, existing_deltas, on_step, resume,
           validation, on_checkpoint, on_preview, world: World) -> TrainResult:
    generator = torch.Generator().manual_seed(config.seed)
    objective = objective_of(task, config)
    if resume is not None:
        check_options(resume.info, config, len(dataset))
    losses: list[float] = []
    validated: list[tuple[int, float]] = []
    adapted = ForwardPatches([])
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen(task.network))
        stack.enter_context(task.session(adapted))
        with world.together("setting up", task.device):
            run = _setup(task, dataset, config, existing, existing_deltas, resume, world,
                         generator, adapted)
            validate = None
            if config.validation_every > 0:
                validate = (validation or Validation(task)).prepare(config, dataset)
            stack.enter_context(
                ForwardPatches(run_patches(task, objective, dataset, run.batch_size, config,
                                           adapted)))
        params, optimizer, ema = run.params, run.optimizer, run.ema
        progress = stack.enter_context(tqdm(total=run.total, initial=run.done,
                                            desc="Train LoRA", unit="step", mininterval=1.0,
                                            disable=world.rank != 0))
        set_training(optimizer, True)
        for step in range(run.done + 1, run.total + 1):
            factor = schedule.factor(step, config, run.total)
            for group, rate in zip(optimizer.param_groups, run.base_rates):
                group["lr"] = rate * factor
            micro_batches, draws = step_draws(objective, dataset, run.sampler, run.batch_size,
                                              config.grad_accumulation_steps, generator)
            step_count = sum(len(samples) for samples in micro_batches)
            step_loss = torch.zeros((), device=task.device)
            with world.together(f"computing step {step}", task.device):
                for samples, drawn in zip(micro_batches, draws):
                    share = world.share(len(samples))
                    if share.start == share.stop:
                        continue  # fewer samples than processes: this one has none
                    loss = sample_losses(task, objective, dataset, samples[share],
                                         drawn.part(share)).sum() / step_count
                    loss.backward()
                    step_loss += loss.detach()
            world.sum_gradients(params)
            value = float(world.sum(step_loss))
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"The loss became {value} at step {step} of {run.total}; training "
                    f"stopped and nothing was applied. Lower the learning rate (now "
                    f"{config.learning_rate:g}) or use training_dtype fp32.")
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            losses.append(value)
            validation_loss = None
            if validate is not None and run.due(step, config.validation_every, True):
                with returned_weights(params, ema, optimizer):
                    validation_loss = validate()
                validated.append((step, validation_loss))
            if on_checkpoint is not None and run.due(step, config.checkpoint_every, False):
                saved_state = run.state(step)
                with returned_weights(params, ema, optimizer):
                    lora = export(task, run.adapters, run.deltas)
                on_checkpoint(Checkpoint(step, lora, saved_state, objective.config,
                                         run.adapters))
            if on_preview is not None and run.due(step, config.preview_every, True):
                devices = [task.device] if task.device.type == "cuda" else []
                with returned_weights(params, ema, optimizer), torch.no_grad(), \
                        torch.random.fork_rng(devices=devices):
                    on_preview(step)
            progress.set_postfix(loss=f"{value:.4f}", refresh=False)
            progress.update(1)
            if on_step is not None:
                on_step(StepReport(step, run.total, value, config.learning_rate * factor,
                                   run.adapters, validation_loss))
        set_training(optimizer, False)  # schedule-free: the evaluation weights are the result

    if ema is not None:
        ema.copy_to_params()
    for p in params:
        p.requires_grad_(False)
    return TrainResult(export(task, run.adapters, run.deltas), losses, run.adapters,
                       run.batch_size, objective.config, validated, run.done)


def export(task: DiffusionTask, adapters: Mapping[str, Adapter],
           deltas: Mapping[str, NormDelta]) -> dict[str, torch.Tensor]:
    """The LORA_MODEL dict of the adapters and deltas as they are now."""
    return {**lora_state_dict(adapters, task.key_prefix),
            **lora_state_dict(deltas, task.key_prefix)}


def step_draws(objective: Objective, dataset: LatentSet, sampler, batch_size: int,
               accumulation: int, generator: torch.Generator):
    """One optimizer step's micro-batches (sample indices) and their draws. One size: the
    step's samples and draws are taken at once and split, so batch 4 x 1 and 2 x 2 train on
    the same samples, noise and noise levels; several sizes: one bucket per micro-batch."""
    if isinstance(sampler, EpochSampler):
        samples = sampler.take(batch_size * accumulation)
        shape = torch.Size((len(samples), *dataset.samples[int(samples[0])].shape))
        drawn = objective.draw(shape, generator)
        parts = [slice(start, start + batch_size)
                 for start in range(0, len(samples), batch_size)]
        return [samples[part] for part in parts], [drawn.part(part) for part in parts]
    micro_batches = sampler.take(accumulation)
    shapes = [torch.Size((len(b), *dataset.samples[int(b[0])].shape)) for b in micro_batches]
    return micro_batches, objective.draw_groups(shapes, generator)


def parameter_groups(modules: Iterable[nn.Module], config) -> list[dict]:
    """The optimizer's parameter groups over the trained ``modules`` (adapters and deltas):
    one; with LoRA+ (``lora_plus_ratio`` > 1) the adapters' up/B factors in a second group
    at ``lora_plus_ratio`` x the learning rate (Hayou et al. 2024, "LoRA+: Efficient Low Rank
    Adaptation of Large Models")."""
    modules = list(modules)
    lr, ratio = config.learning_rate, config.lora_plus_ratio
    params = [p for module in modules for p in module.parameters()]
    if ratio == 1.0:
        return [{"params": params, "lr": lr}]
    up = {id(getattr(m, name)) for m in modules for name in m.UP_PARAMETERS}
    if not up:
        names = sorted({type(m).NAME for m in modules})
        raise ValueError(
            f"lora_plus_ratio={ratio:g} needs adapters with up (B) factors; {', '.join(names)} "
            "has none. Set lora_plus_ratio to 1 or pick LoRA, LoHa, LoKr, GLoRA or DoRA.")
    return [{"params": [p for p in params if id(p) not in up], "lr": lr},
            {"params": [p for p in params if id(p) in up], "lr": lr * ratio}]


def run_patches(task: DiffusionTask, objective: Objective, dataset: LatentSet,
                batch_size: int, config, adapted: ForwardPatches) -> list:
    """The run's forward patches besides the adapters (``adapted``, installed): guards for
    the blocks that the first batch shows writing into their inputs, then checkpointing."""
    blocks = checkpoint_blocks(task.network)
    mutating = find_mutating_blocks(
        blocks, lambda: first_batch(task, objective, dataset, batch_size))
    patches = inplace_patches(mutating)
    if config.gradient_checkpointing:
        layers = {id(module) for module, _ in adapted.patches}
        for block in checkpointable(blocks, mutating):
            trainable = any(id(m) in layers or any(p.requires_grad for p in m.parameters(False))
                            for m in block.modules())
            patches.append((block, functools.partial(checkpointed, trainable=trainable)))
    return patches


def first_batch(task: DiffusionTask, objective: Objective, dataset: LatentSet,
                batch_size: int) -> None:
    """One forward of the first ``batch_size`` latents of each size without a graph (so its
    peak memory is a forward's, whatever checkpointing saves later): it shows what the blocks
    do to their inputs, and a shape error here means the latents or the conditioning do not
    fit."""
    # with caption dropout, the empty conditioning must fit the model too
    probes = [(False, "the conditioning from its text encoder")]
    if objective.config.caption_dropout > 0:
        probes.append((True, "empty_conditioning from its text encoder"))
    for indices in dataset.buckets.values():
        samples = torch.tensor(indices[:batch_size])
        shape = dataset.samples[indices[0]].shape
        sigmas = objective.sample_sigmas(len(samples), torch.Generator().manual_seed(0))
        noise = torch.zeros((len(samples), *shape))
        for drop, source in probes:
            dropped = torch.ones(len(samples), dtype=torch.bool) if drop else None
            try:
                with torch.no_grad():
                    sample_losses(task, objective, dataset, samples,
                                  StepDraws(noise, sigmas, dropped))
            except RuntimeError as error:
                if not is_input_mismatch(error):
                    raise
                raise ValueError(
                    f"The model could not run on the first batch (latents {list(shape)}): "
                    f"{error}. Check that the latents come from this model's VAE and "
                    f"{source}.") from error
