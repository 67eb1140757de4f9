"""The training configuration; its help texts are also the node's tooltips."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _opt(
        1, "Samples per micro-batch. Larger than the number of latents: all latents are used, "
        "with a warning. Every sample is trained with its own conditioning.")
    grad_accumulation_steps: int = _opt(
        1, "Micro-batches per optimizer step; gradients are averaged over them, so an "
        "optimizer step sees batch_size x grad_accumulation_steps samples.")
    steps: int = _opt(16, "Optimizer steps to train for (not counting micro-batches).")
    learning_rate: float = _opt(0.0005, "Learning rate of the optimizer.")
    rank: int = _opt(
        8, "Size of the adapters. LoRA, DoRA, LoHa, GLoRA: the inner dimension r; LoKr: the "
        "Kronecker factor; OFT, BOFT: the block size. A layer too small for it uses what it "
        "allows. Ignored when continuing an existing LoRA, which keeps its own.")
    alpha: float = _opt(1.0, "LoRA alpha: the delta is scaled by alpha / rank.")
    optimizer: str = _opt("AdamW", "Optimizer; torch's default hyperparameters.")
    loss_function: str = _opt(
        "MSE", "Loss between the model's prediction and its native target (noise for eps "
        "models, v for v-prediction, velocity noise - x0 for flow models).")
    seed: int = _opt(
        0, "Seed of the one generator behind LoRA init, batch order, noise and timesteps: the "
        "same inputs and seed give the same LoRA on CPU. The global RNG is left untouched.")
    training_dtype: str = _opt(
        "bf16", "bf16: run the model under bf16 autocast (faster, less memory). fp32: no "
        "autocast.")
    lora_dtype: str = _opt(
        "bf16", "Dtype of the saved adapter weights and of the adapter in the forward pass. "
        "The optimizer always updates fp32 master weights, so small bf16 updates are not lost.")
    algorithm: str = _opt(
        "LoRA", "The adapter algorithm to train: LoRA, LoHa, LoKr, OFT, BOFT, GLoRA or DoRA. "
        "When continuing an existing LoRA, the file's own algorithm is used, whatever this says.")
    gradient_checkpointing: bool = _opt(
        True, "Recompute the model's blocks in backward instead of storing their activations: "
        "less memory, about one more forward of time per step.")

    def __post_init__(self) -> None:
        for name, low, high in (
            ("batch_size", 1, 10000), ("grad_accumulation_steps", 1, 1024),
            ("steps", 1, 100000), ("rank", 1, 128), ("seed", 0, 2**64 - 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name}={value!r} is out of range; use an integer in {low}..{high}.")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate <= 1.0):
            raise ValueError(
                f"learning_rate={self.learning_rate!r} is out of range; use a value in (0, 1].")
        for name in ("training_dtype", "lora_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported; choose one of {', '.join(DTYPES)}.")

    @classmethod
    def help(cls, name: str) -> str:
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)
