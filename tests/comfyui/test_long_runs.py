"""Long runs through the Train LoRA node in real ComfyUI: checkpoints in the loras folder and
the exact resume from one, a cancelled run's checkpoint, states that do not fit, previews
sampled with ComfyUI's sampler (not changing the result), and validation losses."""

import os

import pytest
import torch

from test_options import make_options
from test_train_node import family_case, run_train, run_train_all

EVERYTHING = dict(warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1, ema_decay=0.9)


def files(folder):
    return sorted(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
                  for root, _, names in os.walk(folder) for f in names)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Cancel:
    """Press Cancel (ComfyUI's interrupt flag) right after the checkpoint of ``step``."""

    def __init__(self, pack, monkeypatch, step):
        import importlib

        long_runs = importlib.import_module(pack.__name__ + ".nodes.long_runs")
        original = long_runs.CheckpointWriter.__call__

        def call(writer, checkpoint):
            original(writer, checkpoint)
            if checkpoint.step == step:
                import comfy.model_management

                comfy.model_management.interrupt_current_processing(True)

        monkeypatch.setattr(long_runs.CheckpointWriter, "__call__", call)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_k_steps_then_resume_from_the_checkpoint_equals_n_steps(
        family, train_node, options_node, loras_dir, comfy):
    model, latents, positive, _ = family_case(family)
    n, k = 6, 3
    common = dict(batch_size=2, grad_accumulation_steps=2, gradient_checkpointing=True)
    options = make_options(options_node, **dict(EVERYTHING, lr_schedule="constant"))
    _, full, loss_full, _ = run_train(train_node, model, latents, positive, steps=n,
                                      options=options, **common)
    with_checkpoints = make_options(options_node, options, checkpoint_every=k,
                                    checkpoint_prefix="runs/a")
    _, first, _, steps = run_train(train_node, model, latents, positive, steps=k,
                                   options=with_checkpoints, **common)
    assert files(loras_dir) == ["runs/a_3_steps_00001_.safetensors",
                                "runs/a_3_steps_00001_.training_state"]
    _, resumed, loss_resumed, total = run_train(
        train_node, model, latents, positive, steps=n - k, options=options,
        existing_lora="runs/a_3_steps_00001_.safetensors", **common)
    assert total == n
    assert same(resumed, full)
    assert loss_resumed["loss"] == loss_full["loss"][k:]


def test_a_cancelled_run_resumes_exactly_from_its_last_checkpoint(
        pack, train_node, options_node, loras_dir, comfy, monkeypatch):
    import comfy.model_management

    model, latents, positive, _ = family_case("sd15")
    n = 6
    options = make_options(options_node, **EVERYTHING)
    _, full, _, _ = run_train(train_node, model, latents, positive, steps=n, options=options)
    Cancel(pack, monkeypatch, step=4)
    chosen = make_options(options_node, options, checkpoint_every=2, checkpoint_prefix="c/run")
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_train(train_node, model, latents, positive, steps=n, options=chosen)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    monkeypatch.undo()
    assert files(loras_dir) == [
        "c/run_2_steps_00001_.safetensors", "c/run_2_steps_00001_.training_state",
        "c/run_4_steps_00002_.safetensors", "c/run_4_steps_00002_.training_state"]
    _, resumed, _, total = run_train(train_node, model, latents, positive, steps=n - 4,
                                     options=options,
                                     existing_lora="c/run_4_steps_00002_.safetensors")
    assert total == n and same(resumed, full)
    # the input model is left as it was: a fresh run still equals the first
    _, again, _, _ = run_train(train_node, model, latents, positive, steps=n, options=options)
    assert same(again, full)


def test_keep_checkpoints_deletes_only_this_runs_older_files(
        train_node, options_node, loras_dir, comfy):
    model, latents, positive, _ = family_case("sd15")
    os.makedirs(os.path.join(loras_dir, "k"))
    mine = os.path.join(loras_dir, "k", "run_1_steps_00001_.safetensors")
    with open(mine, "wb") as f:
        f.write(b"a user's file with the same prefix")
    chosen = make_options(options_node, checkpoint_every=1, keep_checkpoints=2,
                          checkpoint_prefix="k/run")
    run_train(train_node, model, latents, positive, steps=4, options=chosen)
    assert files(loras_dir) == [
        "k/run_1_steps_00001_.safetensors",  # not this run's: kept
        "k/run_3_steps_00004_.safetensors", "k/run_3_steps_00004_.training_state",
        "k/run_4_steps_00005_.safetensors", "k/run_4_steps_00005_.training_state"]
    with open(mine, "rb") as f:
        assert f.read() == b"a user's file with the same prefix"


