"""Real-world data through the Train LoRA node in real ComfyUI: lists of LATENTs of several
sizes (as ComfyUI's dataset nodes give them), masks from Set Latent Noise Mask, and video
latents (one-frame images and clips mixed) on a tiny Wan 2.1."""

import pytest
import torch

import tiny_families
from test_companion import FakeCLIP, FakeVAE
from test_train_node import core_reload, family_case, model_output, run_train

SIZES = [(8, 8), (8, 16), (16, 8)]


def core(name):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def three_sizes(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = [{"samples": torch.randn(2, 4, h, w, generator=g)} for h, w in SIZES]
    positive = [tiny_families.FAMILIES["sd15"].cond(seed=s) for s in range(len(SIZES))]
    return latents, positive


def test_latents_of_three_sizes_train_through_the_node(train_node, comfy):
    model, _, _, probe = family_case("sd15")
    latents, positive = three_sizes()
    trained, lora, loss, steps = run_train(train_node, model, latents, positive, steps=6,
                                           batch_size=2, learning_rate=1e-2)
    _, again, _, _ = run_train(train_node, model, latents, positive, steps=6, batch_size=2,
                               learning_rate=1e-2)
    assert steps == 6 and same(lora, again) and all(torch.isfinite(torch.tensor(loss["loss"])))
    cond = positive[0]
    assert not torch.equal(model_output(trained, probe, cond), model_output(model, probe, cond))
    # ComfyUI passes every input as a list to a list node: the same run
    with torch.inference_mode():
        listed = train_node.execute(
            [model], latents, positive, [2], [1], [6], [1e-2], [4], ["AdamW"], ["MSE"], [0],
            ["fp32"], ["fp32"], ["LoRA"], [True], ["[None]"]).result
    assert same(listed[1], lora)
    with pytest.raises(ValueError, match="list of 2 conditionings but latents a list of 3"):
        run_train(train_node, model, latents, positive[:2], steps=1)
    with pytest.raises(ValueError, match=r"positive\[1\] holds 3 conditionings for the 2"):
        run_train(train_node, model, latents,
                  [positive[0], positive[1] * 3, positive[2]], steps=1)


def test_core_dataset_nodes_feed_train_lora(train_node, comfy):
    """Make Training Dataset -> Resolution Bucket -> Train LoRA (ComfyUI 0.33), with a
    stand-in VAE and CLIP; every node called with lists, as the executor calls list nodes."""
    import nodes

    if "ResolutionBucket" not in nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI has no Make Training Dataset / Resolution Bucket nodes")
    model, _, _, _ = family_case("sd15")
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 64, 64, 3, generator=g), torch.rand(1, 64, 128, 3, generator=g),
              torch.rand(1, 64, 64, 3, generator=g)]
    with torch.inference_mode():
        latents, conditioning = core("MakeTrainingDataset").execute(
            images, [FakeVAE()], [FakeCLIP()], ["a", "b", "c"]).result
        buckets, bucket_conds = core("ResolutionBucket").execute(latents, conditioning).result
    assert sorted(tuple(b["samples"].shape) for b in buckets) == [(1, 4, 8, 16), (2, 4, 8, 8)]
    _, lora, loss, steps = run_train(train_node, model, buckets, bucket_conds, steps=3,
                                     batch_size=2)
    assert steps == 3 and lora and all(torch.isfinite(torch.tensor(loss["loss"])))


def test_a_noise_mask_weights_the_loss(train_node, comfy):
    model, latents, positive, _ = family_case("sd15")
    mask = torch.zeros(1, 64, 64)
    mask[:, :32] = 1.0
    with torch.inference_mode():
        [masked] = core("SetLatentNoiseMask")().set_mask({"samples": latents}, mask)
    assert masked["noise_mask"].shape[-2:] == (64, 64)  # pixel-sized, as core stores it
    _, plain, _, _ = run_train(train_node, model, latents, positive, steps=3)
    _, weighted, loss, _ = run_train(train_node, model, masked, positive, steps=3)
    assert not same(plain, weighted) and all(torch.isfinite(torch.tensor(loss["loss"])))
    blank = torch.ones(latents.shape[0], 64, 64)
    blank[1] = 0
    with torch.inference_mode():
        [zero] = core("SetLatentNoiseMask")().set_mask({"samples": latents}, blank)
    with pytest.raises(ValueError, match="noise_mask of sample 1 is zero everywhere"):
        run_train(train_node, model, zero, positive, steps=1)


def test_wan_trains_on_images_and_clips_mixed(train_node, comfy, tmp_path):
    """A tiny Wan 2.1 text-to-video model (dim 128: one head; two blocks; 4096-wide text)
    built through ComfyUI's detection."""
    family = tiny_families.FAMILIES["wan21_t2v"]
    reason = family.available()
    if reason is not None:
        pytest.skip(reason)
    with torch.inference_mode():
        model = tiny_families._build("wan21_t2v_2", seed=1)
    assert len(model.model.diffusion_model.blocks) == 2
    assert type(model.model.model_config).__name__ == "WAN21_T2V"
    g = torch.Generator().manual_seed(0)
    images = {"samples": torch.randn(2, 16, 1, 8, 8, generator=g)}
    clips = {"samples": torch.randn(2, 16, 3, 8, 8, generator=g)}
    positive = family.cond(seed=3)
    probe = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    reference = model_output(model, probe, positive)
    trained, lora, loss, _ = run_train(train_node, model, [images, clips], [positive],
                                       steps=4, batch_size=2, learning_rate=1e-2)
    assert all(torch.isfinite(torch.tensor(loss["loss"])))
    assert torch.equal(model_output(model, probe, positive), reference), "input MODEL changed"
    loaded, lines = core_reload(model, lora, tmp_path / "wan.safetensors")
    assert not [line for line in lines if "not loaded" in line.lower()], lines
    with_lora = model_output(trained, probe, positive)
    assert not torch.equal(with_lora, reference)
    assert (model_output(loaded, probe, positive) - with_lora).abs().max() <= \
        1e-4 * with_lora.abs().max()
