"""Long runs in ComfyUI: checkpoint files in the loras folder, previews sampled with
ComfyUI's own sampler, and the training state a checkpoint picked in existing_lora resumes."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

import comfy.sample
import folder_paths

from .. import __version__
from ..lora.io import (
    lora_file_metadata, lora_from_state_dict, read_lora_file, save_lora_file, steps_of,
)
from ..training.options import training_metadata
from ..training.state import TrainingState, from_file, state_path
from .lora_keys import to_diffusion_model_keys
from .save import loras_folder

log = logging.getLogger(__name__)

PREVIEW_SAMPLER = ("euler", "simple", 1.0)  # sampler, scheduler, cfg


def run_metadata(config, *, steps: int, adapters, batch_size: int, model) -> dict[str, str]:
    """A saved file's ``lora_lab.*`` header for a run's result (or checkpoint)."""
    adapter = next(iter(adapters.values()))
    model_config = getattr(model.model, "model_config", None)
    return training_metadata(
        config, steps=steps, algorithm=type(adapter).NAME,
        rank=getattr(adapter, "rank", config.rank),
        alpha=getattr(adapter, "alpha", config.adapter_alpha), batch_size=batch_size,
        base_model=type(model_config or model.model).__name__, version=__version__)


def default_prefix(config, model) -> str:
    model_config = getattr(model.model, "model_config", None)
    base = type(model_config or model.model).__name__
    return f"checkpoints/{base}_{config.algorithm}_r{config.rank}_seed{config.seed}"


class CheckpointWriter:
    """``on_checkpoint``: the LoRA as Save LoRA writes it (naming, metadata, no overwrite,
    atomic), then its training state beside it; with ``keep`` > 0 only the newest ``keep``
    checkpoints this writer wrote are kept (it never deletes a file it did not write)."""

    def __init__(self, model, config, batch_size: int, folder: str | None = None) -> None:
        """``folder``: where checkpoints go (default: the loras folder)."""
        self.model = model
        self.prefix = config.checkpoint_prefix.strip() or default_prefix(config, model)
        self.keep = config.keep_checkpoints
        self.batch_size = batch_size
        self.folder = folder or loras_folder()
        self.written: list[tuple[str, str]] = []
        # steps a continued LoRA file had before the run's first: part of a checkpoint's
        # total (its name and metadata), and kept in its state for the runs resuming it
        self.steps_before = 0

    def check(self) -> None:
        """Refuse a bad prefix before the run starts, not at its first checkpoint."""
        from ..lora.io import lora_file_target

        try:
            lora_file_target(self.folder, self.prefix)
        except ValueError as error:
            raise ValueError(str(error).replace("filename_prefix", "checkpoint_prefix")) from None

    def __call__(self, checkpoint) -> None:
        steps = self.steps_before + checkpoint.step
        metadata = run_metadata(checkpoint.config, steps=steps, adapters=checkpoint.adapters,
                                batch_size=self.batch_size, model=self.model)
        header = lora_file_metadata(checkpoint.lora, metadata, steps, __version__)
        path = save_lora_file(checkpoint.lora, self.folder, self.prefix, header, steps)
        checkpoint.state.info["steps_before"] = self.steps_before
        state = state_path(path)
        try:
            checkpoint.state.save(state)
        except FileExistsError:
            log.warning("%s exists and was not written by this run; the checkpoint %s has its "
                        "weights only.", state, path)
            state = None
        folder_paths.filename_list_cache.pop("loras", None)
        log.info("checkpoint at step %d: %s", steps, path)
        self.written.append((path, state))
        while self.keep and len(self.written) > self.keep:
            for old in self.written.pop(0):
                if old is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(old)


def training_state_for(lora_path: str) -> TrainingState | None:
    """The training state beside a LoRA file, if there is one."""
    path = state_path(lora_path)
    if not os.path.exists(path):
        return None
    return TrainingState.load(path)


def continuation(path: str, task, lora_dtype: torch.dtype):
    """How to continue the LoRA file ``path``: ``(adapters, previous steps, state)``.

    With a training state beside it, the run resumes exactly (``state``); its adapters are
    remade from the options, or, when that run itself continued a LoRA file, from this file
    (``adapters``). Without one it continues from the file's weights (the optimizer, schedule
    and data order start afresh). ``adapters`` is a function that builds the file's adapters
    and norm/bias deltas, called once the training clone is loaded; kohya and PEFT/diffusers
    names are mapped to ``diffusion_model.<layer>`` through ComfyUI's key map for the model."""
    name = os.path.basename(path)
    state = training_state_for(path)
    if state is not None:
        log.info("Resuming the run of %s exactly from its training state (step %d).", name,
                 state.step)
        if not from_file(state.info):
            return None, state_steps(state), state
    else:
        log.info("%s has no training state beside it: continuing from its weights (the "
                 "optimizer, schedule and data order start afresh).", name)
    tensors, metadata = read_lora_file(path)
    tensors = to_diffusion_model_keys(task.patcher, tensors)
    lora_from_state_dict(task.network, tensors, task.key_prefix, lora_dtype)  # checked now

    def adapters():  # built again once the clone is loaded, from the weights it runs with
        return lora_from_state_dict(task.network, tensors, task.key_prefix, lora_dtype)

    steps = state_steps(state) if state is not None else steps_of(metadata, name)
    return adapters, steps, state


