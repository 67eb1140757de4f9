"""Tiny real networks and tasks (the built-in demo models at test size)."""

import torch

from lora_lab.demo.models import TinyDiT, TinyUNet
from lora_lab.training.task import TorchTask, discrete_vp_sigmas, flow_sigmas


def _seeded(build, seed=0):
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build().eval()
    finally:
        torch.set_rng_state(state)


def make_task(kind: str, count: int = 4, seed: int = 0):
    """A tiny real task: ("unet", eps), ("unet_v", v) or ("dit", flow), with its latents."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(count, 6, 16, generator=g)
    latents = torch.randn(count, 4, 8, 8, generator=g)
    if kind == "dit":
        net = _seeded(lambda: TinyDiT(dim=32, depth=2, heads=2, context_dim=16), seed)
        return TorchTask(net, "flow", flow_sigmas(shift=3.0), context), latents
    net = _seeded(lambda: TinyUNet(channels=16, context_dim=16, mults=(1, 2), heads=2), seed)
    prediction = "v" if kind == "unet_v" else "eps"
    return TorchTask(net, prediction, discrete_vp_sigmas(), context), latents
