"""Attention in training (nodes/bridge.py ``training_attention``): where ComfyUI's global
attention has no fused backward (its CPU defaults), training forwards run ComfyUI's own
``attention_pytorch`` through the ``optimized_attention_override`` transformer option; the
trained LoRA is the one ComfyUI's attention gives, the input model carries nothing of it,
and a model's own attention override is kept."""

import pytest

from test_algorithms import sub
from test_train_node import family_case, run_train


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of ComfyUI's ``attention_pytorch`` (the training override's)."""
    import comfy.ldm.modules.attention as attention

    calls = []
    original = attention.attention_pytorch

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "attention_pytorch", counted)
    return calls


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_training_uses_fused_attention_and_learns_the_same_lora(family, train_node, pack,
                                                                fused_calls, monkeypatch):
    import comfy.ldm.modules.attention as attention

    bridge = sub(pack, "nodes.bridge")
    assert attention.optimized_attention is not attention.attention_pytorch  # CPU default
    model, latents, positive, _ = family_case(family)
    # SGD: updates proportional to the gradients (Adam's first steps are their signs, which
    # the last bits of a gradient near zero can flip)
    settings = dict(steps=3, learning_rate=0.5, optimizer="SGD")
    _, fused, fused_loss, _ = run_train(train_node, model, latents, positive, **settings)
    assert fused_calls  # the model's attention ran through the override
    assert "optimized_attention_override" not in model.model_options.get(
        "transformer_options", {})
    fused_calls.clear()
    monkeypatch.setattr(bridge, "training_attention", lambda: None)
    _, plain, plain_loss, _ = run_train(train_node, model, latents, positive, **settings)
    assert not fused_calls  # ComfyUI's own attention this time
    assert fused.keys() == plain.keys()
    for key in plain:
        scale = plain[key].abs().max().item() or 1.0
        assert (fused[key] - plain[key]).abs().max().item() <= 1e-4 * scale, key
    assert fused_loss["loss"] == pytest.approx(plain_loss["loss"], rel=1e-4)


def test_a_models_own_attention_override_is_kept(train_node, pack, fused_calls):
    import comfy.ldm.modules.attention as attention

    model, latents, positive, _ = family_case("sd15")
    own = []

    def override(func, *args, **kwargs):
        own.append(1)
        return attention.attention_basic(*args, **kwargs)

    patched = model.clone()
    patched.model_options["transformer_options"] = dict(
        patched.model_options.get("transformer_options", {}), optimized_attention_override=override)
    run_train(train_node, patched, latents, positive, steps=2)
    assert own and not fused_calls


def test_fused_global_attention_is_left_alone(pack, monkeypatch):
    import comfy.ldm.modules.attention as attention

    bridge = sub(pack, "nodes.bridge")
    assert bridge.training_attention() is not None  # CPU: sub-quadratic (or split)
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    assert bridge.training_attention() is None