def test_a_checkpoint_carries_save_loras_metadata(train_node, options_node, loras_dir, comfy):
    from safetensors import safe_open

    model, latents, positive, _ = family_case("sd15")
    chosen = make_options(options_node, checkpoint_every=3)
    _, lora, _, _ = run_train(train_node, model, latents, positive, steps=3, options=chosen,
                              seed=5)
    [name] = [f for f in files(loras_dir) if f.endswith(".safetensors")]
    assert name == "checkpoints/SD15_LoRA_r4_seed5_3_steps_00001_.safetensors"
    with safe_open(os.path.join(loras_dir, name), framework="pt") as f:
        meta = f.metadata()
        saved = {key: f.get_tensor(key) for key in f.keys()}
    assert same(saved, dict(lora))  # the checkpoint at the last step is the result
    assert meta["lora_lab.steps"] == "3" and meta["ss_steps"] == "3"
    assert meta["lora_lab.checkpoint_every"] == "3" and meta["lora_lab.seed"] == "5"


@pytest.mark.parametrize("change, message", [
    (dict(rank=8), "rank=8"), (dict(algorithm="LoHa"), "algorithm='LoHa'")])
def test_a_state_that_does_not_fit_is_refused_and_nothing_written(
        change, message, train_node, options_node, loras_dir, comfy):
    model, latents, positive, _ = family_case("sd15")
    chosen = make_options(options_node, checkpoint_every=2, checkpoint_prefix="s/run")
    run_train(train_node, model, latents, positive, steps=2, options=chosen)
    before = files(loras_dir)
    with pytest.raises(ValueError, match=message):
        run_train(train_node, model, latents, positive, steps=2, options=chosen,
                  existing_lora="s/run_2_steps_00001_.safetensors", **change)
    sd3, sd3_latents, sd3_positive, _ = family_case("sd3")
    with pytest.raises(ValueError, match="do not fit this model"):
        run_train(train_node, sd3, sd3_latents, sd3_positive, steps=2, options=chosen,
                  existing_lora="s/run_2_steps_00001_.safetensors")
    assert files(loras_dir) == before


class StandInVAE:
    """Decodes [B, C, h, w] latents to [B, 8h, 8w, 3] images (first three channels, through
    a sigmoid, nearest-upsampled): a deterministic stand-in for a VAE's decoder."""

    def decode(self, samples):
        rgb = torch.sigmoid(samples[:, :3].float())
        return rgb.repeat_interleave(8, -1).repeat_interleave(8, -2).movedim(1, -1)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_previews_do_not_change_the_result_and_follow_the_lora(
        family, train_node, options_node, comfy):
    model, latents, positive, _ = family_case(family)
    plain = make_options(options_node, ema_decay=0.5)
    prompts = positive + [[positive[0][0] * -1, dict(positive[0][1])]]
    previewing = make_options(options_node, plain, preview_every=2, preview_steps=3,
                              vae=StandInVAE(), preview_conditioning=prompts)
    rng = torch.get_rng_state()
    *_, grid = run_train_all(train_node, model, latents, positive, steps=4, options=previewing,
                             learning_rate=5e-2)
    assert torch.equal(torch.get_rng_state(), rng)
    _, without, _, _, blank = run_train_all(train_node, model, latents, positive, steps=4,
                                            options=plain, learning_rate=5e-2)
    _, with_previews, _, _ = run_train(train_node, model, latents, positive, steps=4,
                                       options=previewing, learning_rate=5e-2)
    assert same(with_previews, without)
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
    assert grid.shape == (1, 2 * h, 2 * w, 3) and blank.shape == (1, 64, 64, 3)
    step2, step4 = grid[0, :h], grid[0, h:]
    assert not torch.equal(step2, step4)  # the adapters changed between the previews
    assert not torch.equal(step2[:, :w], step2[:, w:])  # one column per prompt
    with pytest.raises(ValueError, match="preview_every needs the vae input"):
        run_train(train_node, model, latents, positive, steps=2,
                  options=make_options(options_node, preview_every=1))


