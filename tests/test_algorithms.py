"""Every adapter algorithm x {Linear, Conv2d} x {fp32, bf16}: one table of invariants.

The ComfyUI check re-derives the merged weight from the *saved keys* with an independent
implementation of the formulas ComfyUI's loader applies (comfy/weight_adapter/*.py and
``weight_decompose`` in comfy/weight_adapter/base.py, ComfyUI v0.3.64), written here from
reading them, so a key or formula mismatch cannot cancel out against the adapter's own code.
"""

import math

import pytest
import torch
from torch import nn

from lora_lab.lora import ADAPTERS, layer_geometry
from lora_lab.lora.inject import ForwardPatches, adapter_patches, create_adapters
from lora_lab.lora.io import adapters_from_state_dict, detect_algorithm
from lora_lab.training.config import TrainConfig
from lora_lab.training.loop import evaluate, train
from tiny_tasks import make_task

LAYERS = {
    # out = 32 so BOFT gets several butterfly stages and OFT several blocks
    "linear": (lambda: nn.Linear(12, 32), (3, 5, 12)),
    "conv2d": (lambda: nn.Conv2d(12, 32, 3, padding=1), (2, 12, 6, 6)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [(a, l, d) for a in ADAPTERS for l in LAYERS for d in DTYPES]
PREFIX = "diffusion_model.block.layer"


@pytest.fixture(autouse=True)
def one_thread():
    """These layers are tiny: one thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(algorithm, layer_name, dtype_name, seed=0):
    torch.manual_seed(seed)
    make, shape = LAYERS[layer_name]
    layer = make().requires_grad_(False)
    x = torch.randn(shape)
    adapter = ADAPTERS[algorithm](
        layer_geometry(layer), 4, 2.0, DTYPES[dtype_name], torch.Generator().manual_seed(seed),
        weight=layer.weight, bias=layer.bias)
    return layer, adapter, x


def perturb(adapter, seed=1, std=0.1):
    """Move every parameter off its init (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def with_weight(layer, x, weight):
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# -- ComfyUI's loader maths, re-implemented from comfy/weight_adapter -------------------------
def comfy_merged(weight, sd, p):
    """``W'`` as ComfyUI computes it at strength 1 from the keys of module ``p``."""
    W = weight.detach().float().clone()
    f = {k[len(p) + 1:]: v.float() for k, v in sd.items() if k.startswith(p + ".")}
    alpha = f["alpha"].item() if "alpha" in f else None
    dora = f.get("dora_scale")
    if "lora_up.weight" in f:  # lora.py:161-208
        up, down = f["lora_up.weight"], f["lora_down.weight"]
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = torch.mm(up.flatten(1), down.flatten(1)).reshape(W.shape)
    elif "hada_w1_a" in f:  # loha.py:195-229
        scale = alpha / f["hada_w1_b"].shape[0] if alpha is not None else 1.0
        diff = ((f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])).reshape(W.shape)
    elif "lokr_w1" in f or "lokr_w1_a" in f:  # lokr.py:174-217
        dim = None
        w1 = f.get("lokr_w1")
        if w1 is None:
            dim = f["lokr_w1_b"].shape[0]
            w1 = f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f.get("lokr_w2")
        if w2 is None:
            dim = f["lokr_w2_b"].shape[0]
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        scale = alpha / dim if (alpha is not None and dim is not None) else 1.0
        diff = torch.kron(w1, w2).reshape(W.shape)
    elif "oft_blocks" in f:  # oft.py:122-158, boft.py:59-112
        blocks = f["oft_blocks"]
        q = blocks - blocks.transpose(-1, -2)
        if alpha is not None and alpha > 0:
            n = torch.norm(q) + 1e-8
            if n > alpha:
                q = q * alpha / n
        eye = torch.eye(q.shape[-1])
        r = (eye + q) @ torch.linalg.inv(eye - q)
        if blocks.ndim == 3:
            count, size = r.shape[:2]
            rows = W.reshape(count, size, -1)
            out = torch.stack([(r[k] - eye).t() @ rows[k] for k in range(count)])
            diff = out.reshape(W.shape)
        else:
            t = W.clone()
            size = r.shape[-1]
            for i in range(r.shape[0]):
                k = 2 ** i * (size // 2)
                order = torch.arange(W.shape[0]).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
                gathered = t[order].reshape(-1, size, *W.shape[1:])
                rotated = torch.stack([
                    (r[i, b] @ gathered[b].reshape(size, -1)).reshape(gathered[b].shape)
                    for b in range(gathered.shape[0])]).reshape(W.shape)
                t = torch.empty_like(rotated)
                t[order] = rotated
            diff = t - W
        scale = 1.0
    elif "a1.weight" in f:  # glora.py:52-90 (the "new" LyCORIS layout)
        a1, a2 = f["a1.weight"].flatten(1), f["a2.weight"].flatten(1)
        b1, b2 = f["b1.weight"].flatten(1), f["b2.weight"].flatten(1)
        assert not (a2.shape[0] == W.shape[0] == W.shape[1]), "would load as old GLoRA"
        scale = alpha / a2.shape[0] if alpha is not None else 1.0
        Wa = torch.einsum("oi...,ij->oj...", W, a1)
        diff = torch.einsum("oi...,ij->oj...", Wa, a2) + (b1 @ b2).reshape(W.shape)
    else:
        raise AssertionError(f"no ComfyUI adapter reads {sorted(f)}")
    if dora is None:
        return W + scale * diff
    calc = W + scale * diff  # base.py:56-85
    if dora.shape[0] == calc.shape[0]:
        norm = W.reshape(W.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (W.ndim - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (W.ndim - 2))
    return calc * (dora / (norm + torch.finfo(torch.float32).eps))


# -- the table --------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm,layer_name,dtype", CASES)
def test_invariants(algorithm, layer_name, dtype):
    layer, adapter, x = build(algorithm, layer_name, dtype)
    forward = adapter.bypass(layer.forward)

    # zero delta at init, exactly
    assert torch.equal(forward(x), layer(x))
    assert torch.count_nonzero(adapter.delta_weight(layer.weight)) == 0

    perturb(adapter)
    out = forward(x)
    # training forward == the base layer with the merged weight
    assert close(out, with_weight(layer, x, adapter.merged_weight(layer.weight))), algorithm

    # saved keys: what ComfyUI reads, in the adapter dtype (float32 scalars/magnitudes)
    sd = adapter.to_state_dict(PREFIX)
    assert all(k.startswith(PREFIX + ".") for k in sd)
    assert detect_algorithm(sd) is type(adapter)
    for key, value in sd.items():
        if key.endswith((".alpha", ".dora_scale")):
            assert value.dtype == torch.float32
        else:
            assert value.dtype == DTYPES[dtype], key

    # ComfyUI's loader formulas on the saved keys == the training forward
    merged = comfy_merged(layer.weight, sd, PREFIX)
    assert close(out, with_weight(layer, x, merged)), (out - with_weight(layer, x, merged)).abs().max()

    # save -> load -> save: identical tensors, identical forward
    again = type(adapter).from_state_dict(
        layer_geometry(layer), sd, PREFIX, DTYPES[dtype], weight=layer.weight, bias=layer.bias)
    sd2 = again.to_state_dict(PREFIX)
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(again.bypass(layer.forward)(x), out)

    # every parameter gets a gradient (float32 master weights)
    forward(x).square().mean().backward()
    for name, p in adapter.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, name
    assert not layer.weight.requires_grad and layer.weight.grad is None


@pytest.mark.parametrize("algorithm", list(ADAPTERS))
def test_continuing_is_detected_from_the_keys_and_reproduces_the_forward(algorithm):
    task, latents = make_task("unet", count=2)
    net = task.network
    adapters = create_adapters(net, algorithm, 4, 1.0, torch.float32, torch.Generator().manual_seed(0))
    for i, adapter in enumerate(adapters.values()):
        perturb(adapter, seed=i, std=0.02)
    state = {}
    for name, adapter in adapters.items():
        state.update(adapter.to_state_dict("diffusion_model." + name))
    loaded = adapters_from_state_dict(net, state, "diffusion_model.", torch.float32)
    assert loaded.keys() == adapters.keys()
    assert {type(a) for a in loaded.values()} == {ADAPTERS[algorithm]}
    t, ctx = torch.tensor([10.0, 500.0]), task.context[:2]
    with torch.no_grad():
        with ForwardPatches(adapter_patches(net, adapters)):
            a = net(latents, t, ctx)
        with ForwardPatches(adapter_patches(net, loaded)):
            b = net(latents, t, ctx)
    assert torch.equal(a, b)


# the orthogonal algorithms start from a rotation, whose useful steps are larger
LEARNING_RATES = {"OFT": 1e-2, "BOFT": 1e-2}


@pytest.mark.parametrize("algorithm", list(ADAPTERS))
def test_a_few_steps_lower_the_loss(algorithm):
    task, latents = make_task("dit", count=2)
    config = TrainConfig(steps=20, batch_size=2, learning_rate=LEARNING_RATES.get(algorithm, 3e-3),
                         alpha=8.0, algorithm=algorithm, training_dtype="fp32", loss_weighting="none",
                         lora_dtype="fp32", gradient_checkpointing=False)
    before = evaluate(task, latents, config, draws=16)
    result = train(task, latents, config)
    after = evaluate(task, latents, config, result.adapters, draws=16)
    assert all(math.isfinite(v) for v in result.losses)
    assert after < 0.95 * before, (algorithm, before, after)
    assert all(type(a).NAME == algorithm for a in result.adapters.values())
