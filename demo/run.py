"""The command-line demo: train a LoRA on a small built-in model with synthetic data.

``python -m lora_lab demo [--out DIR] [--steps N] [--seed S]`` writes ``DIR/*.safetensors``
(the same keys the Train LoRA node outputs) and ``DIR/loss.png``, and prints the loss before
and after on fixed evaluation draws. Bad arguments are argparse errors (exit 2), checked
before anything trains.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from .. import __version__
from ..lora.export import FORMATS
from ..lora.io import lora_file_metadata, save_lora_file
from ..training.config import TrainConfig
from ..training.loop import evaluate, train
from ..training.options import DECLARED, OPTIONS_NODE, markdown_table, training_metadata
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


def _steps(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or not 1 <= value <= 100000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step count; use 1..100000")
    return value


def _output_folder(path: str) -> str:
    """A folder the demo can write into: created (if missing) before anything trains."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r} is a file; give a folder (it is created)")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"cannot write into {path!r} ({error.strerror}); pick another folder") from None
    return path


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    top = argparse.ArgumentParser(
        prog="python -m lora_lab",
        description="LoRA Lab from the command line (the nodes run inside ComfyUI).")
    sub = top.add_subparsers(dest="command", required=True, metavar="command")
    demo = sub.add_parser(
        "demo", help="train a LoRA on a small built-in model with synthetic data",
        description="Train a LoRA on a small built-in UNet with synthetic data (no ComfyUI, "
                    "no download): prints the loss before and after on fixed evaluation "
                    "draws, and writes the LoRA and a plot of the training loss.")
    demo.add_argument("--out", default="lora_lab_demo", type=_output_folder,
                      help="output folder, created if missing (default: %(default)s)")
    demo.add_argument("--steps", type=_steps, default=200,
                      help="optimizer steps, 1..100000 (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the model, the data and the training (default: %(default)s)")
    table = sub.add_parser(
        "options-table", help="print the README's Training Options table",
        description="Print the Training Options table of README.md (markdown).")
    trainer = sub.add_parser(
        "train", help="train on a model file and a Save Training Data folder (ComfyUI needed)",
        description="Train a LoRA headless with the Train LoRA node's engine: the model is "
                    "loaded with ComfyUI's own loader (ComfyUI importable, or COMFYUI_DIR set "
                    "to a checkout), the data is a folder that Save Training Data wrote. Under "
                    "torchrun (torchrun --nproc-per-node N -m lora_lab train ...) it trains "
                    "data-parallel: batch_size is per process.")
    trainer.add_argument("--model", required=True, type=_existing_file,
                         help="the diffusion model file (as Load Diffusion Model reads it)")
    trainer.add_argument("--data", required=True, type=_existing_folder,
                         help="a folder Save Training Data wrote")
    trainer.add_argument("--out", required=True, type=_output_folder,
                         help="output folder for the LoRA, its checkpoints and loss.png")
    trainer.add_argument("--name", default="lora",
                         help="file name of the LoRA in --out (default: %(default)s)")
    trainer.add_argument("--resume", type=_existing_file, default=None,
                         help="a checkpoint with its .training_state: continue its run exactly")
    trainer.add_argument("--format", choices=FORMATS, default="comfyui",
                         help="key names of the LoRA file, as Save LoRA's format (default: "
                              "%(default)s; kohya: what A1111, Forge, InvokeAI and diffusers read)")
    for option in DECLARED:  # every Train LoRA and Training Options setting
        trainer.add_argument(f"--{option.name}", **_argument(option))
    return top, {"demo": demo, "options-table": table, "train": trainer}


def _argument(option) -> dict:
    """argparse settings of a declared option (its type, choices and default)."""
    settings = {"default": option.default, "help": option.help.replace("%", "%%")}
    if option.kind == "INT":
        settings["type"] = int
    elif option.kind == "FLOAT":
        settings["type"] = float
    elif option.kind == "BOOLEAN":
        settings["type"] = _boolean
        settings["metavar"] = "true|false"
    elif option.kind == "COMBO":
        settings["choices"] = option.options()
    return settings


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path!r} is not a file")
    return path


def _existing_folder(path: str) -> str:
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r} is not a folder")
    return path


def import_comfyui() -> str | None:
    """Make ComfyUI importable (``COMFYUI_DIR``, else an installed one) for the headless
    trainer, on the CPU when torch has no GPU; returns an error message, or None."""
    import sys

    folder = os.environ.get("COMFYUI_DIR", "").strip()
    if folder:
        folder = os.path.abspath(os.path.expanduser(folder))
        if not os.path.isfile(os.path.join(folder, "comfy", "model_management.py")):
            return f"COMFYUI_DIR={folder} is not a ComfyUI checkout (no comfy/model_management.py)"
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        import comfy.cli_args
        import comfy.options  # noqa: F401  (imported first: it decides argument parsing)
    except ImportError:
        return ("ComfyUI is not importable: set COMFYUI_DIR to a ComfyUI checkout (the same "
                "ComfyUI on every machine of a distributed run)")
    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = not torch.cuda.is_available()
    return None


def main(argv: list[str] | None = None) -> int:
    top, commands = parser()
    args, extra = top.parse_known_args(argv)
    if extra:  # reported by the command's own parser, with its usage
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "options-table":
        print(markdown_table(OPTIONS_NODE))
        return 0
    if args.command == "train":
        return run_train(args, commands["train"])
    return run_demo(args)


def run_train(args: argparse.Namespace, command: argparse.ArgumentParser) -> int:
    values = {option.name: getattr(args, option.name) for option in DECLARED}
    try:
        TrainConfig(**values)  # a bad value is an argument error, before anything loads
    except ValueError as error:
        command.error(str(error))
    problem = import_comfyui()
    if problem is not None:
        command.error(problem)
    from ..nodes.headless import run

    run(args.model, args.data, args.out, values, name=args.name, resume=args.resume,
        format=args.format)
    return 0


def run_demo(args: argparse.Namespace) -> int:
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
    print("loss on 64 fixed evaluation draws (the same noise and timesteps before and after):")
    print(f"  before: {before:.4f}")
    print(f"  after:  {after:.4f} ({(1 - after / before) * 100:.1f}% lower)")
    print(f"the plot shows the training loss of each step (random draws, noisier); its last "
          f"value: {result.losses[-1]:.4f}")
    print(f"wrote {path} ({len(result.lora)} tensors) and {plot_path}")
    return 0