def test_previews_decode_with_a_real_comfyui_vae(train_node, options_node, comfy):
    """ComfyUI's own VAE class (SD1.x layout, random weights) decodes the previews; the run
    is still bit-identical to one without previews."""
    from tiny_models import tiny_sd_vae

    model, latents, positive, _ = family_case("sd15")
    vae = tiny_sd_vae()
    previewing = make_options(options_node, preview_every=2, preview_steps=2, vae=vae,
                              preview_conditioning=positive)
    _, lora, _, _, grid = run_train_all(train_node, model, latents, positive, steps=2,
                                        options=previewing)
    _, plain, _, _ = run_train(train_node, model, latents, positive, steps=2)
    assert same(lora, plain)
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
    assert grid.shape == (1, h, w, 3) and torch.isfinite(grid).all()
    assert float(grid.std()) > 0  # an image, not a blank


def test_validation_series_is_deterministic_and_decreases(train_node, options_node, comfy):
    model, latents, positive, _ = family_case("sd15")
    chosen = make_options(options_node, validation_every=5)
    _, _, first, _ = run_train(train_node, model, latents, positive, steps=20, options=chosen,
                               learning_rate=1e-2)
    _, _, second, _ = run_train(train_node, model, latents, positive, steps=20, options=chosen,
                                learning_rate=1e-2)
    assert [s for s, _ in first["validation"]] == [5, 10, 15, 20]
    assert first["validation"] == second["validation"]
    assert first["validation"][-1][1] < first["validation"][0][1]
    held_out = make_options(options_node, chosen, validation_latents={"samples": latents[:1]},
                            validation_conditioning=positive)
    _, _, third, _ = run_train(train_node, model, latents, positive, steps=20,
                               options=held_out, learning_rate=1e-2)
    assert len(third["validation"]) == 4 and third["validation"] != first["validation"]
    with pytest.raises(ValueError, match="validation_conditioning is not connected"):
        run_train(train_node, model, latents, positive, steps=2, options=make_options(
            options_node, chosen, validation_latents={"samples": latents[:1]}))


def test_live_progress_shows_the_newest_previews_beside_the_loss_curve(pack, comfy):
    """The image sent with ComfyUI's progress bar: the loss curve (with the validation series)
    and, once a preview exists, its row of images beside it, sent as soon as it is new."""
    import importlib
    from types import SimpleNamespace

    progress = importlib.import_module(pack.__name__ + ".nodes.progress")
    sent = []
    live = progress.LiveProgress(3, preview_seconds=1e9)
    live.bar = SimpleNamespace(update_absolute=lambda step, total, image: sent.append(image))
    previews = SimpleNamespace(rows=[], latest=lambda: None)
    live.previews = previews
    report = lambda step, validation=None: SimpleNamespace(  # noqa: E731
        step=step, total=3, loss=1.0 / step, validation=validation, adapters={})
    live(report(1, validation=0.9))  # nothing new, too soon for another curve
    assert sent == [None]
    width, height = progress.PREVIEW_SIZE
    row = torch.rand(16, 48, 3)
    previews.rows.append((2, row))
    previews.latest = lambda: row
    live(report(2))  # a new preview row: sent at once, beside the curve
    assert sent[1][1].size == (width + 48 * height // 16, height)
    previews.latest = lambda: None
    live(report(3))  # the last step: the curve (with previews off, alone)
    assert sent[2][1].size == (width, height)
    assert live.validation == [[1, 0.9]]


def test_a_continued_file_resumes_from_its_checkpoint(train_node, options_node, loras_dir,
                                                      comfy):
    """Continue a rank-4 LoRA file while the rank widget says 8, with checkpoints; resuming
    from a checkpoint (any rank widget) equals the uninterrupted continuation."""
    import comfy.utils

    model, latents, positive, _ = family_case("sd15")
    _, base, _, _ = run_train(train_node, model, latents, positive, steps=2, rank=4)
    comfy.utils.save_torch_file(dict(base), os.path.join(loras_dir, "base_2_steps_.safetensors"))
    options = make_options(options_node, **dict(EVERYTHING, lr_schedule="constant"))
    _, full, _, total = run_train(train_node, model, latents, positive, steps=5, rank=8,
                                  options=options, existing_lora="base_2_steps_.safetensors")
    assert total == 7
    chosen = make_options(options_node, options, checkpoint_every=3, checkpoint_prefix="f/run")
    run_train(train_node, model, latents, positive, steps=3, rank=8, options=chosen,
              existing_lora="base_2_steps_.safetensors")
    _, resumed, _, total = run_train(train_node, model, latents, positive, steps=2, rank=16,
                                     options=options,
                                     existing_lora="f/run_5_steps_00001_.safetensors")
    assert total == 7 and same(resumed, full)  # the checkpoint counts the file's 2 steps
