"""Base models as users load them, in real ComfyUI: weights stored in fp8 (UNETLoader's
weight_dtype) and a MODEL with a LoRA already applied (LoraLoaderModelOnly before Train
LoRA), for every algorithm."""

import pytest
import torch

import tiny_models
from test_algorithms import ALGORITHMS, training_forward_output
from test_train_node import family_case, model_output, run_train

TOL = 1e-4


def weights(model):
    return {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].float(), b[k].float()) for k in a)


def core_apply(model, lora):
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_lora_for_models(model, None, dict(lora), 1.0, 0)[0]


@pytest.mark.parametrize("weight_dtype", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fp8_weights_train_and_stay_fp8(algorithm, weight_dtype, train_node, comfy):
    dtype = getattr(torch, weight_dtype)
    with torch.inference_mode():
        model = tiny_models.tiny_sd15(seed=1, weight_dtype=dtype)
    _, latents, positive, probe = family_case("sd15")
    stored = weights(model)
    assert any(v.dtype == dtype for v in stored.values())
    before = model_output(model, probe, positive)
    for training_dtype in ("bf16", "fp32"):
        trained, lora, loss, _ = run_train(
            train_node, model, latents, positive, steps=3, algorithm=algorithm,
            training_dtype=training_dtype, lora_dtype=training_dtype, learning_rate=5e-3)
        assert all(torch.isfinite(torch.tensor(loss["loss"]))), loss
        assert same(weights(model), stored), "the stored fp8 weights changed"
        with_lora = model_output(trained, probe, positive)
        assert not torch.equal(with_lora, before)
        reloaded = model_output(core_apply(model, lora), probe, positive)
        assert (reloaded - with_lora).abs().max() <= TOL * with_lora.abs().max()
    assert torch.equal(model_output(model, probe, positive), before), "input MODEL changed"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_lora_applied_before_training_is_the_base(algorithm, train_node, pack, comfy):
    model, latents, positive, probe = family_case("sd15")
    _, first, _, _ = run_train(train_node, model, latents, positive, steps=4,
                               learning_rate=5e-2, seed=3)
    patched = core_apply(model, first)  # what LoraLoaderModelOnly hands Train LoRA
    base_out = model_output(model, probe, positive)
    patched_out = model_output(patched, probe, positive)
    assert not torch.equal(base_out, patched_out)
    # the graph ran the plain model last (ComfyUI shares one set of layers between the
    # clones): the layers hold the unpatched weights until the training clone is loaded
    assert torch.equal(model_output(model, probe, positive), base_out)

    # a new LoRA starts as "no change" of the patched model (DoRA's magnitudes, OFT's
    # rotations are taken from the weights it trains against)
    start, _, _, _ = run_train(train_node, patched, latents, positive, steps=1,
                               algorithm=algorithm, learning_rate=1e-7,
                               gradient_checkpointing=False)
    moved = (model_output(start, probe, positive) - patched_out).abs().max()
    assert moved <= TOL * patched_out.abs().max(), (algorithm, float(moved))
    assert torch.equal(model_output(model, probe, positive), base_out)

    trained, lora, _, _ = run_train(train_node, patched, latents, positive, steps=3,
                                    algorithm=algorithm, learning_rate=5e-3,
                                    gradient_checkpointing=False)
    with_lora = model_output(trained, probe, positive)
    scale = with_lora.abs().max()
    # model_with_lora = the patched model + the new LoRA, as ComfyUI's loader stacks them
    stacked = model_output(core_apply(patched, lora), probe, positive)
    assert (stacked - with_lora).abs().max() <= TOL * scale
    # the new LoRA is relative to the patched weights: its training forward over them is
    # what ComfyUI's merge gives
    bypass = training_forward_output(pack, patched, lora, probe, positive)
    assert (bypass - stacked).abs().max() <= TOL * scale, algorithm
    assert torch.equal(model_output(model, probe, positive), base_out), "input MODEL changed"
    assert torch.equal(model_output(patched, probe, positive), patched_out), "patched MODEL changed"
