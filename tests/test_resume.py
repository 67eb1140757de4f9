"""Long runs on tiny real networks: exact resume from a training state, checkpoints and
previews that do not change the result, validation losses."""

import dataclasses

import pytest
import torch

from lora_lab.optimizers import OPTIMIZERS
from lora_lab.training.config import TrainConfig
from lora_lab.training.loop import Validation, train
from lora_lab.training.state import TrainingState, state_path
from tiny_tasks import make_task

FP32 = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)
# every option of the contract on: warm-up + schedule, EMA, accumulation, batch > 1
EVERYTHING = dict(FP32, batch_size=2, grad_accumulation_steps=2, warmup_steps=2,
                  ema_decay=0.9, learning_rate=2e-3, max_grad_norm=1.0)


class Stop(Exception):
    pass


def run_with_checkpoints(task, latents, config, stop_after=None, **more):
    """Train, keeping every checkpoint; ``stop_after``: cancel after that step (as Cancel
    does, from on_step)."""
    checkpoints = []

    def on_step(report):
        if stop_after is not None and report.step == stop_after:
            raise Stop

    try:
        result = train(task, latents, config, on_checkpoint=checkpoints.append, on_step=on_step,
                       **more)
    except Stop:
        result = None
    return result, checkpoints


def through_file(state, tmp_path):
    path = state_path(str(tmp_path / "lora_00003_.safetensors"))
    state.save(path)
    return TrainingState.load(path)


