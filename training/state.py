"""A run's training state: everything an exact continuation needs, as one file.

The state holds the adapters' fp32 master weights (and norm/bias deltas), the optimizer's
state, the EMA weights, the run's generator and the samples still pending in the current
epoch as tensors; the step count, the schedule's planned length, the optimizer's parameter
groups and the options a continuation must share as JSON. It is written as a safetensors
file whose header metadata carries the JSON under ``lora_lab.training_state`` (no pickle),
beside the checkpoint's LoRA: ``<name>.safetensors`` -> ``<name>.training_state``, a name
ComfyUI's LoRA lists do not show.

A run resumed from a state recreates its adapters exactly as the first run made them (same
algorithm, rank, alpha, layers), loads every tensor back and continues with the same
generator and data order, so ``k`` steps + a resume of ``N - k`` steps equal ``N`` steps bit
for bit (``tests/test_resume.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

STATE_SUFFIX = ".training_state"
_KEY = "lora_lab.training_state"
FORMAT = 1

# Options that define what is trained and how the optimizer's state reads: a state made with
# other values cannot continue, so a difference is a ValueError (the others may change).
MUST_MATCH = (
    "algorithm", "rank", "alpha", "rslora", "target_layers", "include", "exclude",
    "train_norm_bias", "lora_dtype", "optimizer", "lora_plus_ratio", "ema_decay",
)
# A run that continued a LoRA file's weights trained the file's adapters (its algorithm,
# ranks, alphas, layers and deltas, whatever the options said): its states are resumed from
# the checkpoint's LoRA file, and only these options must match.
MUST_MATCH_FROM_FILE = ("lora_dtype", "optimizer", "lora_plus_ratio", "ema_decay")


def state_path(lora_path: str) -> str:
    """Where the training state of the LoRA file ``lora_path`` lives."""
    stem = lora_path[:-len(".safetensors")] if lora_path.endswith(".safetensors") else lora_path
    return stem + STATE_SUFFIX


@dataclass
class TrainingState:
    step: int  # optimizer steps done, over every resume
    planned: int  # the learning-rate schedule's planned length (in optimizer steps)
    tensors: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)  # JSON: options, optimizer groups, model facts

    def save(self, path: str) -> None:
        """Write atomically and never over an existing file: a temporary file in the same
        folder, then a hard link to ``path`` (``FileExistsError`` if it exists)."""
        from safetensors.torch import save_file

        header = {"format": FORMAT, "step": self.step, "planned": self.planned, **self.info}
        tmp = f"{path}.{os.getpid()}.tmp"
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        try:
            save_file(tensors, tmp, metadata={_KEY: json.dumps(header)})
            os.link(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> "TrainingState":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:
            raise ValueError(
                f"The training state {path!r} could not be read ({error}); delete it to "
                "continue from the LoRA's weights alone.") from error
        if _KEY not in metadata:
            raise ValueError(f"{path!r} is not a LoRA Lab training state (no {_KEY} header).")
        info = json.loads(metadata[_KEY])
        if info.get("format") != FORMAT:
            raise ValueError(
                f"The training state {path!r} has format {info.get('format')}; this version "
                f"reads format {FORMAT}. Continue from the LoRA's weights alone by removing it.")
        info.pop("format")
        return cls(int(info.pop("step")), int(info.pop("planned")), tensors, info)


# -- capture and restore -------------------------------------------------------------------

def module_tensors(prefix: str, modules: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}.{pname}": p.detach().clone()
            for name, module in modules.items() for pname, p in module.named_parameters()}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The optimizer's state as tensors plus JSON (its groups and scalar state entries)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().clone()
            else:
                scalars[f"{index}.{name}"] = _json_value(value, f"optimizer state {name}")
    groups = []
    for group_index, group in enumerate(state["param_groups"]):
        plain = {}
        for name, value in group.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer_group.{group_index}.{name}"] = value.detach().clone()
            else:
                plain[name] = _json_value(value, f"optimizer setting {name}")
        groups.append(plain)
    return tensors, {"groups": groups, "scalars": scalars}


def _json_value(value, what: str):
    if isinstance(value, tuple):
        return {"tuple": [_json_value(v, what) for v in value]}
    if isinstance(value, list):
        return [_json_value(v, what) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"The {what} ({type(value).__name__}) cannot be stored in a training "
                     "state; turn checkpoint_every off with this optimizer.")


def _from_json(value):
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_from_json(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                   info: Mapping) -> None:
    groups = [{k: _from_json(v) for k, v in group.items()} for group in info["groups"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if not key.startswith(("optimizer.", "optimizer_group.")):
            continue
        kind, index, name = key.split(".", 2)
        if kind == "optimizer":
            state.setdefault(int(index), {})[name] = value.clone()
        elif kind == "optimizer_group":
            groups[int(index)][name] = value.clone()
    for key, value in info["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = _from_json(value)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_modules(prefix: str, modules: Mapping[str, torch.nn.Module],
                 tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy the state's ``prefix.*`` tensors into ``modules``; any difference of names or
    shapes (another model, other layers) is a ValueError naming the first one."""
    expected = {f"{prefix}.{name}.{pname}": p
                for name, module in modules.items() for pname, p in module.named_parameters()}
    stored = {k: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        example = (f"this run has {missing[0]!r}, the state has not" if missing
                   else f"the state has {extra[0]!r}, this run has not")
        raise ValueError(
            f"The training state's {what} do not fit this model ({len(missing)} missing, "
            f"{len(extra)} extra; {example}). It was made for another model or other layers; "
            "connect the model it was trained on, or start a new LoRA ([None]).")
    for key, param in expected.items():
        if tuple(stored[key].shape) != tuple(param.shape):
            raise ValueError(
                f"The training state's {key} has shape {list(stored[key].shape)}, this run's "
                f"{list(param.shape)}: it was made for another model; connect the model it "
                "was trained on, or start a new LoRA ([None]).")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(stored[key])


def from_file(info: Mapping) -> bool:
    """Whether the state's run trained a LoRA file's adapters (rebuilt from its checkpoint
    file on resume) rather than adapters made from its options."""
    return info.get("adapters_from") == "file"


def check_options(info: Mapping, config, latents_count: int) -> None:
    """A ValueError naming every option that differs from the state's (:data:`MUST_MATCH`)
    and a dataset of another size (the pending data order indexes it)."""
    saved = info.get("options", {})
    names = MUST_MATCH_FROM_FILE if from_file(info) else MUST_MATCH
    differ = [f"{name}={getattr(config, name)!r} (the state has {saved[name]!r})"
              for name in names if name in saved and saved[name] != getattr(config, name)]
    if differ:
        raise ValueError(
            "This run cannot continue the training state: " + "; ".join(differ) + ". Set "
            "them back to the state's values to resume, or start a new LoRA ([None]).")
    if info.get("latents") not in (None, latents_count):
        raise ValueError(
            f"The training state was made on {info['latents']} latents; this run has "
            f"{latents_count}. Resume with the same dataset, or start a new LoRA ([None]).")