def state_steps(state: TrainingState) -> int:
    """The total steps at a training state: its run's, and those of the LoRA file that run
    continued."""
    return state.step + int(state.info.get("steps_before", 0))


class Previews:
    """``on_preview``: one image per preview conditioning, sampled with ComfyUI's sampler
    (euler, simple, cfg 1, ``steps`` steps, noise from ``seed``) on the training clone with
    the adapters as they are, decoded with ``vae``; kept in step order for the grid."""

    def __init__(self, task, vae, conditioning, latents: torch.Tensor, seed: int,
                 steps: int) -> None:
        if vae is None or not hasattr(vae, "decode"):
            raise ValueError("preview_every needs the vae input of Training Options (the "
                             "model's VAE); connect one or set preview_every to 0.")
        if not isinstance(conditioning, (list, tuple)) or not conditioning:
            raise ValueError("preview_every needs the preview_conditioning input of Training "
                             "Options (the prompts to preview); connect one or set "
                             "preview_every to 0.")
        self.task, self.vae, self.seed, self.steps = task, vae, seed, steps
        self.conditioning = list(conditioning)
        self.latent = torch.zeros_like(latents[:1])
        self.rows: list[tuple[int, torch.Tensor]] = []

    def __call__(self, step: int) -> None:
        sampler, scheduler, cfg = PREVIEW_SAMPLER
        images = []
        for entry in self.conditioning:
            noise = comfy.sample.prepare_noise(self.latent, self.seed)
            with self.task.previewing():
                out = comfy.sample.sample(
                    self.task.patcher, noise, self.steps, cfg, sampler, scheduler, [entry],
                    [entry], self.latent, disable_pbar=True, seed=self.seed)
                image = self.vae.decode(out)
            if image.ndim == 5:  # video: the first frame
                image = image[:, 0]
            images.append(image[:1].float().cpu().clamp(0, 1))
        self.rows.append((step, torch.cat(images)))

    def grid(self) -> torch.Tensor:
        """[1, rows x H, columns x W, 3]: a row per preview step, a column per prompt."""
        if not self.rows:
            return blank_image()
        rows = [torch.cat(list(images), dim=1) for _, images in self.rows]
        return torch.cat(rows, dim=0).unsqueeze(0)

    def latest(self) -> torch.Tensor | None:
        """The newest row, [H, columns x W, 3]."""
        return torch.cat(list(self.rows[-1][1]), dim=1) if self.rows else None


def blank_image() -> torch.Tensor:
    return torch.zeros(1, 64, 64, 3)