def assert_same_lora(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("algorithm", ["LoRA", "DoRA", "LoKr", "OFT"])
def test_k_steps_then_resume_equals_n_steps(kind, algorithm, tmp_path):
    task, latents = make_task(kind, count=5)  # 5 latents, 4 per step: epochs straddle steps
    n, k = 7, 3
    config = TrainConfig(steps=n, algorithm=algorithm, **EVERYTHING)
    full = train(task, latents, config)
    first, checkpoints = run_with_checkpoints(
        task, latents, dataclasses.replace(config, steps=k, checkpoint_every=k))
    assert [c.step for c in checkpoints] == [k]
    # the checkpoint's LoRA is what the k-step run returned (EMA weights)
    assert_same_lora(checkpoints[0].lora, first.lora)
    state = through_file(checkpoints[0].state, tmp_path)
    resumed = train(task, latents, dataclasses.replace(config, steps=n - k), resume=state)
    assert resumed.previous_steps == k
    assert_same_lora(resumed.lora, full.lora)
    # the losses of the resumed steps are the full run's
    assert resumed.losses == full.losses[k:]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_cancelled_run_resumes_exactly_with_a_decaying_schedule(optimizer, tmp_path):
    """A cosine run planned over n steps, cancelled after step 5, resumes from its step-4
    checkpoint and ends equal to the uninterrupted run."""
    task, latents = make_task("unet")
    options = dict(EVERYTHING, lr_schedule="cosine", min_lr_ratio=0.1, optimizer=optimizer,
                   learning_rate={"Prodigy": 1.0, "Adafactor": 0.1}.get(optimizer, 1e-3))
    if optimizer == "AdamWScheduleFree":
        options["ema_decay"] = 0.0
    n = 8
    config = TrainConfig(steps=n, **options)
    full = train(task, latents, config)
    result, checkpoints = run_with_checkpoints(
        task, latents, dataclasses.replace(config, checkpoint_every=2), stop_after=5)
    assert result is None and [c.step for c in checkpoints] == [2, 4]
    state = through_file(checkpoints[-1].state, tmp_path)
    assert (state.step, state.planned) == (4, n)
    resumed = train(task, latents, dataclasses.replace(config, steps=n - 4), resume=state)
    assert_same_lora(resumed.lora, full.lora)


def test_checkpoints_previews_and_validation_do_not_change_the_result():
    task, latents = make_task("unet")
    for options in (dict(EVERYTHING), dict(EVERYTHING, ema_decay=0.0,
                                           optimizer="AdamWScheduleFree")):
        config = TrainConfig(steps=6, **options)
        plain = train(task, latents, config)
        seen = []

        def preview(step):
            # a preview reads the returned weights and may draw from the global RNG
            seen.append(step)
            torch.randn(3)

        rng = torch.get_rng_state()
        busy = train(task, latents, dataclasses.replace(
            config, checkpoint_every=2, preview_every=4, validation_every=1),
            on_checkpoint=lambda c: None, on_preview=preview)
        assert torch.equal(torch.get_rng_state(), rng)
        assert seen == [4, 6]  # every 4 steps and at the end
        assert_same_lora(busy.lora, plain.lora)


def test_a_preview_sees_the_weights_the_run_returns():
    """With EMA on, a preview at the last step sees the EMA weights, which the run returns."""
    task, latents = make_task("unet")
    config = TrainConfig(steps=4, preview_every=4, **EVERYTHING)
    seen = {}

    def preview(step):
        seen[step] = {name: a.down.detach().clone() for name, a in adapters.items()}

    adapters = {}
    result = train(task, latents, config, on_preview=preview,
                   on_step=lambda r: adapters.update(r.adapters) if not adapters else None)
    # the adapters are taken from the first step's report (the same objects throughout)
    assert set(seen) == {4}
    for name, adapter in result.adapters.items():
        assert torch.equal(seen[4][name], adapter.down.detach())


def test_validation_is_deterministic_and_decreases():
    task, latents = make_task("unet")
    config = TrainConfig(steps=30, validation_every=10, learning_rate=3e-3, rank=4, **FP32)
    first = train(task, latents, config)
    second = train(task, latents, dataclasses.replace(config, seed=7))
    assert [s for s, _ in first.validation] == [10, 20, 30]
    again = train(task, latents, config)
    assert again.validation == first.validation
    assert first.validation[-1][1] < first.validation[0][1]
    assert second.validation != first.validation  # another seed trains another LoRA


def test_validation_on_other_latents():
    task, latents = make_task("unet", count=6)
    config = TrainConfig(steps=4, validation_every=2, **FP32)
    held_out = Validation(task.for_data(task.context[4:], latents[4:]), latents[4:])
    on_train = train(task, latents[:4], config)
    on_held = train(task, latents[:4], config, validation=held_out)
    assert [s for s, _ in on_held.validation] == [2, 4]
    assert on_held.validation != on_train.validation
    assert_same_lora(on_held.lora, on_train.lora)


def _state(task, latents, **options):
    config = TrainConfig(steps=2, checkpoint_every=2, **dict(FP32, **options))
    _, checkpoints = run_with_checkpoints(task, latents, config)
    return checkpoints[-1].state


@pytest.mark.parametrize("change, message", [
    (dict(rank=4), "rank=4"),
    (dict(algorithm="LoHa"), "algorithm='LoHa'"),
    (dict(target_layers="attention"), "target_layers='attention'"),
    (dict(ema_decay=0.5), "ema_decay=0.5"),
])
def test_a_state_that_does_not_fit_is_refused(change, message):
    task, latents = make_task("unet")
    state = _state(task, latents)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        train(task, latents, TrainConfig(steps=2, **dict(FP32, **change)), resume=state)


def test_a_state_from_another_model_or_dataset_is_refused():
    task, latents = make_task("unet")
    state = _state(task, latents)
    other, other_latents = make_task("dit")
    with pytest.raises(ValueError, match="do not fit this model"):
        train(other, other_latents, TrainConfig(steps=2, **FP32), resume=state)
    with pytest.raises(ValueError, match="made on 4 latents; this run has 3"):
        train(task, latents[:3], TrainConfig(steps=2, **FP32), resume=state)


def test_state_file_round_trip_and_refusals(tmp_path):
    task, latents = make_task("dit")
    state = _state(task, latents, ema_decay=0.5)
    path = str(tmp_path / "x.training_state")
    state.save(path)
    loaded = TrainingState.load(path)
    assert (loaded.step, loaded.planned) == (state.step, state.planned)
    assert loaded.info == state.info
    assert loaded.tensors.keys() == state.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], state.tensors[k]) for k in state.tensors)
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
    (tmp_path / "bad.training_state").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="could not be read"):
        TrainingState.load(str(tmp_path / "bad.training_state"))
    assert state_path("/a/b/lora_00001_.safetensors") == "/a/b/lora_00001_.training_state"


def test_a_continued_lora_file_resumes_from_its_checkpoint_file(tmp_path):
    """A run that continued a LoRA file's weights (rank 4, while the rank option says 8)
    resumes exactly: its adapters are rebuilt from the checkpoint's file, not the options."""
    from lora_lab.lora.io import adapters_from_state_dict

    task, latents = make_task("unet")
    first = train(task, latents, TrainConfig(steps=2, rank=4, **FP32))

    def adapters_of(lora):
        return lambda: (adapters_from_state_dict(task.network, lora, "diffusion_model.",
                                                 torch.float32), {})

    config = TrainConfig(steps=6, rank=8, **EVERYTHING)
    full = train(task, latents, config, existing=adapters_of(first.lora))
    _, checkpoints = run_with_checkpoints(
        task, latents, dataclasses.replace(config, steps=3, checkpoint_every=3),
        existing=adapters_of(first.lora))
    [checkpoint] = checkpoints
    state = through_file(checkpoint.state, tmp_path)
    assert state.info["adapters_from"] == "file"
    resumed = train(task, latents, dataclasses.replace(config, steps=3, rank=16), resume=state,
                    existing=adapters_of(checkpoint.lora))
    assert_same_lora(resumed.lora, full.lora)
    with pytest.raises(ValueError, match="give the adapters of its checkpoint file"):
        train(task, latents, dataclasses.replace(config, steps=3), resume=state)
