"""The command-line demo: train a LoRA on a small built-in model with synthetic data.

``python -m lora_lab demo [--out DIR] [--steps N]`` writes ``DIR/*.safetensors`` (the same
keys the Train LoRA node outputs) and ``DIR/loss.png``, and prints the loss before and after.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from .. import __version__
from ..lora.io import lora_file_metadata, save_lora_file
from ..training.config import TrainConfig
from ..training.loop import evaluate, train
from ..training.options import OPTIONS_NODE, markdown_table, training_metadata
from ..training.plot import png_bytes, render_loss_plot
from ..training.task import TorchTask, discrete_vp_sigmas
from .models import TinyUNet


def synthetic_dataset(count: int = 8, size: int = 16, context_tokens: int = 8,
                      context_dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth stripe patterns (one orientation and frequency per sample) and a context each."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    latents = []
    for i in range(count):
        angle = torch.rand((), generator=g) * torch.pi
        freq = 1.5 + 2.5 * torch.rand((), generator=g)
        phase = torch.rand(4, 1, 1, generator=g) * 2 * torch.pi
        wave = torch.sin(freq * torch.pi * (xx * angle.cos() + yy * angle.sin()) + phase)
        latents.append(wave * (0.8 + 0.4 * torch.rand(4, 1, 1, generator=g)))
    context = torch.randn(count, context_tokens, context_dim, generator=g)
    return torch.stack(latents), context


def build_task(seed: int = 0) -> tuple[TorchTask, torch.Tensor]:
    torch_state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        network = TinyUNet(channels=32, context_dim=32).eval()
    finally:
        torch.set_rng_state(torch_state)
    latents, context = synthetic_dataset(seed=seed)
    return TorchTask(network, "eps", discrete_vp_sigmas(), context), latents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a LoRA on a small built-in model")
    demo.add_argument("--out", default="lora_lab_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("options-table", help="print the README's Training Options table")
    args = parser.parse_args(argv)
    if args.command == "options-table":
        print(markdown_table(OPTIONS_NODE))
        return 0

    task, latents = build_task(args.seed)
    config = TrainConfig(
        steps=args.steps, batch_size=4, learning_rate=2e-3, rank=8, alpha=8.0,
        training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False, seed=args.seed)
    params = sum(p.numel() for p in task.network.parameters())
    print(f"model: TinyUNet, {params / 1e6:.2f}M parameters, eps prediction; "
          f"{latents.shape[0]} latents {list(latents.shape[1:])}")
    before = evaluate(task, latents, config)
    start = time.perf_counter()
    result = train(task, latents, config)
    elapsed = time.perf_counter() - start
    after = evaluate(task, latents, config, result.adapters)

    os.makedirs(args.out, exist_ok=True)
    metadata = lora_file_metadata(result.lora, training_metadata(
        config, steps=args.steps, algorithm=config.algorithm, rank=config.rank,
        alpha=config.adapter_alpha, batch_size=result.batch_size, base_model="TinyUNet",
        version=__version__))
    path = save_lora_file(result.lora, args.out, f"demo_lora_{args.steps}_steps", metadata)
    plot_path = os.path.join(args.out, "loss.png")
    with open(plot_path, "wb") as f:
        f.write(png_bytes(render_loss_plot({"loss": result.losses})))
    print(f"trained {args.steps} steps in {elapsed:.1f} s")
    print(f"loss before: {before:.4f}")
    print(f"loss after:  {after:.4f} ({(1 - after / before) * 100:.1f}% lower)")
    print(f"wrote {path} ({len(result.lora)} tensors) and {plot_path}")
    return 0
