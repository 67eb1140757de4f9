"""Bad input, Cancel and repeated runs against real ComfyUI: clear errors, and the shared
model left exactly as it was."""

import contextlib
import gc

import pytest
import torch

import tiny_models
from test_train_node import model_output, run_train


def module_state(patcher):
    """Everything a run could leave behind on the shared modules."""
    modules = list(patcher.model.named_modules())
    return {
        "forward_patches": [n for n, m in modules if "forward" in m.__dict__],
        "weight_functions": [n for n, m in modules
                             if getattr(m, "weight_function", []) or getattr(m, "bias_function", [])],
        "requires_grad": [p.requires_grad for p in patcher.model.parameters()],
        "dtypes": {str(p.dtype) for p in patcher.model.parameters()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for _, m in modules),
    }


@pytest.fixture
def sd15(comfy):
    model = tiny_models.tiny_sd15(seed=4)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    positive = tiny_models.sd15_cond(seed=2)
    probe = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    return model, latents, positive, probe


def test_cancel_stops_within_one_step_and_restores_the_model(sd15, train_node):
    import comfy.model_management
    import comfy.utils

    model, latents, positive, probe = sd15
    before, state = model_output(model, probe, positive), module_state(model)
    seen = []

    def hook(value, total, preview, node_id=None):
        # Cancel pressed during the first step. ComfyUI 0.33 throttles the progress hook,
        # but it always calls it for the first update, so step 1 is where both versions meet.
        seen.append(value)
        if value == 1:
            comfy.model_management.interrupt_current_processing(True)

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_train(train_node, model, latents, positive, steps=50)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
    assert seen == [1], "training went on after Cancel"
    assert module_state(model) == state
    assert torch.equal(model_output(model, probe, positive), before)
    _, lora, loss, steps = run_train(train_node, model, latents, positive, steps=2)
    assert steps == 2 and len(loss["loss"]) == 2


@pytest.mark.parametrize("case", [
    "zero_samples", "nan_latents", "video_latents", "wrong_channels", "cond_count",
    "cond_width", "not_a_latent",
])
def test_bad_input_is_a_value_error_and_changes_nothing(case, sd15, train_node):
    model, latents, positive, probe = sd15
    good = positive
    before, state = model_output(model, probe, good), module_state(model)
    if case == "zero_samples":
        latents = latents[:0]
    elif case == "nan_latents":
        latents = latents.clone()
        latents[1, 0, 0, 0] = float("nan")
    elif case == "video_latents":
        latents = torch.randn(2, 4, 3, 8, 8)
    elif case == "wrong_channels":
        latents = torch.randn(2, 16, 8, 8)
    elif case == "cond_count":
        latents = torch.randn(3, 4, 8, 8)
        positive = positive + tiny_models.sd15_cond(seed=5)
    elif case == "cond_width":
        positive = [[torch.randn(1, 77, 512), {}]]
    messages = {
        "zero_samples": "0 samples", "nan_latents": "NaN or Inf", "video_latents": "5-D",
        "wrong_channels": "16 channels but this model", "cond_count": "2 conditionings",
        "cond_width": "could not run on the first batch", "not_a_latent": "must be a LATENT",
    }
    with pytest.raises(ValueError, match=messages[case]):
        if case == "not_a_latent":
            with torch.inference_mode():
                train_node.execute(model, latents, positive, 1, 1, 2, 1e-3, 4, "AdamW", "MSE",
                                   0, "fp32", "fp32", "LoRA", True, "[None]")
        else:
            run_train(train_node, model, latents, positive)
    assert module_state(model) == state
    assert torch.equal(model_output(model, probe, good), before)


def test_sd3_without_pooled_output_is_a_value_error(train_node, comfy):
    model = tiny_models.tiny_sd3(seed=1)
    latents = torch.randn(2, 16, 16, 16)
    with pytest.raises(ValueError, match="pooled_output"):
        run_train(train_node, model, latents, [[torch.randn(1, 8, 256), {}]])


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_ten_runs_do_not_leak(train_node, comfy):
    model = tiny_models.tiny_sd15(seed=3, medium=True)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    positive = tiny_models.sd15_cond(seed=1)
    state = module_state(model)
    rss = []
    for _ in range(10):
        outputs = run_train(train_node, model, latents, positive, steps=2, batch_size=1)
        del outputs
        gc.collect()
        rss.append(_rss_mib())
        assert module_state(model) == state
    print(f"RSS MiB after each run: {[round(r) for r in rss]}")
    assert rss[-1] <= rss[1] * 1.05, rss


@pytest.mark.parametrize("ending", ["success", "cancel", "diverged"])
def test_comfyui_training_switches_last_exactly_the_run(ending, sd15, train_node, pack):
    """``in_training`` on and ``training_fp8_bwd`` off while the run trains (ComfyUI 0.33+),
    both back to what they were however the run ends; the fused kernels swapped back too."""
    import importlib

    import comfy.model_management as mm
    import comfy.utils

    bridge = importlib.import_module(pack.__name__ + ".nodes.bridge")
    flags = [name for name in bridge.TRAINING_FLAGS if hasattr(mm, name)]
    if not flags:
        pytest.skip("this ComfyUI has no training switches (added in 0.33)")
    kitchen, swaps = bridge._fused_kernels()
    kernels = {name: getattr(kitchen, name) for name in swaps}
    before = {name: not bridge.TRAINING_FLAGS[name] for name in flags}  # the opposite
    for name, value in before.items():
        setattr(mm, name, value)
    model, latents, positive, _ = sd15
    during = []
    watch = model.model.diffusion_model.register_forward_pre_hook(
        lambda *_: during.append({name: getattr(mm, name) for name in flags}))

    def hook(value, total, preview, node_id=None):
        if ending == "cancel":
            mm.interrupt_current_processing(True)

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        options = dict(steps=2)
        if ending == "diverged":
            latents = latents * 1e30
        expected = {"success": contextlib.nullcontext(),
                    "cancel": pytest.raises(mm.InterruptProcessingException),
                    "diverged": pytest.raises(ValueError, match="loss became")}[ending]
        with expected:
            run_train(train_node, model, latents, positive, **options)
    finally:
        watch.remove()
        comfy.utils.set_progress_bar_global_hook(previous)
        mm.interrupt_current_processing(False)
        restored = {name: getattr(mm, name) for name in flags}
        for name in flags:
            setattr(mm, name, False)  # ComfyUI's defaults
    assert during and all(d == {n: bridge.TRAINING_FLAGS[n] for n in flags} for d in during)
    assert restored == before
    assert {name: getattr(kitchen, name) for name in kernels} == kernels
