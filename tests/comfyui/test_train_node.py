"""Train LoRA inside real ComfyUI: tiny SD1.x (eps) and SD3 (flow) models from ComfyUI's own
detection, outputs plugged into ComfyUI's core nodes, and the input model left untouched."""

import logging
import os

import pytest
import torch

import tiny_models

FAMILIES = {
    "sd15": (tiny_models.tiny_sd15, tiny_models.sd15_cond, (3, 4, 8, 8)),
    "sd3": (tiny_models.tiny_sd3, tiny_models.sd3_cond, (3, 16, 16, 16)),
}


def family_case(family):
    """A tiny model of ``family``, its training latents and conditioning, and a probe latent."""
    build, cond, shape = FAMILIES[family]
    model = build(seed=1)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(shape[1:], generator=torch.Generator().manual_seed(5))[None]
    return model, latents, cond(seed=3), probe


def run_train(node, model, latents, positive, **overrides):
    """Train LoRA's four outputs of the contract (``run_train_all``: with the previews)."""
    return run_train_all(node, model, latents, positive, **overrides)[:4]


def run_train_all(node, model, latents, positive, **overrides):
    values = dict(batch_size=2, grad_accumulation_steps=1, steps=4, learning_rate=1e-3, rank=4,
                  optimizer="AdamW", loss_function="MSE", seed=0, training_dtype="fp32",
                  lora_dtype="fp32", algorithm="LoRA", gradient_checkpointing=True,
                  existing_lora="[None]")
    values.update(overrides)
    with torch.inference_mode():  # ComfyUI executes nodes under inference mode
        # a tensor becomes a LATENT; a LATENT or a list of them goes as it is
        latent = {"samples": latents} if isinstance(latents, torch.Tensor) else latents
        return node.execute(model, latent, positive, **values).result


def core_reload(model, lora, path):
    """``lora`` saved to ``path`` and loaded onto ``model`` by ComfyUI's core LoRA loader, as
    Save LoRA Weights -> LoraLoaderModelOnly do: (the loaded model, the log lines it wrote)."""
    import comfy.sd
    import comfy.utils

    comfy.utils.save_torch_file(lora, str(path))
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        loaded = comfy.sd.load_lora_for_models(
            model, None, comfy.utils.load_torch_file(str(path), safe_load=True), 1.0, 0)[0]
    finally:
        logging.getLogger().removeHandler(handler)
    return loaded, lines


def model_output(patcher, latents, positive, sigma=2.0):
    """The denoised output of a ModelPatcher as a sampler would compute it."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patcher])
        base = patcher.model
        [cond] = comfy.sampler_helpers.convert_cond(positive[:1])
        [cond] = comfy.samplers.encode_model_conds(
            base.extra_conds, [cond], latents, torch.device("cpu"), "positive")
        kwargs = comfy.samplers.cond_cat([
            {k: v.process_cond(batch_size=latents.shape[0], area=None)
             for k, v in cond["model_conds"].items()}])
        sig = torch.full((latents.shape[0],), sigma)
        return base.apply_model(latents, sig, **kwargs).clone()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_plugs_into_core_and_leaves_input_untouched(family, train_node, comfy, tmp_path):
    model, latents, positive, probe = family_case(family)
    before = model_output(model, probe, positive)

    trained, lora, loss, steps = run_train(train_node, model, latents, positive)

    after_train = model_output(model, probe, positive)
    assert torch.equal(before, after_train), "training changed the input model"
    assert steps == 4 and len(loss["loss"]) == 4
    assert all(k.startswith("diffusion_model.") for k in lora)
    with_lora = model_output(trained, probe, positive)
    assert not torch.equal(with_lora, before), "model_with_lora is the base model"
    assert torch.equal(model_output(model, probe, positive), before), "model_with_lora leaked"

    # core: Save LoRA Weights -> file -> LoraLoaderModelOnly reproduces model_with_lora
    import nodes

    loaded, records = core_reload(model, lora, tmp_path / "trained.safetensors")
    assert not [r for r in records if "not loaded" in r.lower()], records
    reloaded = model_output(loaded, probe, positive)
    scale = with_lora.abs().max()
    assert (reloaded - with_lora).abs().max() <= 1e-4 * scale
    # core LossGraphNode accepts our LOSS_MAP
    import folder_paths

    os.makedirs(folder_paths.get_temp_directory(), exist_ok=True)
    core_plot = nodes.NODE_CLASS_MAPPINGS["LossGraphNode"]
    with torch.inference_mode():
        getattr(core_plot(), core_plot.FUNCTION)(loss, "lora_lab_test")


def test_same_seed_same_lora_and_loss_drops(train_node, comfy):
    model = tiny_models.tiny_sd15(seed=2)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    positive = tiny_models.sd15_cond(seed=4)
    torch.manual_seed(123)
    _, lora_a, loss_a, _ = run_train(train_node, model, latents, positive, steps=3)
    torch.manual_seed(999)
    _, lora_b, loss_b, _ = run_train(train_node, model, latents, positive, steps=3)
    assert loss_a == loss_b
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)


def test_conditioning_count_mismatch_is_value_error(train_node, comfy):
    model = tiny_models.tiny_sd15(seed=2)
    latents = torch.randn(3, 4, 8, 8)
    positive = tiny_models.sd15_cond(seed=1) + tiny_models.sd15_cond(seed=2)
    with pytest.raises(ValueError, match="2 conditionings but latents hold 3"):
        run_train(train_node, model, latents, positive)


def test_dynamic_vram_model_trains_on_a_reloaded_clone(train_node, comfy, tmp_path, monkeypatch):
    """ComfyUI 0.33 on NVIDIA hands out ``ModelPatcherDynamic`` models, whose weights are
    streamed per forward. Off a GPU ComfyUI never makes one, so a loader-made model is marked
    dynamic for the training call: training must run on a clone ComfyUI rebuilds from the
    loader (``clone(disable_dynamic=True)``), never on the input model's own modules."""
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    if not hasattr(comfy.model_patcher.ModelPatcher, "is_dynamic"):
        pytest.skip("this ComfyUI has no dynamic VRAM (added in 0.33)")
    path = tmp_path / "tiny_sd15.safetensors"
    comfy.utils.save_torch_file(
        tiny_models.unet_state_dict(tiny_models.sd15_unet_config(), seed=1), str(path))
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(path))
    assert model.cached_patcher_init is not None
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    positive, probe = tiny_models.sd15_cond(seed=3), torch.randn(1, 4, 8, 8)
    before = model_output(model, probe, positive)
    reloaded = []
    clone = type(model).clone

    def watched_clone(self, *args, **kwargs):
        out = clone(self, *args, **kwargs)
        if kwargs.get("disable_dynamic"):
            reloaded.append(out)
        return out

    monkeypatch.setattr(type(model), "clone", watched_clone)
    monkeypatch.setattr(model, "is_dynamic", lambda: True, raising=False)
    trained, lora, loss, _ = run_train(train_node, model, latents, positive, steps=2)
    monkeypatch.undo()
    assert len(reloaded) == 1 and reloaded[0].model is not model.model
    assert len(loss["loss"]) == 2 and lora
    assert torch.equal(model_output(model, probe, positive), before)
    assert not torch.equal(model_output(trained, probe, positive), before)

    # a dynamic model that no core loader made cannot be reloaded: a clear error
    bare = tiny_models.tiny_sd15(seed=1)
    monkeypatch.setattr(bare, "is_dynamic", lambda: True, raising=False)
    with pytest.raises(ValueError, match="dynamic VRAM .* --disable-dynamic-vram"):
        run_train(train_node, bare, latents, positive, steps=1)
