"""Save LoRA, Plot Loss, Apply LoRA and Load Image Dataset inside real ComfyUI (in-process):
what each node hands to ComfyUI's own nodes, and what it writes."""

import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

import tiny_models



@pytest.fixture(scope="module")
def node(pack_nodes):
    return pack_nodes.__getitem__




@pytest.fixture(scope="module")
def trained(node):
    """A short Train LoRA run on a tiny SD1.x model: (model, lora, loss, steps)."""
    model = tiny_models.tiny_sd15(seed=1)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    values = dict(batch_size=2, grad_accumulation_steps=1, steps=3, learning_rate=1e-2, rank=4,
                  optimizer="AdamW", loss_function="MSE", seed=0, training_dtype="fp32",
                  lora_dtype="fp32", algorithm="LoRA", gradient_checkpointing=False,
                  existing_lora="[None]")
    with torch.inference_mode():
        _, lora, loss, steps, _ = node("LoRALab_TrainLoRA").execute(
            model, {"samples": latents}, tiny_models.sd15_cond(seed=3), **values).result
    return model, lora, loss, steps


def denoised(patcher, seed=5):
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patcher])
        [cond] = comfy.sampler_helpers.convert_cond(tiny_models.sd15_cond(seed=3))
        [cond] = comfy.samplers.encode_model_conds(
            patcher.model.extra_conds, [cond], x, torch.device("cpu"), "positive")
        kwargs = comfy.samplers.cond_cat([{k: v.process_cond(batch_size=1, area=None)
                                           for k, v in cond["model_conds"].items()}])
        return patcher.model.apply_model(x, torch.tensor([3.0]), **kwargs).clone()


def test_every_input_and_output_has_a_tooltip(node):
    for node_id in ("LoRALab_SaveLoRA", "LoRALab_PlotLoss", "LoRALab_ApplyLoRA",
                    "LoRALab_LoadDataset", "LoRALab_TrainLoRA", "LoRALab_TrainingOptions"):
        info = node(node_id).GET_SCHEMA().get_v1_info(node(node_id))
        for group in ("required", "optional"):
            for name, (_, options) in info.input.get(group, {}).items():
                assert options.get("tooltip"), f"{node_id}.{name}"
        assert all(info.output_tooltips), node_id


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.5, 0.0])
def test_apply_lora_equals_core_loader(node, trained, strength):
    import nodes

    model, lora, _, _ = trained
    [ours] = node("LoRALab_ApplyLoRA").execute(model, lora, strength).result
    core_node = nodes.NODE_CLASS_MAPPINGS["LoraModelLoader"]
    [core] = getattr(core_node(), core_node.FUNCTION)(model, lora, strength)
    assert set(ours.patches) == set(core.patches)
    for key in ours.patches:
        assert [p[0] for p in ours.patches[key]] == [p[0] for p in core.patches[key]]
    assert torch.equal(denoised(ours), denoised(core))
    if strength == 0:
        assert ours is model
    else:
        assert not ours.patches.keys() & model.patches.keys(), "the input model got patches"


def test_save_lora_is_listed_at_once_and_loads_in_core(node, trained, loras_dir):
    import folder_paths
    import nodes

    model, lora, _, steps = trained
    save = node("LoRALab_SaveLoRA")
    first = save.execute(lora, "lora_lab/test", steps)
    second = save.execute(lora, "lora_lab/test", steps)
    name, again = first.result[0], second.result[0]
    assert name == "lora_lab/test_3_steps_00001_.safetensors"
    assert again == "lora_lab/test_3_steps_00002_.safetensors"
    assert first.ui.as_dict() == {"text": (f"Saved to loras/{name}",)}
    listed = folder_paths.get_filename_list("loras")
    assert name in listed and again in listed
    train_info = node("LoRALab_TrainLoRA").GET_SCHEMA().get_v1_info(node("LoRALab_TrainLoRA"))
    existing = train_info.input["required"]["existing_lora"]
    assert name in (existing[1]["options"] if existing[0] == "COMBO" else existing[0])

    with safe_open(os.path.join(loras_dir, name), framework="pt") as f:
        meta = f.metadata()
    assert meta["lora_lab.steps"] == meta["ss_steps"] == "3"
    assert meta["lora_lab.base_model"] == "SD15" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_module"] == "networks.lora"
    assert meta["lora_lab.optimizer"] == "AdamW" and meta["ss_learning_rate"] == "0.01"

    loader = nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]
    [from_file] = getattr(loader(), loader.FUNCTION)(model, name, 1.0)
    [applied] = node("LoRALab_ApplyLoRA").execute(model, lora, 1.0).result
    assert torch.equal(denoised(from_file), denoised(applied))


