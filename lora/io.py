"""Reading LoRA files to continue them: safetensors only, validated before use."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
from typing import Mapping

import torch
from torch import nn

from . import ADAPTERS, DETECTION_ORDER
from .base import Adapter
from .diff import NormDelta, is_norm_delta_key, norm_deltas_from_state_dict
from .inject import find_targets

log = logging.getLogger(__name__)

STEPS_METADATA_KEYS = ("lora_lab.steps", "ss_steps")
_STEPS_IN_NAME = re.compile(r"_(\d+)_steps_")


def read_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a ``.safetensors`` LoRA (never unpickles anything)."""
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    if not path.lower().endswith(".safetensors"):
        raise ValueError(
            f"existing_lora {name!r} is not a .safetensors file; only safetensors LoRAs can be "
            "continued (pickle formats can run code). Convert it or pick another file."
        )
    if not os.path.isfile(path):
        raise ValueError(f"existing_lora {name!r} was not found at {path}; pick a listed file.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"existing_lora {name!r} is not a readable safetensors file ({error}); it may be "
            "truncated or corrupted. Save it again or pick another file."
        ) from None
    return tensors, metadata


def steps_of(metadata: Mapping[str, str], filename: str) -> int:
    """Steps a LoRA already has: from its metadata, else its ``_<N>_steps_`` name, else 0."""
    for key in STEPS_METADATA_KEYS:
        value = metadata.get(key, "")
        if value.isdigit():
            return int(value)
    match = _STEPS_IN_NAME.search(os.path.basename(filename))
    if match:
        return int(match.group(1))
    log.warning(
        "%s has no step count in its metadata or name; counting its steps as 0.", filename
    )
    return 0


def modules_by_algorithm(
    tensors: Mapping[str, torch.Tensor], prefix: str = ""
) -> dict[type[Adapter], list[str]]:
    """The module names (after ``prefix``) each algorithm's keys name, in sorted order."""
    modules = {key[: -len(suffix) - 1] for key in tensors if key.startswith(prefix)
               for cls in DETECTION_ORDER for suffix in cls.identifying_suffixes()
               if key.endswith("." + suffix)}
    found: dict[type[Adapter], set[str]] = {}
    for module in modules:
        cls = next((c for c in DETECTION_ORDER if c.identifies(tensors, module)), None)
        if cls is not None:
            found.setdefault(cls, set()).add(module[len(prefix):])
    return {cls: sorted(found[cls]) for cls in ADAPTERS.values() if cls in found}


