"""The objective (losses/objective.py): timestep densities, stratification, weightings against
their reference formulas, noise offset and caption dropout drawn from the run's generator."""

import math

import pytest
import torch

from lora_lab.losses import TARGETS, add_noise, per_sample_loss
from lora_lab.losses.objective import (
    AUTO_CHOICES, LOSS_WEIGHTINGS, Objective, cosmap_weight, flow_shift, logit_normal, loss_weight, mode,
)
from lora_lab.losses.targets import denoised
from lora_lab.training.config import TrainConfig
from lora_lab.training.loop import train
from lora_lab.training.task import discrete_vp_sigmas, flow_sigmas
from tiny_tasks import make_task

FP32 = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)
DRAWS = 200_000
EDGES = torch.linspace(0, 1, 21, dtype=torch.float64)


class Facts:
    """Model facts of a tabulated model (no network)."""

    def __init__(self, prediction, table):
        self.prediction, self.sigma_table = prediction, table
        self.can_drop_captions = False

    def add_noise(self, x0, noise, sigma):
        return add_noise(self.prediction, x0, noise, sigma)


def histogram(t: torch.Tensor) -> torch.Tensor:
    return torch.histogram(t.double(), bins=EDGES)[0] / len(t)


def assert_matches(t: torch.Tensor, cdf) -> None:
    """Bin frequencies of ``t`` within 4 binomial standard deviations of the CDF's mass."""
    mass = torch.tensor([cdf(float(b)) - cdf(float(a)) for a, b in zip(EDGES[:-1], EDGES[1:])])
    spread = (mass * (1 - mass) / len(t)).sqrt()
    assert (histogram(t) - mass).abs().le(4 * spread + 1e-9).all(), (histogram(t), mass)


def draw_u(seed=0):
    return torch.rand(DRAWS, generator=torch.Generator().manual_seed(seed))


# -- densities --------------------------------------------------------------------------------
def test_uniform_is_uniform():
    objective = Objective(Facts("flow", None), TrainConfig(shift=1.0))
    t = objective.fractions(DRAWS, torch.Generator().manual_seed(0))
    assert_matches(t, lambda x: x)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.7), (1.0, 1.5)])
def test_logit_normal_has_its_density(mean, std):
    """P(t <= x) = Phi((logit(x) - m) / s) for t = sigmoid(m + s n) (SD3 paper eq. 19)."""
    t = logit_normal(draw_u(), mean, std)

    def cdf(x):
        if x <= 0 or x >= 1:
            return float(x >= 1)
        return 0.5 * (1 + math.erf((math.log(x / (1 - x)) - mean) / (std * math.sqrt(2))))

    assert_matches(t, cdf)


def _f_mode(u, s):  # SD3 paper eq. 20, written out independently
    return 1 - u - s * (math.cos(math.pi / 2 * u) ** 2 - 1 + u)


@pytest.mark.parametrize("scale", [1.29, 0.0, -0.5])
def test_mode_has_its_density(scale):
    """f_mode decreases from 1 to 0, so P(t <= x) = 1 - f_mode^-1(x) (found by bisection)."""
    t = mode(draw_u(1), scale)

    def cdf(x):
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if _f_mode(mid, scale) > x else (low, mid)
        return 1 - low

    assert_matches(t, cdf)