def test_save_lora_accepts_core_lora_and_rejects_escapes(node, trained, loras_dir):
    _, lora, _, _ = trained
    plain = dict(lora)  # what ComfyUI's own trainer outputs: no metadata
    [name] = node("LoRALab_SaveLoRA").execute(plain, "core_lora").result
    assert name == "core_lora_00001_.safetensors"
    with safe_open(os.path.join(loras_dir, name), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and "ss_steps" not in meta
    for prefix in ("../outside", os.path.join(os.sep, "tmp", "abs")):
        with pytest.raises(ValueError, match="filename_prefix"):
            node("LoRALab_SaveLoRA").execute(plain, prefix)
    assert not os.path.exists(os.path.join(os.path.dirname(loras_dir), "outside_00001_.safetensors"))


def test_plot_loss_returns_the_chart_and_shows_it(node, trained, comfy):
    import folder_paths
    from lora_lab_under_test.training.plot import render_loss_plot

    _, _, loss, _ = trained
    os.makedirs(folder_paths.get_temp_directory(), exist_ok=True)
    out = node("LoRALab_PlotLoss").execute(loss, 0.6, True, 320, 200)
    [image] = out.result
    assert image.shape == (1, 200, 320, 3) and image.dtype == torch.float32
    expected = render_loss_plot(loss, 0.6, True, 320, 200)
    assert np.array_equal((image[0] * 255).round().byte().numpy(), expected)
    shown = out.ui.as_dict()["images"]
    assert len(shown) == 1 and shown[0]["type"] == "temp"
    assert os.path.isfile(os.path.join(folder_paths.get_temp_directory(), shown[0]["subfolder"],
                                       shown[0]["filename"]))
    # a core LOSS_MAP (tensors), one value and NaN
    for odd in ({"loss": [torch.tensor(0.5)]}, {"loss": [1.0, float("nan"), 0.5]}):
        assert node("LoRALab_PlotLoss").execute(odd, 0.6, False, 256, 192).result[0].shape == (1, 192, 256, 3)


class FakeVAE:
    """Encodes [B, H, W, 3] pixels to [B, 4, H/8, W/8] (mean colour per 8x8 cell)."""

    def __init__(self):
        self.calls = []

    def encode(self, pixels):
        self.calls.append(tuple(pixels.shape))
        b, h, w, _ = pixels.shape
        cells = pixels.reshape(b, h // 8, 8, w // 8, 8, 3).mean(dim=(2, 4))
        return torch.cat([cells, cells.mean(-1, keepdim=True)], -1).movedim(-1, 1)


class FakeCLIP:
    """Tokenizes to the caption itself; encodes to a [1, 77, 768] tensor seeded by it."""

    def __init__(self):
        self.encoded = []

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        self.encoded.append(tokens)
        g = torch.Generator().manual_seed(sum(map(ord, tokens)))
        return [[torch.randn(1, 77, 768, generator=g), {"caption": tokens}]]


@pytest.fixture
def dataset_dir(comfy):
    import folder_paths
    from PIL import Image

    root = os.path.join(folder_paths.get_input_directory(), "lora_lab_set")
    os.makedirs(os.path.join(root, "2_red"), exist_ok=True)
    Image.new("RGB", (96, 64), (0, 0, 255)).save(os.path.join(root, "b.png"))
    Image.new("RGB", (64, 96), (0, 255, 0)).save(os.path.join(root, "a.png"))
    with open(os.path.join(root, "a.txt"), "w") as f:
        f.write("green")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(os.path.join(root, "2_red", "c.png"))
    with open(os.path.join(root, "2_red", "c.txt"), "w") as f:
        f.write("red")
    yield "lora_lab_set"
    import shutil
    shutil.rmtree(root)


def test_load_dataset_encodes_in_order_with_repeats(node, dataset_dir):
    schema = node("LoRALab_LoadDataset").GET_SCHEMA()
    folder_input = next(i for i in schema.inputs if i.id == "folder")
    assert dataset_dir in folder_input.options

    vae, clip = FakeVAE(), FakeCLIP()
    [latents], [positive] = node("LoRALab_LoadDataset").execute(
        dataset_dir, vae, clip, 64, 64, "crop", "default").result
    samples = latents["samples"]
    assert samples.shape == (4, 4, 8, 8)  # a, b, c, c (2_red repeats twice)
    colours = samples[:, :3].mean(dim=(2, 3))
    assert torch.allclose(colours, torch.tensor([[0., 1, 0], [0, 0, 1], [1, 0, 0], [1, 0, 0]]), atol=0.02)
    assert [p[1]["caption"] for p in positive] == ["green", "default", "red", "red"]
    assert vae.calls == [(1, 64, 64, 3)] * 3, "each image is encoded once, one at a time"
    assert sorted(clip.encoded) == ["default", "green", "red"], "each caption is encoded once"
    assert positive[2] is positive[3]


def test_load_dataset_bucket_mode_gives_one_latent_per_size(node, dataset_dir):
    """96x64, 64x96 and 64x64 images at about 256x256 pixels: buckets 320x192, 192x320 and
    256x256 (sides multiples of 64, the aspect ratio nearest each image's), in order."""
    latents, positive = node("LoRALab_LoadDataset").execute(
        dataset_dir, FakeVAE(), FakeCLIP(), 256, 256, "bucket", "default").result
    assert [tuple(l["samples"].shape) for l in latents] == [
        (1, 4, 40, 24), (1, 4, 24, 40), (2, 4, 32, 32)]  # a (portrait), b, c twice
    assert [[p[1]["caption"] for p in group] for group in positive] == [
        ["green"], ["default"], ["red", "red"]]
    colours = [l["samples"][:, :3].mean(dim=(0, 2, 3)) for l in latents]
    assert torch.allclose(torch.stack(colours), torch.tensor([[0., 1, 0], [0, 0, 1], [1, 0, 0]]),
                          atol=0.02)
    _, lora, loss, _, _ = train_tiny(node, latents, positive, steps=3)
    assert lora and all(torch.isfinite(torch.tensor(loss["loss"])))


def train_tiny(node, latents, positive, steps):
    """Train LoRA's five outputs for a dataset node's outputs, on a tiny SD1.x."""
    model = tiny_models.tiny_sd15(seed=4)
    values = dict(batch_size=2, grad_accumulation_steps=1, steps=steps, learning_rate=1e-3,
                  rank=2, optimizer="AdamW", loss_function="MSE", seed=0,
                  training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
                  gradient_checkpointing=False, existing_lora="[None]")
    with torch.inference_mode():
        return node("LoRALab_TrainLoRA").execute(model, latents, positive, **values).result


def test_load_dataset_trains_with_train_lora(node, dataset_dir):
    latents, positive = node("LoRALab_LoadDataset").execute(
        dataset_dir, FakeVAE(), FakeCLIP(), 64, 64, "pad", "").result
    _, lora, loss, steps, previews = train_tiny(node, latents, positive, steps=2)
    assert steps == 2 and len(loss["loss"]) == 2 and lora
    assert previews.shape == (1, 64, 64, 3) and not previews.any()  # previews off: blank


def test_load_dataset_errors_name_the_problem(node, dataset_dir, comfy):
    import folder_paths

    with pytest.raises(ValueError, match="input directory"):
        node("LoRALab_LoadDataset").execute("../..", FakeVAE(), FakeCLIP(), 64, 64, "crop", "")
    bad = os.path.join(folder_paths.get_input_directory(), dataset_dir, "zz_broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="zz_broken.jpg"):
        node("LoRALab_LoadDataset").execute(dataset_dir, FakeVAE(), FakeCLIP(), 64, 64, "crop", "")


def test_load_dataset_lists_only_image_folders(node, dataset_dir, pack, tmp_path, monkeypatch):
    import folder_paths

    NO_IMAGE_FOLDER = pack.nodes.companion_spec.NO_IMAGE_FOLDER

    empty = os.path.join(folder_paths.get_input_directory(), "lora_lab_no_images")
    os.makedirs(os.path.join(empty, "deeper"), exist_ok=True)
    try:
        options = next(i for i in node("LoRALab_LoadDataset").GET_SCHEMA().inputs
                       if i.id == "folder").options
        assert dataset_dir in options and f"{dataset_dir}/2_red" in options
        assert "lora_lab_no_images" not in options and NO_IMAGE_FOLDER not in options
        assert options == sorted(options)
    finally:
        import shutil
        shutil.rmtree(empty)

    # A fresh install: nothing but ComfyUI's own (imageless) 3d folder.
    fresh = tmp_path / "input"
    (fresh / "3d").mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(fresh))
    options = next(i for i in node("LoRALab_LoadDataset").GET_SCHEMA().inputs
                   if i.id == "folder").options
    assert options == [NO_IMAGE_FOLDER]
    with pytest.raises(ValueError, match="subfolder of it.*refresh"):
        node("LoRALab_LoadDataset").execute(NO_IMAGE_FOLDER, FakeVAE(), FakeCLIP(), 64, 64, "crop", "")
