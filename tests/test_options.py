"""Training options: schedules, clipping, EMA, LoRA+, rsLoRA, alpha, layer selection, and
their declarations (one place for defaults, ranges, widgets, metadata, README)."""

import math
import re

import pytest
import torch

from lora_lab.lora.inject import find_targets
from lora_lab.training import schedule
from lora_lab.training.config import TrainConfig
from lora_lab.training.ema import EMA
from lora_lab.training.loop import parameter_groups, train
from lora_lab.training.options import BY_NAME, DECLARED, OPTIONS_NODE, markdown_table
from tiny_tasks import make_task

FP32 = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)


# -- schedules ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_schedule_equals_its_formula(kind, warmup):
    steps, floor = 20, 0.1
    config = TrainConfig(steps=steps, lr_schedule=kind, warmup_steps=warmup, min_lr_ratio=floor)
    for step in range(1, steps + 1):
        if step <= warmup:
            expected = step / (warmup + 1)
        elif kind == "constant":
            expected = 1.0
        else:
            p = (step - warmup - 1) / (steps - warmup - 1)
            shape = 1 - p if kind == "linear" else (1 + math.cos(math.pi * p)) / 2
            expected = floor + (1 - floor) * shape
        assert schedule.factor(step, config) == pytest.approx(expected, abs=1e-12), step
    if kind != "constant":
        assert schedule.factor(steps, config) == pytest.approx(floor)  # ends at the floor
        assert schedule.factor(warmup + 1, config) == pytest.approx(1.0)  # peak after warm-up


def test_the_loop_uses_the_schedule():
    task, latents = make_task("unet", count=2)
    config = TrainConfig(steps=6, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.2,
                         learning_rate=1e-3, **FP32)
    rates = []
    train(task, latents, config, on_step=lambda r: rates.append(r.learning_rate))
    assert rates == pytest.approx([1e-3 * schedule.factor(s, config) for s in range(1, 7)])


# -- clipping, EMA, LoRA+ ----------------------------------------------------------------------
def test_clipping_bounds_the_update():
    """SGD without momentum or decay moves the adapters by lr x the (clipped) gradient."""
    task, latents = make_task("unet", count=2)
    seen = {}

    def record(report):
        seen[report.step] = torch.cat([p.detach().flatten().clone()
                                       for a in report.adapters.values() for p in a.parameters()])

    config = TrainConfig(steps=3, optimizer="SGD", learning_rate=1.0, weight_decay=0.0,
                         max_grad_norm=1e-3, **FP32)
    train(task, latents, config, on_step=record)
    for step in (2, 3):
        assert (seen[step] - seen[step - 1]).norm() <= 1e-3 * (1 + 1e-4)
    task, latents = make_task("unet", count=2)
    unclipped = {}
    train(task, latents, TrainConfig(steps=2, optimizer="SGD", learning_rate=1.0,
                                     weight_decay=0.0, **FP32),
          on_step=lambda r: unclipped.__setitem__(r.step, torch.cat(
              [p.detach().flatten().clone() for a in r.adapters.values() for p in a.parameters()])))
    assert (unclipped[2] - unclipped[1]).norm() > 1e-2  # the bound is the clipping, not the task


def test_ema_equals_its_closed_form():
    weights = [torch.tensor([float(t), 2.0 * t]) for t in range(6)]
    param = torch.nn.Parameter(weights[0].clone())
    ema = EMA([param], 0.9)
    for w in weights[1:]:
        param.data.copy_(w)
        ema.update()
    # shadow_n = d^n w_0 + sum_t (1 - d) d^(n - t) w_t
    n, d = len(weights) - 1, 0.9
    closed = d**n * weights[0] + sum((1 - d) * d**(n - t) * weights[t] for t in range(1, n + 1))
    ema.copy_to_params()
    assert torch.allclose(param.data, closed, atol=1e-6)


def test_training_returns_the_ema_of_the_steps():
    task, latents = make_task("unet", count=2)
    history = []
    config = TrainConfig(steps=4, ema_decay=0.5, learning_rate=1e-2, **FP32)
    result = train(task, latents, config, on_step=lambda r: history.append(
        {n: a.up.detach().clone() for n, a in r.adapters.items()}))
    name = next(iter(history[0]))
    expected = torch.zeros_like(history[0][name])  # up starts at zero
    for weights in history:
        expected = 0.5 * expected + 0.5 * weights[name]
    key = f"diffusion_model.{name}.lora_up.weight"
    assert torch.allclose(result.lora[key].float().flatten(1), expected.flatten(1), atol=1e-6)


def test_lora_plus_puts_up_factors_in_a_faster_group():
    task, _ = make_task("unet", count=2)
    from lora_lab.lora.inject import create_adapters

    adapters = create_adapters(task.network, "LoRA", 4, 1.0, torch.float32,
                               torch.Generator().manual_seed(0))
    config = TrainConfig(learning_rate=1e-3, lora_plus_ratio=16.0)
    slow, fast = parameter_groups(adapters.values(), config)
    assert slow["lr"] == 1e-3 and fast["lr"] == pytest.approx(16e-3)
    assert {id(p) for p in fast["params"]} == {id(a.up) for a in adapters.values()}
    assert {id(p) for p in slow["params"]} == {id(a.down) for a in adapters.values()}
    oft = create_adapters(task.network, "OFT", 4, 1.0, torch.float32, torch.Generator())
    with pytest.raises(ValueError, match="lora_plus_ratio=16 needs adapters with up"):
        parameter_groups(oft.values(), config)