def test_stratified_draws_cover_every_stratum_and_keep_the_density():
    for count in (1, 4, 7, 16):
        objective = Objective(Facts("flow", None), TrainConfig(shift=1.0, stratified=True))
        t = objective.fractions(count, torch.Generator().manual_seed(count))
        strata = (t * count).floor().long().sort().values
        assert strata.tolist() == list(range(count))
    # logit-normal over stratified uniforms: still its density, over many steps
    config = TrainConfig(shift=1.0, stratified=True, timestep_sampling="logit_normal")
    objective, g = Objective(Facts("flow", None), config), torch.Generator().manual_seed(3)
    t = torch.cat([objective.fractions(8, g) for _ in range(DRAWS // 8)])
    assert_matches(t, lambda x: 0.5 * (1 + math.erf(math.log(x / (1 - x)) / math.sqrt(2)))
                   if 0 < x < 1 else float(x >= 1))


def test_noise_levels_are_the_models_own_unless_shift_overrides():
    table = flow_sigmas(shift=3.0)
    objective = Objective(Facts("flow", table), TrainConfig())
    sigmas = objective.sample_sigmas(DRAWS, torch.Generator().manual_seed(0))
    assert set(sigmas.unique().tolist()) <= set(table.tolist())
    # uniform over the table's entries, so the model's shift 3 favours high noise
    assert_matches(sigmas, lambda x: float((table <= x).double().mean()))
    assert float((sigmas > 0.5).double().mean()) == pytest.approx(0.75, abs=0.01)
    shifted = Objective(Facts("flow", table), TrainConfig(shift=1.0))
    assert float((shifted.sample_sigmas(DRAWS, torch.Generator()) > 0.5).double().mean()) \
        == pytest.approx(0.5, abs=0.01)
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(flow_shift(t, 3.0), 3 * t / (1 + 2 * t))
    # eps table: the lowest fractions give the lowest sigmas
    eps = Objective(Facts("eps", discrete_vp_sigmas()), TrainConfig())
    low, high = eps.sigmas_at(torch.tensor([0.0, 0.999]))
    assert low == discrete_vp_sigmas().min() and high == discrete_vp_sigmas().max()


# -- weightings ---------------------------------------------------------------------------------
SIGMAS = {"eps": torch.tensor([0.03, 0.3, 1.0, 3.0, 14.6]),
          "v": torch.tensor([0.03, 0.3, 1.0, 3.0, 14.6]),
          "flow": torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99])}


def _residual_losses(kind, weighting, gamma=5.0):
    """Native loss x weight, and the x0 loss, for the same random predictions."""
    g = torch.Generator().manual_seed(5)
    sigma = SIGMAS[kind]
    x0, noise, out = (torch.randn(5, 4, 3, 3, generator=g) for _ in range(3))
    x_t = add_noise(kind, x0, noise, sigma)
    native = per_sample_loss("MSE", out, TARGETS[kind](x0, noise, sigma))
    x0_loss = per_sample_loss("MSE", denoised(kind, sigma, out, x_t), x0)
    return native * loss_weight(weighting, kind, sigma, gamma), x0_loss


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_x0_weighting_is_the_loss_on_the_denoised_latent(kind):
    weighted, x0_loss = _residual_losses(kind, "x0")
    assert torch.allclose(weighted, x0_loss, rtol=1e-4)


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_min_snr_is_the_x0_loss_times_min_snr_gamma(kind):
    """Hang et al. 2023: weight the x0 loss by min(SNR, gamma)."""
    sigma = SIGMAS[kind].double()
    snr = ((1 - sigma) / sigma) ** 2 if kind == "flow" else 1 / sigma**2
    weighted, x0_loss = _residual_losses(kind, "min_snr", gamma=5.0)
    assert torch.allclose(weighted, x0_loss * snr.clamp(max=5.0).float(), rtol=1e-4)


def test_min_snr_equals_the_peer_formulas():
    """peer_trainers (c.4): eps min(SNR, g) / SNR; v min(SNR, g) / (SNR + 1)."""
    sigma = SIGMAS["eps"].double()
    snr = 1 / sigma**2
    for gamma in (1.0, 5.0):
        assert torch.allclose(loss_weight("min_snr", "eps", sigma, gamma).double(),
                              snr.clamp(max=gamma) / snr, rtol=1e-6)
        assert torch.allclose(loss_weight("min_snr", "v", sigma, gamma).double(),
                              snr.clamp(max=gamma) / (snr + 1), rtol=1e-6)


def test_sd3_weightings_equal_their_formulas():
    t = SIGMAS["flow"].double()
    assert torch.allclose(loss_weight("sigma_sqrt", "flow", t).double(), t**-2, rtol=1e-6)
    assert torch.allclose(loss_weight("cosmap", "flow", t).double(),
                          2 / (math.pi * (1 - 2 * t + 2 * t**2)), rtol=1e-6)
    # the CosMap weight is the density of t = 1 - 1 / (tan(pi u / 2) + 1), u ~ U(0, 1)
    u = draw_u(2).double()
    mapped = 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
    mass = torch.tensor([float(torch.trapezoid(
        cosmap_weight(torch.linspace(float(a), float(b), 201, dtype=torch.float64)),
        torch.linspace(float(a), float(b), 201, dtype=torch.float64)))
        for a, b in zip(EDGES[:-1], EDGES[1:])])
    assert torch.allclose(histogram(mapped), mass.double(), atol=4e-3)
    assert loss_weight("none", "eps", t).eq(1).all()
    assert set(LOSS_WEIGHTINGS) == {"auto", "none", "min_snr", "x0", "sigma_sqrt", "cosmap"}


# -- choices that do not fit the model ----------------------------------------------------------
@pytest.mark.parametrize("kind,options,match", [
    ("unet", dict(loss_weighting="cosmap"), "loss_weighting='cosmap' is defined for flow"),
    ("unet_v", dict(loss_weighting="sigma_sqrt"), "defined for flow"),
    ("unet", dict(shift=3.0), r"shift=3 applies to flow models; this model is eps"),
    ("dit", dict(noise_offset=0.1), r"noise_offset=0.1 applies to eps and v"),
    ("unet", dict(caption_dropout=0.2), "caption_dropout=0.2 needs the conditioning of an empty"),
])
def test_choices_that_do_not_fit_the_model_are_value_errors(kind, options, match):
    task, latents = make_task(kind)
    with pytest.raises(ValueError, match=match):
        train(task, latents, TrainConfig(steps=1, **FP32, **options))


# -- draws from the run's generator -----------------------------------------------------------
def test_noise_offset_is_a_per_channel_constant_from_the_runs_generator():
    task, _ = make_task("unet")
    plain = Objective(task, TrainConfig()).draw(torch.Size([3, 4, 8, 8]),
                                                torch.Generator().manual_seed(7))
    offset = Objective(task, TrainConfig(noise_offset=0.1)).draw(
        torch.Size([3, 4, 8, 8]), torch.Generator().manual_seed(7))
    assert torch.equal(plain.sigmas, offset.sigmas)
    difference = offset.noise - plain.noise
    assert difference.abs().gt(0).all()
    assert torch.allclose(difference, difference[..., :1, :1].expand_as(difference), atol=1e-6)
    assert 0.01 < float(difference[:, :, 0, 0].std()) < 0.3  # 0.1 x N(0, 1) per channel


def test_caption_dropout_drops_its_share_and_trains_with_the_empty_conditioning():
    task, latents = make_task("unet")
    empty = torch.zeros(task.context.shape[1:])
    task.empty_context, task.can_drop_captions = empty, True
    drawn = Objective(task, TrainConfig(caption_dropout=0.3), can_drop_captions=True).draw(
        torch.Size([20_000, 1]), torch.Generator().manual_seed(0))
    assert float(drawn.dropped.float().mean()) == pytest.approx(0.3, abs=0.01)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([1.0, 2.0])
    with torch.no_grad():
        mixed = task.predict(x, sigma, torch.tensor([0, 1]), torch.tensor([True, False]))
        x_in, timestep = task.model_input(x, sigma)
        expect = task.network(x_in, timestep, torch.stack([empty, task.context[1]]))
    assert torch.allclose(mixed, expect, atol=1e-6)


@pytest.mark.parametrize("options", [dict(noise_offset=0.1), dict(caption_dropout=0.5),
                                     dict(timestep_sampling="logit_normal", stratified=True)])
def test_same_seed_same_lora_and_the_global_rng_untouched(options):
    runs = []
    for seed in (3, 3, 4):
        task, latents = make_task("unet")
        task.empty_context, task.can_drop_captions = torch.zeros(task.context.shape[1:]), True
        state = torch.get_rng_state()
        result = train(task, latents, TrainConfig(steps=3, seed=seed, batch_size=2, **FP32,
                                                  **options))
        assert torch.equal(torch.get_rng_state(), state)
        runs.append(result.lora)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_options_change_what_is_trained():
    """Each objective option changes the LoRA of an otherwise identical run."""
    def lora(**options):
        task, latents = make_task("unet")
        task.empty_context, task.can_drop_captions = torch.zeros(task.context.shape[1:]), True
        return train(task, latents, TrainConfig(steps=2, seed=1, batch_size=4, **FP32,
                                                **options)).lora

    base = lora()
    for options in (dict(loss_weighting="min_snr", min_snr_gamma=0.5),
                    dict(loss_weighting="none"),
                    dict(timestep_sampling="mode"), dict(noise_offset=0.1),
                    dict(caption_dropout=0.9)):
        other = lora(**options)
        assert any(not torch.allclose(base[k], other[k]) for k in base), options


@pytest.mark.parametrize("kind,prediction", [("unet", "eps"), ("unet_v", "v"), ("dit", "flow")])
def test_auto_resolves_per_prediction_and_the_result_says_what_was_used(kind, prediction):
    task, latents = make_task(kind)
    result = train(task, latents, TrainConfig(steps=1, **FP32))
    chosen = {}
    for name, by_kind in AUTO_CHOICES.items():
        assert getattr(TrainConfig(), name) == "auto"
        chosen[name] = getattr(result.config, name)
        assert chosen[name] == by_kind[prediction] != "auto"
    explicit = train(task, latents, TrainConfig(steps=1, **FP32, **chosen))
    assert all(torch.equal(result.lora[k], explicit.lora[k]) for k in result.lora)
