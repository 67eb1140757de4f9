"""Latents of several sizes (buckets) and masked losses on tiny real networks."""

import dataclasses

import pytest
import torch

from lora_lab.losses import per_sample_loss
from lora_lab.training.config import TrainConfig
from lora_lab.training.latents import BucketSampler, LatentSet, fit_mask
from lora_lab.training.loop import evaluate, train
from lora_lab.training.task import TorchTask, discrete_vp_sigmas
from tiny_tasks import make_task

FP32 = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)
SIZES = [(8, 8), (8, 12), (12, 8)]


def three_sizes(per_size=3, seed=0):
    """A tiny eps UNet task with 3 latents of each of three sizes, one context per latent."""
    task, _ = make_task("unet", count=per_size * len(SIZES), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randn(per_size, 4, h, w, generator=g) for h, w in SIZES]
    return task, batches


class Recorder:
    """Wraps a task's predict to record the shape of every micro-batch it sees."""

    def __init__(self, task):
        self.shapes = []
        predict = task.predict

        def recording(x_t, sigma, samples, dropped=None):
            self.shapes.append((tuple(x_t.shape[2:]), [int(i) for i in samples]))
            return predict(x_t, sigma, samples, dropped)

        task.predict = recording


def test_every_micro_batch_holds_one_size_and_every_sample_is_seen_per_epoch():
    task, batches = three_sizes()
    recorder = Recorder(task)
    config = TrainConfig(steps=6, batch_size=2, grad_accumulation_steps=2, **FP32)
    train(task, batches, config)
    seen = recorder.shapes[len(SIZES) * 1:]  # after the first-batch probe of each size
    size_of = {i: SIZES[i // 3] for i in range(9)}
    for shape, samples in seen:
        assert all(size_of[i] == shape for i in samples), (shape, samples)
    # an epoch = 9 samples in 6 micro-batches (2 + 1 per bucket): each seen once
    epoch = [i for _, samples in seen[:6] for i in samples]
    assert sorted(epoch) == list(range(9))


def test_bucketed_runs_are_deterministic_train_and_resume_exactly():
    task, batches = three_sizes()
    config = TrainConfig(steps=40, batch_size=2, learning_rate=3e-3, rank=4, **FP32)
    before = evaluate(task, batches, config, draws=27)
    first = train(task, batches, config)
    second = train(task, batches, config)
    assert all(torch.equal(first.lora[k], second.lora[k]) for k in first.lora)
    assert evaluate(task, batches, config, first.adapters, draws=27) < before
    other = train(task, batches, dataclasses.replace(config, seed=1))
    assert any(not torch.equal(first.lora[k], other.lora[k]) for k in first.lora)
    # exact resume with buckets: 10 + 30 steps = 40 steps
    checkpoints = []
    train(task, batches, dataclasses.replace(config, steps=10, checkpoint_every=10),
          on_checkpoint=checkpoints.append)
    resumed = train(task, batches, dataclasses.replace(config, steps=30),
                    resume=checkpoints[0].state)
    assert all(torch.equal(first.lora[k], resumed.lora[k]) for k in first.lora)


def test_one_size_in_batches_equals_one_tensor():
    """Batches of one size are one dataset: the same LoRA as the concatenated tensor."""
    task, latents = make_task("unet", count=4)
    config = TrainConfig(steps=3, batch_size=2, **FP32)
    whole = train(task, latents, config)
    split = train(task, [latents[:1], latents[1:]], config)
    assert all(torch.equal(whole.lora[k], split.lora[k]) for k in whole.lora)


def test_video_and_image_latents_mix():
    """5-D latents: one-frame images and three-frame clips in one run (a 3-D conv net)."""

    class Video(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(4, 16, 1)
            self.proj = torch.nn.Linear(16, 16)
            self.out = torch.nn.Conv3d(16, 4, 1)

        def forward(self, x, t, context):
            h = self.conv(x) + self.proj(context.mean(1))[:, :, None, None, None]
            return self.out(torch.nn.functional.silu(h))

    torch.manual_seed(0)
    net = Video().eval()
    context = torch.randn(4, 3, 16)
    task = TorchTask(net, "eps", discrete_vp_sigmas(), context)
    images, clips = torch.randn(2, 4, 1, 6, 6), torch.randn(2, 4, 3, 6, 6)
    recorder = Recorder(task)
    result = train(task, [images, clips], TrainConfig(steps=4, target_layers="all", **FP32))
    assert result.lora and all(torch.isfinite(torch.tensor(result.losses)))
    assert {shape for shape, _ in recorder.shapes} == {(1, 6, 6), (3, 6, 6)}
    for shape, samples in recorder.shapes:  # images are samples 0-1, clips 2-3
        assert all((i >= 2) == (shape[0] == 3) for i in samples)


# -- masks ------------------------------------------------------------------------------------
def test_a_zero_mask_region_gets_no_gradient():
    prediction = torch.randn(2, 4, 6, 6, requires_grad=True)
    target = torch.randn(2, 4, 6, 6)
    mask = torch.zeros(2, 1, 6, 6)
    mask[:, :, :3] = 1.0
    per_sample_loss("MSE", prediction, target, mask).sum().backward()
    assert prediction.grad[:, :, 3:].abs().max() == 0
    assert prediction.grad[:, :, :3].abs().min() > 0
    # an all-ones mask is the unmasked loss
    ones = per_sample_loss("MSE", prediction, target, torch.ones(2, 1, 6, 6))
    assert torch.allclose(ones, per_sample_loss("MSE", prediction, target))


def test_masks_are_resized_to_the_latent_and_checked():
    latents = torch.randn(3, 4, 8, 8)
    pixel = torch.zeros(1, 1, 64, 64)
    pixel[..., :32, :] = 1.0
    fitted = fit_mask(pixel, latents, "latents")
    assert fitted.shape == (3, 1, 8, 8)
    assert torch.equal(fitted[:, :, :4], torch.ones(3, 1, 4, 8))
    assert torch.equal(fitted[:, :, 4:], torch.zeros(3, 1, 4, 8))
    video = fit_mask(pixel, torch.randn(2, 4, 5, 8, 8), "latents")
    assert video.shape == (2, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="2 masks for 3 latents"):
        fit_mask(torch.ones(2, 1, 64, 64), latents, "latents")
    blank = torch.ones(3, 1, 8, 8)
    blank[1] = 0
    with pytest.raises(ValueError, match="noise_mask of sample 4 is zero everywhere"):
        LatentSet([torch.randn(3, 4, 8, 8), latents], [None, blank])


def test_masked_runs_differ_from_unmasked():
    task, latents = make_task("unet", count=2)
    config = TrainConfig(steps=3, learning_rate=1e-2, **FP32)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1.0
    plain = train(task, latents, config)
    masked = train(task, latents, config, masks=[mask])
    assert any(not torch.equal(plain.lora[k], masked.lora[k]) for k in plain.lora)
    assert all(torch.isfinite(torch.tensor(masked.losses)))


def test_bucket_sampler_state_round_trips():
    buckets = {(1,): [0, 1, 2], (2,): [3, 4]}
    a = BucketSampler(buckets, 2, torch.Generator().manual_seed(0))
    a.take(2)
    b = BucketSampler(buckets, 2, torch.Generator().manual_seed(5))
    b.generator.set_state(a.generator.get_state())
    b.restore(a.pending())
    assert [t.tolist() for t in a.take(5)] == [t.tolist() for t in b.take(5)]