def detect_algorithm(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> type[Adapter]:
    """The adapter class whose keys the file uses (one algorithm per file)."""
    found = modules_by_algorithm(tensors, prefix)
    if len(found) == 1:
        return next(iter(found))
    if not found:
        sample = ", ".join(sorted(tensors)[:3]) or "no tensors"
        raise ValueError(
            f"The LoRA holds no keys of a known algorithm ({', '.join(ADAPTERS)}); first keys: "
            f"{sample}. Pick a LoRA file saved for a diffusion model.")
    mix = ", ".join(f"{cls.NAME} ({len(names)} layers)" for cls, names in found.items())
    raise ValueError(
        f"The LoRA mixes algorithms: {mix}; only a file of one algorithm can be continued.")


def _adapters(network, tensors, prefix, dtype) -> tuple[type[Adapter], dict[str, Adapter], set]:
    """The file's adapters (one algorithm), checked against ``network``, and the keys used."""
    if not modules_by_algorithm(tensors):
        detect_algorithm(tensors)  # raises: no known keys at all
    found = modules_by_algorithm(tensors, prefix)
    if not found:
        raise ValueError(
            f"The LoRA has no keys under {prefix!r}; it was made for another model or format.")
    cls = detect_algorithm(tensors, prefix)
    # any Linear or conv of any kernel: the file decides what it adapts, whatever a new run
    # would target
    targets = find_targets(network, "all")
    suffix = "." + cls.SAVED[0].key
    adapters, used = {}, set()
    for name in found[cls]:
        key_prefix = prefix + name
        if name not in targets:
            raise ValueError(
                f"The LoRA key {key_prefix}{suffix} names a layer this model does not have; "
                "the LoRA was made for another model family. Pick a LoRA trained on this model.")
        module, geometry = targets[name]
        for key in cls.required_keys(tensors, key_prefix):
            if key not in tensors:
                raise ValueError(f"The LoRA lacks {key}; the file is incomplete.")
        own = {k: v for k, v in tensors.items()
               if k.startswith(key_prefix + ".") and not is_norm_delta_key(k)}
        for key, value in own.items():
            if not value.is_floating_point():
                raise ValueError(
                    f"The LoRA key {key} holds {value.dtype} values; a float tensor is expected. "
                    "The file is damaged.")
            if value.ndim and 0 in value.shape:
                raise ValueError(f"The LoRA key {key} is empty (shape {list(value.shape)}).")
        canonical = cls.module_tensors(tensors, key_prefix)
        for part, accepted in cls.expected_shapes(geometry, canonical, key_prefix).items():
            key, shape = f"{key_prefix}.{part}", tuple(canonical[part].shape)
            if key not in tensors:
                key = f"{key_prefix}.{part} (multiplied out)"
            if shape not in accepted:
                want = " or ".join(str(list(s)) for s in sorted(accepted))
                raise ValueError(
                    f"The LoRA key {key} has shape {list(shape)} but this model needs {want}; "
                    "the LoRA was made for another model. Pick a LoRA trained on this model.")
        for key, value in own.items():
            if not torch.isfinite(value).all():
                raise ValueError(f"The LoRA key {key} holds NaN or Inf; the file is damaged.")
        adapters[name] = cls.from_state_dict(
            geometry, dict(tensors), key_prefix, dtype,
            weight=module.weight, bias=getattr(module, "bias", None))
        used.update(own)
    return cls, adapters, used


def adapters_from_state_dict(
    network: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    dtype: torch.dtype,
) -> dict[str, Adapter]:
    """Adapters rebuilt from a saved LoRA, after checking every key fits ``network``.

    The algorithm comes from the keys (whatever the node's ``algorithm`` says); each adapter
    gets its layer's weight and bias, as a new one would. A layer of any kernel size can be
    continued (a file with 3x3 conv adapters continues whatever a new run would target).
    Norm/bias deltas (``diff`` / ``diff_b`` keys) are not read here: they are dropped with
    a warning; :func:`lora_from_state_dict` rebuilds them as well.
    """
    cls, adapters, used = _adapters(network, tensors, prefix, dtype)
    ignored = [k for k in tensors if k.startswith(prefix) and k not in used]
    deltas = [k for k in ignored if is_norm_delta_key(k)]
    if deltas:
        log.warning(
            "Continuing the %s: %d norm/bias delta keys (diff, diff_b) are dropped (first: %s); "
            "turn train_norm_bias on to continue them.", cls.NAME, len(deltas), deltas[0])
    others = [k for k in ignored if not is_norm_delta_key(k)]
    if others:
        log.warning(
            "Continuing the %s: %d keys are not part of it and are dropped (first: %s).",
            cls.NAME, len(others), others[0])
    return adapters


def lora_from_state_dict(
    network: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    dtype: torch.dtype,
) -> tuple[dict[str, Adapter], dict[str, NormDelta]]:
    """The adapters and the norm/bias deltas (``diff`` / ``diff_b``) of a saved LoRA.

    As :func:`adapters_from_state_dict` for the adapters (the file must hold a known
    algorithm's keys); every ``<prefix><module>.diff`` / ``.diff_b`` key is rebuilt into a
    :class:`lora.diff.NormDelta` of that module (checked: the layer exists, takes that delta,
    same shape, finite). Install the deltas' patches after the adapters'. Other keys are
    dropped with a warning.
    """
    cls, adapters, used = _adapters(network, tensors, prefix, dtype)
    deltas = norm_deltas_from_state_dict(network, tensors, prefix, dtype)
    ignored = [k for k in tensors
               if k.startswith(prefix) and k not in used and not is_norm_delta_key(k)]
    if ignored:
        log.warning(
            "Continuing the %s: %d keys are not part of it and are dropped (first: %s).",
            cls.NAME, len(ignored), ignored[0])
    return adapters, deltas


def save_lora_file(
    tensors: Mapping[str, torch.Tensor],
    folder: str,
    stem: str,
    metadata: Mapping[str, str] | None = None,
    steps: int | None = None,
) -> str:
    """Write ``<folder>/<stem>[_<steps>_steps]_<counter>_.safetensors`` and return its path.

    ``stem`` may hold subfolders (``"lora_lab/my_lora"``, created as needed) but must stay
    inside ``folder``: an absolute path or one that ``..`` leads out is a ``ValueError``.
    Never overwrites: the counter starts after the highest one the stem has in that folder
    (with or without steps), and the final name is claimed with a hard link, which fails
    instead of replacing an existing file. The data goes to a temporary file in the same
    folder first, so an interrupted save leaves no partial LoRA behind (the temporary file
    is removed on every exit path).
    """
    from safetensors.torch import save_file

    target, base = lora_file_target(folder, stem)
    os.makedirs(target, exist_ok=True)
    _remove_stale_temporaries(target, base)
    pattern = re.compile(re.escape(base) + r"(?:_\d+_steps)?_(\d+)_\.safetensors$")
    used = [int(m.group(1)) for f in os.listdir(target) if (m := pattern.match(f))]
    counter = max(used, default=0) + 1
    middle = "" if steps is None else f"_{int(steps)}_steps"
    tmp = os.path.join(target, f".{base}.{os.getpid()}.{id(tensors):x}.tmp")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(contiguous, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        while True:
            path = os.path.join(target, f"{base}{middle}_{counter:05d}_.safetensors")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                counter += 1
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_stale_temporaries(target: str, base: str) -> None:
    """Delete temporaries of saves whose process died mid-write (killed, power loss)."""
    pattern = re.compile(re.escape(f".{base}.") + r"(\d+)\.[0-9a-f]+\.tmp$")
    for name in os.listdir(target):
        match = pattern.match(name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(target, name))
        except (PermissionError, OverflowError):
            pass  # alive (another user's process) or not a pid: leave it


def lora_file_target(folder: str, stem: str) -> tuple[str, str]:
    """The folder a save of ``stem`` goes to and the file name stem, checked to stay inside."""
    if not stem or not stem.strip() or stem.strip().endswith(("/", "\\")):
        raise ValueError(
            f"filename_prefix {stem!r} names no file; give a name such as 'lora_lab/my_lora'.")
    parts = stem.replace("\\", "/")
    if os.path.isabs(stem) or parts.startswith("/") or re.match(r"^[A-Za-z]:", parts):
        raise ValueError(
            f"filename_prefix {stem!r} is an absolute path; give a path relative to the loras "
            "folder, such as 'lora_lab/my_lora'.")
    root = os.path.abspath(folder)
    path = os.path.normpath(os.path.join(root, *parts.split("/")))
    if os.path.commonpath([root, path]) != root or path == root:
        raise ValueError(
            f"filename_prefix {stem!r} leads outside the loras folder {folder}; remove '..' and "
            "give a path inside it, such as 'lora_lab/my_lora'.")
    return os.path.dirname(path), os.path.basename(path)


# kohya-ss (sd-scripts) names for the same facts, so other tools display them.
_BASE_MODEL_VERSIONS = {
    "SD15": "sd_v1", "SD20": "sd_v2", "SD21UnclipL": "sd_v2", "SD21UnclipH": "sd_v2",
    "SDXL": "sdxl_base_v1-0", "SDXLRefiner": "sdxl_refiner_v1-0", "SSD1B": "sdxl_base_v1-0",
    "SD3": "sd3", "Flux": "flux1", "FluxSchnell": "flux1", "WAN21_T2V": "wan2.1",
}
_LOSS_TYPES = {"MSE": "l2", "L1": "l1", "Huber": "huber", "SmoothL1": "smooth_l1"}
_PRECISIONS = {"bf16": "bf16", "fp32": "float", "fp16": "fp16"}


# ModelSpec (Stability-AI/ModelSpec, "SAI Model Spec" 1.0.0) architecture ids, as kohya
# sd-scripts writes them (library/sai_model_spec.py): "<architecture>/<adapter kind>".
_ARCHITECTURES = {
    "SD15": "stable-diffusion-v1", "SD20": "stable-diffusion-v2-512",
    "SD21UnclipL": "stable-diffusion-v2-512", "SD21UnclipH": "stable-diffusion-v2-512",
    "SDXL": "stable-diffusion-xl-v1-base", "SDXLRefiner": "stable-diffusion-xl-v1-refiner",
    "SSD1B": "stable-diffusion-xl-v1-base", "SD3": "stable-diffusion-3", "Flux": "flux-1-dev",
    "FluxSchnell": "flux-1-schnell", "WAN21_T2V": "wan-2.1-t2v", "WAN21_I2V": "wan-2.1-i2v",
}
IMPLEMENTATION_COMFYUI = "https://github.com/comfyanonymous/ComfyUI"


def lora_file_metadata(
    tensors: Mapping[str, torch.Tensor],
    lora_metadata: Mapping[str, str] | None = None,
    steps: int | None = None,
    version: str | None = None,
    *,
    title: str | None = None,
    format: str = "comfyui",
    implementation: str = IMPLEMENTATION_COMFYUI,
) -> dict[str, str]:
    """The header of a saved LoRA: ``lora_lab.*`` facts, the common kohya ``ss_*`` keys and
    the ModelSpec ``modelspec.*`` keys.

    ``lora_metadata`` is what LoRA Lab's Train LoRA attaches (``lora_lab.*``); a LoRA from
    elsewhere has none, and then only what the tensors tell is written (algorithm, rank,
    alpha, dtype) plus ``steps`` if given. ``steps`` overrides the recorded step count.
    ``format`` / ``implementation``: the names the file's keys use and the code base they
    follow (ModelSpec's ``implementation``); ``title``: ModelSpec's title (the file name).
    """
    meta = {k: str(v) for k, v in (lora_metadata or {}).items()}
    if version is not None:
        meta.setdefault("lora_lab.version", version)
    if steps is not None:
        meta["lora_lab.steps"] = str(int(steps))
    try:
        meta.setdefault("lora_lab.algorithm", detect_algorithm(tensors).NAME)
    except ValueError:
        pass
    downs = [v for k, v in tensors.items() if k.endswith(".lora_down.weight")]
    if downs:
        meta.setdefault("lora_lab.rank", str(int(downs[0].shape[0])))
    alphas = [v for k, v in tensors.items() if k.endswith(".alpha") and v.numel() == 1]
    if alphas:
        meta.setdefault("lora_lab.alpha", str(float(alphas[0])))
    weights = [v for k, v in tensors.items() if v.is_floating_point() and not k.endswith(".alpha")]
    if weights:
        name = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
        meta.setdefault("lora_lab.lora_dtype", name.get(weights[0].dtype, str(weights[0].dtype)))

    get = meta.get
    kohya = {
        "ss_network_module": "networks.lora" if get("lora_lab.algorithm", "LoRA") == "LoRA"
        else "lycoris.kohya",
        "ss_network_dim": get("lora_lab.rank"),
        "ss_network_alpha": get("lora_lab.alpha"),
        "ss_steps": get("lora_lab.steps"),
        "ss_max_train_steps": get("lora_lab.steps"),
        "ss_learning_rate": get("lora_lab.learning_rate"),
        "ss_unet_lr": get("lora_lab.learning_rate"),
        "ss_text_encoder_lr": "0" if "lora_lab.learning_rate" in meta else None,
        "ss_network_train_unet_only": "True",
        "ss_optimizer": get("lora_lab.optimizer") and f"torch.optim.{get('lora_lab.optimizer')}",
        "ss_loss_type": _LOSS_TYPES.get(get("lora_lab.loss_function", "")),
        "ss_seed": get("lora_lab.seed"),
        "ss_batch_size_per_device": get("lora_lab.batch_size"),
        "ss_gradient_accumulation_steps": get("lora_lab.grad_accumulation_steps"),
        "ss_mixed_precision": {"bf16": "bf16", "fp32": "no"}.get(get("lora_lab.training_dtype", "")),
        "ss_save_precision": _PRECISIONS.get(get("lora_lab.lora_dtype", "")),
        "ss_base_model_version": _BASE_MODEL_VERSIONS.get(get("lora_lab.base_model", "")),
    }
    from ..training.options import DECLARED  # the options that name a kohya key

    for option in DECLARED:
        if option.kohya and kohya.get(option.kohya) is None:
            kohya[option.kohya] = get(f"lora_lab.{option.name}")
    if get("lora_lab.algorithm", "LoRA") != "LoRA":
        kohya["ss_network_args"] = '{"algo": "%s"}' % get("lora_lab.algorithm").lower()
    meta.update({k: v for k, v in kohya.items() if v is not None})

    meta["lora_lab.format"] = format
    base = get("lora_lab.base_model")
    architecture = _ARCHITECTURES.get(base or "", (base or "unknown").lower())
    kind = "lora" if get("lora_lab.algorithm", "LoRA") in ("LoRA", "DoRA") else "lycoris"
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/{kind}",
        "modelspec.implementation": implementation,
        "modelspec.title": title or "LoRA",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    meta.update({k: v for k, v in spec.items() if v is not None})
    return meta
