"""The objective on real ComfyUI models: noise levels read from the model's own sampling (its
shift included), the objective options through the node, caption dropout with an
empty_conditioning input, and choices that do not fit a model refused by name."""

import importlib

import pytest
import torch

from test_options import make_options
from test_train_node import family_case, run_train


def _objective(pack, task, **options):
    objective = importlib.import_module(pack.__name__ + ".losses.objective")
    config = importlib.import_module(pack.__name__ + ".training.config")
    return objective.Objective(task, config.TrainConfig(**options))


@pytest.mark.parametrize("family,prediction", [("sd15", "eps"), ("sd3", "flow")])
def test_noise_levels_come_from_the_models_sampling(family, prediction, pack, comfy):
    bridge = importlib.import_module(pack.__name__ + ".nodes.bridge")
    model, latents, positive, _ = family_case(family)
    with torch.inference_mode(False):
        task = bridge.ComfyTask(bridge.training_clone(model), positive, latents, "fp32")
    table = model.model.model_sampling.sigmas.float().sort().values
    assert task.prediction == prediction
    objective = _objective(pack, task)
    sigmas = objective.sample_sigmas(20_000, torch.Generator().manual_seed(0))
    assert set(sigmas.unique().tolist()) <= set(table.tolist())
    median = float(table[len(table) // 2])
    assert float((sigmas > median).float().mean()) == pytest.approx(0.5, abs=0.02)
    if prediction == "flow":  # SD3's shift 3: three quarters of the draws above t = 0.5
        assert float(model.model.model_sampling.shift) == 3.0
        assert float((sigmas > 0.5).float().mean()) == pytest.approx(0.75, abs=0.02)
        shifted = _objective(pack, task, shift=1.0).sample_sigmas(
            20_000, torch.Generator().manual_seed(0))
        assert float((shifted > 0.5).float().mean()) == pytest.approx(0.5, abs=0.02)
        # a fraction t reads percent_to_sigma(1 - t) where the model has no table
        task.sigma_table = None
        no_table = _objective(pack, task)
        for t in (0.1, 0.5, 0.9):
            expect = float(model.model.model_sampling.percent_to_sigma(1 - t))
            assert float(no_table.sigmas_at(torch.tensor([t]))[0]) == pytest.approx(expect)


@pytest.mark.parametrize("family,options", [
    ("sd15", dict(loss_weighting="min_snr", timestep_sampling="logit_normal", stratified=True,
                  noise_offset=0.05)),
    ("sd3", dict(loss_weighting="cosmap", timestep_sampling="mode", shift=1.5)),
])
def test_objective_options_train_and_are_saved(family, options, train_node, options_node,
                                               comfy):
    model, latents, positive, _ = family_case(family)
    chosen = make_options(options_node, **options)
    _, lora, loss, _ = run_train(train_node, model, latents, positive, steps=3, options=chosen)
    _, plain, _, _ = run_train(train_node, model, latents, positive, steps=3)
    assert len(loss["loss"]) == 3 and all(torch.isfinite(torch.tensor(loss["loss"])))
    assert any(not torch.equal(lora[k], plain[k]) for k in plain)
    for name, value in options.items():
        assert lora.metadata[f"lora_lab.{name}"] == str(value)


def test_caption_dropout_trains_with_the_empty_conditioning(train_node, options_node, comfy):
    model, latents, positive, _ = family_case("sd15")
    empty = [[torch.zeros_like(positive[0][0]), {}]]
    dropout = make_options(options_node, caption_dropout=1.0)
    with pytest.raises(ValueError, match="caption_dropout=1 needs the conditioning of an empty"):
        run_train(train_node, model, latents, positive, steps=2, options=dropout)
    # every sample dropped: the prompt cannot matter any more
    _, a, loss_a, _ = run_train(train_node, model, latents, positive, steps=2, options=dropout,
                                empty_conditioning=empty)
    other = [[torch.randn_like(positive[0][0]), {}]]
    _, b, loss_b, _ = run_train(train_node, model, latents, other, steps=2, options=dropout,
                                empty_conditioning=empty)
    assert loss_a == loss_b and all(torch.equal(a[k], b[k]) for k in a)
    _, c, _, _ = run_train(train_node, model, latents, positive, steps=2,
                           empty_conditioning=empty)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="empty_conditioning from its text encoder"):
        run_train(train_node, model, latents, positive, steps=2, options=dropout,
                  empty_conditioning=[[torch.zeros(1, 77, 5), {}]])


@pytest.mark.parametrize("family,options,match", [
    ("sd15", dict(loss_weighting="cosmap"), "loss_weighting='cosmap' is defined for flow"),
    ("sd15", dict(shift=3.0), "shift=3 applies to flow models; this model is eps"),
    ("sd3", dict(noise_offset=0.1), "noise_offset=0.1 applies to eps and v models"),
])
def test_choices_that_do_not_fit_the_model_are_refused(family, options, match, train_node,
                                                       options_node, comfy):
    model, latents, positive, _ = family_case(family)
    with pytest.raises(ValueError, match=match):
        run_train(train_node, model, latents, positive, steps=1,
                  options=make_options(options_node, **options))


@pytest.mark.parametrize("family,prediction", [("sd15", "eps"), ("sd3", "flow")])
def test_the_defaults_used_are_written_into_the_saved_metadata(family, prediction, pack,
                                                               train_node, comfy):
    objective = importlib.import_module(pack.__name__ + ".losses.objective")
    options = importlib.import_module(pack.__name__ + ".training.options")
    model, latents, positive, _ = family_case(family)
    _, lora, _, _ = run_train(train_node, model, latents, positive, steps=1)
    for name, by_kind in objective.AUTO_CHOICES.items():
        used = lora.metadata[f"lora_lab.{name}"]
        assert used == by_kind[prediction] != "auto", name
    assert lora.metadata["lora_lab.alpha"] == "4.0"  # rank 4: alpha = rank, as used
    for option in options.DECLARED:  # every other option: its declared default
        if option.name not in (*objective.AUTO_CHOICES, "alpha") \
                and option.node == options.OPTIONS_NODE:
            assert lora.metadata[f"lora_lab.{option.name}"] == str(option.default), option.name