# -- alpha, rsLoRA -------------------------------------------------------------------------------
def test_alpha_and_rslora_scale_the_saved_alpha():
    task, latents = make_task("unet", count=2)
    plain = train(task, latents, TrainConfig(steps=1, rank=4, **FP32))
    alphas = {float(v) for k, v in plain.lora.items() if k.endswith(".alpha")}
    assert alphas == {4.0}  # alpha 0 = the default: the rank for LoRA (scale 1)
    task, latents = make_task("unet", count=2)
    loha = train(task, latents, TrainConfig(steps=1, rank=4, algorithm="LoHa", **FP32))
    assert {float(v) for k, v in loha.lora.items() if k.endswith(".alpha")} == {1.0}
    task, latents = make_task("unet", count=2)
    rs = train(task, latents, TrainConfig(steps=1, rank=4, alpha=8.0, rslora=True, **FP32))
    for key, value in rs.lora.items():
        if key.endswith(".alpha"):
            rank = rs.lora[key[:-len("alpha")] + "lora_down.weight"].shape[0]
            # ComfyUI applies alpha_saved / rank = 8 / sqrt(rank)
            assert float(value) / rank == pytest.approx(8.0 / math.sqrt(rank))
    with pytest.raises(ValueError, match="rslora .* OFT scales otherwise"):
        task, latents = make_task("unet", count=2)
        train(task, latents, TrainConfig(steps=1, algorithm="OFT", rslora=True, **FP32))


# -- layer selection ---------------------------------------------------------------------------
def test_presets_and_patterns_select_layers():
    task, _ = make_task("unet")
    network = task.network
    linear = set(find_targets(network))
    every = set(find_targets(network, "all"))
    convs = {n for n, m in network.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert linear < every and convs <= every
    assert all(m.kernel_size == (1, 1) for n, m in network.named_modules() if n in linear & convs)
    attention = set(find_targets(network, "attention"))
    assert attention and all(re.search(r"attn", n) for n in attention)
    only = set(find_targets(network, "linear", include=r"to_q$"))
    assert only and all(n.endswith("to_q") for n in only)
    without = set(find_targets(network, "linear", exclude=r"to_q$"))
    assert without == linear - only


@pytest.mark.parametrize("field,pattern,match", [
    ("include", "no_such_layer", "include='no_such_layer' matches none of the"),
    ("exclude", "no_such_layer", "exclude='no_such_layer' matches none of the"),
    ("exclude", ".", "exclude='.' leaves no layer to train"),
])
def test_a_pattern_that_selects_nothing_names_real_layers(field, pattern, match):
    task, latents = make_task("unet", count=2)
    with pytest.raises(ValueError, match=match) as raised:
        train(task, latents, TrainConfig(steps=1, **{field: pattern}, **FP32))
    assert "e.g. " in str(raised.value)


@pytest.mark.parametrize("values,match", [
    (dict(include="(attn"), "include='\\(attn' is not a valid regular expression"),
    (dict(lr_schedule="exponential"), "lr_schedule='exponential' is not available"),
    (dict(ema_decay=1.0), "ema_decay=1.0 is out of range"),
    (dict(max_grad_norm=-1.0), "max_grad_norm=-1.0 is out of range"),
    (dict(rslora="yes"), "rslora='yes' must be true or false"),
    (dict(optimizer="Prodigy", lora_plus_ratio=4.0), "cannot be used with Prodigy"),
    (dict(optimizer="AdamWScheduleFree", ema_decay=0.9), "schedule-free already returns"),
])
def test_bad_option_values_are_value_errors(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**values)


def test_warm_up_longer_than_the_run_is_refused_by_the_run_not_the_options():
    """Training Options does not know the steps (Train LoRA's widget, a resumed run's earlier
    steps): a long warm-up is valid there, and refused by a run it does not fit."""
    TrainConfig(warmup_steps=25)  # what a Training Options node checks
    task, latents = make_task("unet", count=2)
    with pytest.raises(ValueError, match="warmup_steps=4 is not shorter than the run"):
        train(task, latents, TrainConfig(steps=4, warmup_steps=4, **FP32))


# -- one declaration ----------------------------------------------------------------------------
def test_every_option_is_declared_once_with_help_and_a_valid_default():
    names = [o.name for o in DECLARED]
    assert len(names) == len(set(names))
    defaults = TrainConfig()
    for option in DECLARED:
        assert option.help and getattr(defaults, option.name) == option.default
        option.check(option.default)
    table = markdown_table(OPTIONS_NODE)
    for option in DECLARED:
        assert (f"`{option.name}`" in table) == (option.node == OPTIONS_NODE)


def test_metadata_records_every_option_and_kohya_keys():
    from lora_lab.lora.io import lora_file_metadata
    from lora_lab.training.options import training_metadata

    config = TrainConfig(lr_schedule="cosine", warmup_steps=3, max_grad_norm=1.5, steps=10)
    meta = training_metadata(config, steps=10, algorithm="LoRA", rank=8, alpha=1.0,
                             batch_size=1, base_model="SD15", version="x")
    assert all(f"lora_lab.{o.name}" in meta for o in DECLARED)
    header = lora_file_metadata({"a.lora_down.weight": torch.zeros(8, 4)}, meta)
    assert header["ss_lr_scheduler"] == "cosine" and header["ss_lr_warmup_steps"] == "3"
    assert header["ss_max_grad_norm"] == "1.5" and header["ss_network_alpha"] == "1.0"
    assert BY_NAME["warmup_steps"].kohya == "ss_lr_warmup_steps"


def test_readme_table_is_the_declared_one():
    import pathlib

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert markdown_table(OPTIONS_NODE) in readme, \
        "paste `python -m lora_lab options-table` into README.md's Training Options section"
