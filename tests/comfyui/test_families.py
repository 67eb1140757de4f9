"""Every model family the running ComfyUI detects trains: a tiny random model of each
(``tiny_families.py``; SDXL's smallest detectable layout is 61M) trains 2 steps in bf16 and fp32 with checkpointing on and off, its
LoRA saves and loads through ComfyUI's core loader with no "not loaded" key, the loaded
model reproduces ``model_with_lora``, and the input MODEL stays bit-identical.

Flux, whose blocks add into their inputs in place and whose rope has a fused kernel without
backward, also gets its adapter gradients compared with a reference computed without the
in-place adds and without the fused kernel."""

import contextlib
import functools
import importlib

import pytest
import torch

import tiny_families
from test_train_node import core_reload, model_output, run_train

BUILDERS = {**tiny_families.FAMILIES, **tiny_families.LARGE_FAMILIES}
# Where detection fixes Flux's full size (0.3.64: 543M), the same tiny Flux is built from
# ComfyUI's own Flux model config, skipping only detection.
FLUX_BY_CONFIG = "flux_by_config"
FAMILIES = list(BUILDERS) + [FLUX_BY_CONFIG]


def family_of(name):
    return BUILDERS["flux" if name == FLUX_BY_CONFIG else name]


@functools.lru_cache(maxsize=None)
def case(name):
    """The family's model (one per session: every combination reuses it, as a graph does),
    latents, conditioning, probe latent and the model's first output."""
    family = family_of(name)
    with torch.inference_mode():  # as ComfyUI's loaders run
        if name == FLUX_BY_CONFIG:
            model = tiny_families.tiny_flux_from_config(seed=1)
        else:
            model = family.build(seed=1)
    shape = (2,) + tuple(family.latent_shape[1:])
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    positive = family.cond(seed=3)
    probe = torch.randn(family.latent_shape, generator=torch.Generator().manual_seed(5))
    return model, latents, positive, probe, model_output(model, probe, positive)


def require(name):
    reason = BUILDERS["flux"].available() if name == FLUX_BY_CONFIG else BUILDERS[name].available()
    if name == FLUX_BY_CONFIG:
        if reason is None:
            pytest.skip("this ComfyUI's detection builds the tiny Flux: see the 'flux' cases")
    elif reason is not None:
        pytest.skip(reason)


def flux_name():
    return "flux" if BUILDERS["flux"].available() is None else FLUX_BY_CONFIG


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["ckpt_off", "ckpt_on"])
@pytest.mark.parametrize("training_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_saves_and_reloads(name, training_dtype, gradient_checkpointing,
                                         train_node, comfy, tmp_path):
    require(name)
    model, latents, positive, probe, reference = case(name)
    trained, lora, loss, _ = run_train(
        train_node, model, latents, positive, steps=2, batch_size=2,
        training_dtype=training_dtype, lora_dtype=training_dtype,
        gradient_checkpointing=gradient_checkpointing)
    assert len(loss["loss"]) == 2 and all(torch.isfinite(torch.tensor(loss["loss"])))
    assert torch.equal(model_output(model, probe, positive), reference), "input MODEL changed"

    loaded, lines = core_reload(model, lora, tmp_path / f"{name}.safetensors")
    assert not [line for line in lines if "not loaded" in line.lower()], lines
    with_lora = model_output(trained, probe, positive)
    assert not torch.equal(with_lora, reference), "model_with_lora is the base model"
    reloaded = model_output(loaded, probe, positive)
    assert (reloaded - with_lora).abs().max() <= 1e-4 * with_lora.abs().max()
    assert torch.equal(model_output(model, probe, positive), reference), "input MODEL changed"


def _module(pack, name):
    return importlib.import_module(f"{pack.__name__}.{name}")


@contextlib.contextmanager
def out_of_place_adds():
    """``a += b`` and ``a *= b`` on tensors computed out of place (the reference path)."""
    saved = torch.Tensor.__iadd__, torch.Tensor.__imul__
    torch.Tensor.__iadd__ = lambda self, other: self + other
    torch.Tensor.__imul__ = lambda self, other: self * other
    try:
        yield
    finally:
        torch.Tensor.__iadd__, torch.Tensor.__imul__ = saved


def adapter_gradients(pack, model, latents, positive, *, guarded, gradient_checkpointing):
    """Gradients of the same LoRA (nonzero up weights) through one fp32 loss on ``model``."""
    bridge, inject = _module(pack, "nodes.bridge"), _module(pack, "lora.inject")
    checkpointing, inplace = _module(pack, "training.checkpointing"), _module(pack, "training.inplace")
    with torch.inference_mode(False), torch.enable_grad():
        task = bridge.ComfyTask(bridge.training_clone(model), positive, latents, "fp32")
        adapters = inject.create_adapters(task.network, "LoRA", 4, 4.0, torch.float32,
                                          torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(2)
        for adapter in adapters.values():
            for p in adapter.parameters():
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
                p.requires_grad_(True)
        x0 = task.prepare_latents(latents)
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.tensor([0.3, 0.8])
        samples = torch.arange(latents.shape[0])

        objective = _module(pack, "losses.objective").Objective(
            task, _module(pack, "training.config").TrainConfig(training_dtype="fp32"))

        def loss():
            return objective.losses(
                lambda x_t, s: task.predict(x_t, s, samples), x0, noise, sigma).mean()

        blocks = checkpointing.checkpoint_blocks(task.network)
        with task.session(inject.ForwardPatches(inject.adapter_patches(task.network, adapters))):
            extra = []
            if guarded:
                with torch.no_grad():
                    mutating = inplace.find_mutating_blocks(blocks, loss)
                assert mutating, "the guarded path found no block that adds in place"
                extra = inplace.inplace_patches(mutating)
            if gradient_checkpointing:
                extra += [(b, checkpointing.checkpointed) for b in blocks]
            with inject.ForwardPatches(extra), \
                    (contextlib.nullcontext() if guarded else out_of_place_adds()):
                loss().backward()
        return {f"{n}.{k}": p.grad.clone() for n, a in adapters.items() for k, p in a.named_parameters()}


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["ckpt_off", "ckpt_on"])
def test_flux_gradients_equal_the_out_of_place_reference(gradient_checkpointing, pack, comfy):
    """Through the fixed path (ComfyUI's Flux with its in-place adds, guarded) the adapter
    gradients equal those of the same Flux with every ``+=`` made out of place, without
    checkpointing; both with ComfyUI's training switch on, so rope is the differentiable
    formula and not the fused kernel (which has no backward)."""
    model, latents, positive, _, _ = case(flux_name())
    got = adapter_gradients(pack, model, latents, positive, guarded=True,
                            gradient_checkpointing=gradient_checkpointing)
    want = adapter_gradients(pack, model, latents, positive, guarded=False,
                             gradient_checkpointing=False)
    assert got.keys() == want.keys()
    for key, grad in want.items():
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, key
        error = (got[key] - grad).norm() / grad.norm()
        assert error <= 1e-5, f"{key}: relative error {error:.2e}"


@pytest.mark.parametrize("name", FAMILIES)
def test_training_mode_keeps_the_forward(name, pack, comfy):
    """ComfyUI's training switch and the differentiable kernels change how the forward is
    computed, not what it computes."""
    require(name)
    bridge = _module(pack, "nodes.bridge")
    model, _, positive, probe, reference = case(name)
    with bridge.training_mode():
        out = model_output(model, probe, positive)
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max(), name
