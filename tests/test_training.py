"""The training loop on tiny real networks: targets, accumulation, determinism, learning."""

import logging
import math

import pytest
import torch

from lora_lab.lora.inject import find_targets
from lora_lab.losses import TARGETS, add_noise, target_by_inversion
from lora_lab.training.checkpointing import checkpoint_blocks
from lora_lab.training.config import TrainConfig
from lora_lab.training.loop import TrainingDiverged, evaluate, train
from tiny_tasks import make_task

FP32 = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)


# -- targets -------------------------------------------------------------------------------
def _draw(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    sigma = torch.tensor([0.03, 0.5, 1.0, 4.0, 14.6])
    return x0, noise, sigma


def test_eps_and_v_targets_match_the_ddpm_formulas():
    """With abar = 1/(1+sigma^2): eps target = noise; v = sqrt(abar) eps - sqrt(1-abar) x0."""
    x0, noise, sigma = _draw()
    abar = (1 / (1 + sigma**2)).reshape(-1, 1, 1, 1)
    assert torch.equal(TARGETS["eps"](x0, noise, sigma), noise)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    assert torch.allclose(TARGETS["v"](x0, noise, sigma), v, atol=1e-6)
    # the network input x_t / sqrt(sigma^2+1) is the DDPM sample sqrt(abar) x0 + sqrt(1-abar) eps
    x_t = add_noise("eps", x0, noise, sigma)
    ddpm = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    assert torch.allclose(x_t * abar.sqrt(), ddpm, atol=1e-5)


def test_flow_target_is_velocity():
    x0, noise, _ = _draw()
    t = torch.tensor([0.001, 0.25, 0.5, 0.75, 1.0])
    x_t = add_noise("flow", x0, noise, t)
    assert torch.allclose(x_t, (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * noise)
    assert torch.equal(TARGETS["flow"](x0, noise, t), noise - x0)


# calculate_denoised of ComfyUI's EPS, V_PREDICTION (sigma_data 1) and CONST classes
DENOISERS = {
    "eps": lambda s, out, x: x - out * s.reshape(-1, 1, 1, 1),
    "v": lambda s, out, x: x / (s**2 + 1).reshape(-1, 1, 1, 1)
    - out * (s / (s**2 + 1).sqrt()).reshape(-1, 1, 1, 1),
    "flow": lambda s, out, x: x - out * s.reshape(-1, 1, 1, 1),
}


@pytest.mark.parametrize("kind", list(TARGETS))
def test_formula_targets_equal_the_inverted_denoiser(kind):
    x0, noise, sigma = _draw(1)
    if kind == "flow":
        sigma = torch.tensor([0.05, 0.25, 0.5, 0.75, 1.0])
    x_t = add_noise(kind, x0, noise, sigma)
    inverted = target_by_inversion(DENOISERS[kind], sigma, x_t, x0)
    assert torch.allclose(TARGETS[kind](x0, noise, sigma), inverted, atol=1e-5)


# -- the loop -------------------------------------------------------------------------------
def test_accumulation_4x1_equals_2x2():
    task, latents = make_task("unet")
    one = train(task, latents, TrainConfig(steps=2, batch_size=4, optimizer="SGD",
                                           learning_rate=0.1, **FP32))
    two = train(task, latents, TrainConfig(steps=2, batch_size=2, grad_accumulation_steps=2,
                                           optimizer="SGD", learning_rate=0.1, **FP32))
    assert one.losses == pytest.approx(two.losses, rel=1e-5)
    for key in one.lora:
        assert torch.allclose(one.lora[key], two.lora[key], atol=1e-6), key


def test_same_seed_same_lora_whatever_the_global_rng():
    task, latents = make_task("dit")
    config = TrainConfig(steps=3, batch_size=2, seed=7, training_dtype="bf16", lora_dtype="bf16")
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = train(task, latents, config)
    assert torch.equal(torch.get_rng_state(), state), "training moved the global RNG"
    torch.manual_seed(2)
    b = train(task, latents, config)
    assert a.losses == b.losses
    assert all(torch.equal(a.lora[k], b.lora[k]) for k in a.lora)
    c = train(task, latents, TrainConfig(steps=3, batch_size=2, seed=8))
    assert not all(torch.equal(a.lora[k], c.lora[k]) for k in a.lora)


def test_checkpointing_gives_the_same_lora_and_is_undone():
    task, latents = make_task("unet")
    assert checkpoint_blocks(task.network)
    plain = train(task, latents, TrainConfig(steps=2, batch_size=2, **FP32))
    ckpt = train(task, latents, TrainConfig(
        steps=2, batch_size=2, training_dtype="fp32", lora_dtype="fp32",
        gradient_checkpointing=True))
    for key in plain.lora:
        assert torch.allclose(plain.lora[key], ckpt.lora[key], atol=1e-6), key
    assert not [m for m in task.network.modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("kind", ["unet", "unet_v", "dit"])
def test_loss_of_a_fixed_task_drops(kind):
    task, latents = make_task(kind, count=2)
    config = TrainConfig(steps=40, batch_size=2, learning_rate=3e-3, alpha=8.0, **FP32)
    before = evaluate(task, latents, config)
    result = train(task, latents, config)
    after = evaluate(task, latents, config, result.adapters)
    assert after < 0.9 * before, (before, after)
    assert len(result.losses) == 40 and all(math.isfinite(v) for v in result.losses)


def test_network_is_untouched():
    task, latents = make_task("unet")
    state = {k: v.clone() for k, v in task.network.state_dict().items()}
    flags = [p.requires_grad for p in task.network.parameters()]
    train(task, latents, TrainConfig(steps=2, batch_size=2))
    after = task.network.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert flags == [p.requires_grad for p in task.network.parameters()]
    assert not [m for m in task.network.modules() if "forward" in m.__dict__]


def test_lora_dtype_bf16_saves_bf16_and_one_loss_per_optimizer_step():
    task, latents = make_task("dit")
    result = train(task, latents, TrainConfig(steps=3, batch_size=1, grad_accumulation_steps=3))
    assert len(result.losses) == 3
    ups = [v for k, v in result.lora.items() if k.endswith("lora_up.weight")]
    assert ups and all(v.dtype == torch.bfloat16 for v in ups)
    assert all(k.startswith("diffusion_model.") for k in result.lora)
    assert len(ups) == len(find_targets(task.network))


def test_batch_larger_than_dataset_is_clamped_with_a_warning(caplog):
    task, latents = make_task("unet", count=3)
    with caplog.at_level(logging.WARNING):
        result = train(task, latents, TrainConfig(steps=1, batch_size=50))
    assert result.batch_size == 3
    assert "batch_size 50 is larger than the 3 latents" in caplog.text


def test_divergence_names_the_step_and_applies_nothing():
    task, latents = make_task("unet")
    with pytest.raises(TrainingDiverged, match=r"at step 1 of 2.*Lower the learning rate"):
        train(task, latents * 1e30, TrainConfig(steps=2, **FP32))
    assert not [m for m in task.network.modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(0, 4, 8, 8), "0 samples"),
    (torch.full((2, 4, 8, 8), float("nan")), "NaN or Inf"),
    (torch.zeros(4, 8), "batch dimension"),
])
def test_bad_latents_are_value_errors(bad, match):
    task, _ = make_task("unet")
    with pytest.raises(ValueError, match=match):
        train(task, bad, TrainConfig(steps=1))


@pytest.mark.parametrize("field,value", [
    ("rank", 0), ("steps", 0), ("batch_size", 10001), ("learning_rate", 0.0),
    ("training_dtype", "fp16"), ("seed", -1),
])
def test_out_of_range_config_is_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("optimizer", "Nadam9"), ("loss_function", "Focal"), ("algorithm", "Nope"),
])
def test_unknown_registry_names_are_value_errors(field, value):
    task, latents = make_task("unet")
    with pytest.raises(ValueError, match=f"{field}='{value}' is not available"):
        train(task, latents, TrainConfig(steps=1, **{field: value}))


