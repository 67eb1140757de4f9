"""LoRA Lab: train LoRA-family adapters on any diffusion model ComfyUI loads.

Inside ComfyUI this registers the nodes (V3 schema, ``comfy_entrypoint``). Outside ComfyUI
it does nothing, so ``lora``, ``training``, ``losses`` and ``optimizers`` import as plain
PyTorch.
"""

__version__ = "0.2.0"

try:
    import comfy.utils  # noqa: F401  (only present inside ComfyUI)
except ImportError:
    pass
else:
    from .nodes.extension import comfy_entrypoint  # noqa: F401
