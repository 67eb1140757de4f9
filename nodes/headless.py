"""The headless trainer behind ``python -m lora_lab train``: the Train LoRA node's engine on
a model file and a Save Training Data folder, one process or many under ``torchrun``.

The model is loaded with ComfyUI's own loader (``comfy.sd.load_diffusion_model``), the data
with :func:`~..training.data_files.load_training_data`, and the run is the node's
(:func:`~..training.loop.train` over :class:`~.bridge.ComfyTask`). Under ``torchrun`` every
process trains its share of each step (:mod:`..training.distributed`; NCCL on GPUs, gloo on
CPU); only rank 0 prints and writes: the LoRA with Save LoRA's naming and metadata, its
checkpoints with their training states, and ``loss.png``.
"""

from __future__ import annotations

import logging
import os

import torch

import comfy.sd

from .. import __version__
from ..lora.io import lora_file_metadata, save_lora_file
from ..training.config import DTYPES, TrainConfig
from ..training.data_files import load_training_data
from ..training.distributed import from_environment
from ..training.loop import train
from ..training.plot import png_bytes, render_loss_plot
from ..training.state import state_path
from .bridge import ComfyTask, check_latents_fit, training_clone
from .long_runs import CheckpointWriter, continuation, run_metadata
from .lora_keys import exported
from .train import latent_batches, per_sample_conditioning

log = logging.getLogger(__name__)


def run(model_path: str, data: str, out: str, values: dict, *, name: str = "lora",
        resume: str | None = None, format: str = "comfyui") -> str | None:
    """Train and, on rank 0, write the LoRA into ``out``; returns its path (None on other
    ranks). ``values``: Train LoRA and Training Options values; ``format``: Save LoRA's."""
    world = from_environment()
    if world.distributed:
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        config = TrainConfig(**values)
        latents, positive = load_training_data(data)
        batches, masks = latent_batches(latents)
        entries = per_sample_conditioning(positive, batches)
        model = comfy.sd.load_diffusion_model(model_path)
        check_latents_fit(model, batches)
        if resume is not None and not os.path.exists(state_path(resume)):
            raise ValueError(f"{resume!r} has no training state beside it; give a checkpoint "
                             "this trainer or Train LoRA wrote with checkpoint_every.")
        leader = world.rank == 0
        batch = min(config.batch_size * world.size, sum(b.shape[0] for b in batches))
        writer = CheckpointWriter(model, config, batch, out) \
            if config.checkpoint_every and leader else None
        with torch.inference_mode(False):
            task = ComfyTask(training_clone(model), entries, batches, config.training_dtype)
            existing, state, previous = None, None, 0
            if resume is not None:
                existing, previous, state = continuation(resume, task, DTYPES[config.lora_dtype])
            if writer is not None:  # a checkpoint's steps count from the file's first
                writer.steps_before = previous - (state.step if state else 0)
            result = train(task, batches, config, masks=masks, existing=existing,
                           resume=state, world=world, on_checkpoint=writer)
        if not leader:
            return None
        steps = previous + config.steps
        metadata = run_metadata(result.config, steps=steps, adapters=result.adapters,
                                batch_size=result.batch_size, model=model)
        tensors, implementation = exported(result.lora, format, model)
        header = lora_file_metadata(result.lora, metadata, steps, __version__, title=name,
                                    format=format, implementation=implementation)
        path = save_lora_file(tensors, out, name, header, steps)
        with open(os.path.join(out, "loss.png"), "wb") as f:
            series = {"loss": result.losses}
            if result.validation:
                series["validation"] = [[step, value] for step, value in result.validation]
            f.write(png_bytes(render_loss_plot(series)))
        print(f"wrote {path} ({len(result.lora)} tensors, {steps} steps, world size "
              f"{world.size}) and {os.path.join(out, 'loss.png')}")
        return path
    finally:
        if world.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