@pytest.mark.parametrize("optimizer", ["AdamW", "Adam", "SGD", "RMSprop"])
@pytest.mark.parametrize("loss", ["MSE", "L1", "Huber", "SmoothL1"])
def test_every_optimizer_and_loss_trains(optimizer, loss):
    task, latents = make_task("dit", count=2)
    result = train(task, latents, TrainConfig(steps=2, optimizer=optimizer, loss_function=loss))
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    assert any(v.abs().sum() > 0 for k, v in result.lora.items() if k.endswith("lora_up.weight"))


# -- first-batch errors ---------------------------------------------------------------------
def test_first_batch_shape_error_names_the_inputs():
    task, latents = make_task("unet")
    task.context = torch.randn(latents.shape[0], 6, 12)  # conditioning 12 wide, the net takes 16
    with pytest.raises(ValueError, match="could not run on the first batch .*shapes cannot be"):
        train(task, latents, TrainConfig(steps=1, batch_size=2, **FP32))


def test_internal_first_batch_error_is_not_blamed_on_the_inputs():
    """Weights created under inference mode fail in autograd: that is the caller's model
    state, not the latents or conditioning, so it is raised as it is."""
    with torch.inference_mode():
        task, latents = make_task("unet")
    latents, task.context = latents.clone(), task.context.clone()
    with pytest.raises(RuntimeError, match="Inference tensors") as raised:
        train(task, latents, TrainConfig(steps=1, batch_size=2, **FP32))
    assert not isinstance(raised.value, ValueError)
