"""The optimizer registry: every optimizer trains, takes param groups and weight decay, and a
missing package is an error that says what to install; schedule-free returns its eval weights."""

import inspect
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_lab.optimizers import OPTIMIZERS, make_optimizer, set_training
from lora_lab.training.config import TrainConfig
from lora_lab.training.loop import evaluate, train
from tiny_tasks import make_task

FP32 = dict(training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)
THIRD_PARTY = [(name, f.module, f.package) for name, f in OPTIMIZERS.items() if f.package]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)),
            torch.nn.Parameter(torch.randn(3, generator=g))]


def _step(optimizer, params):
    """One step on a fixed quadratic, so every parameter has a gradient."""
    optimizer.zero_grad()
    sum(((p - 1.0) ** 2).sum() for p in params).backward()
    optimizer.step()


def test_registry_lists_the_optimizers_in_order():
    assert list(OPTIMIZERS) == [
        "AdamW", "Adam", "SGD", "RMSprop", "Prodigy", "AdamWScheduleFree", "Adafactor", "Lion"]


# -- training -------------------------------------------------------------------------------
# (optimizer, learning rate, steps): each at a rate usual for it. Prodigy's lr multiplies the
# step size it estimates (usually 1.0); its safeguarded estimate grows over ~100 steps.
LEARNS = [("Prodigy", 1.0, 120), ("AdamWScheduleFree", 1e-2, 40), ("Adafactor", 1.0, 40),
          ("Lion", 3e-3, 40)]


@pytest.mark.parametrize("optimizer,lr,steps", LEARNS)
def test_new_optimizer_lowers_the_loss_of_a_fixed_task(optimizer, lr, steps):
    task, latents = make_task("dit", count=2)
    config = TrainConfig(steps=steps, batch_size=2, learning_rate=lr, alpha=8.0,
                         optimizer=optimizer, **FP32)
    before = evaluate(task, latents, config)
    result = train(task, latents, config)
    after = evaluate(task, latents, config, result.adapters)
    assert after < 0.9 * before, (before, after)
    assert len(result.losses) == steps and all(math.isfinite(v) for v in result.losses)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_every_optimizer_trains_with_the_default_dtypes(optimizer):
    task, latents = make_task("dit", count=2)
    result = train(task, latents, TrainConfig(steps=2, optimizer=optimizer))
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    ups = [v for k, v in result.lora.items() if k.endswith("lora_up.weight")]
    assert ups and any(v.abs().sum() > 0 for v in ups)


# -- schedule-free ----------------------------------------------------------------------------
def test_schedule_free_steps_at_y_and_set_training_false_gives_the_eval_weights():
    """Schedule-free keeps z and x; it steps at y = (1 - beta1) z + beta1 x (train mode) and
    eval mode writes x = (y - (1 - beta1) z) / beta1 into the parameters."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 8, generator=g)
    targets = inputs @ torch.randn(8, 3, generator=g) + torch.randn(3, generator=g)
    weight, bias = torch.nn.Parameter(torch.zeros(8, 3)), torch.nn.Parameter(torch.zeros(3))
    params = [weight, bias]

    def loss():
        with torch.no_grad():
            return float(((inputs @ weight + bias - targets) ** 2).mean())

    optimizer = make_optimizer("AdamWScheduleFree", params, 0.05)
    set_training(optimizer, True)
    start = loss()
    for _ in range(100):
        optimizer.zero_grad()
        ((inputs @ weight + bias - targets) ** 2).mean().backward()
        optimizer.step()
    y = [p.detach().clone() for p in params]
    z = [optimizer.state[p]["z"].clone() for p in params]
    beta1 = optimizer.param_groups[0]["betas"][0]

    set_training(optimizer, False)
    for p, y_p, z_p in zip(params, y, z):
        assert torch.allclose(p, (y_p - (1 - beta1) * z_p) / beta1, atol=1e-5)
        assert not torch.allclose(p, y_p)
    x = [p.detach().clone() for p in params]
    assert loss() < 0.1 * start, (start, loss())
    set_training(optimizer, False)  # already in eval mode: nothing moves
    assert all(torch.equal(p, x_p) for p, x_p in zip(params, x))
    set_training(optimizer, True)  # back to y, to go on training
    assert all(torch.allclose(p, y_p, atol=1e-5) for p, y_p in zip(params, y))


def test_schedule_free_is_returned_ready_to_step():
    params = _params()
    _step(make_optimizer("AdamWScheduleFree", params, 0.01), params)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "AdamWScheduleFree"])
def test_set_training_is_a_no_op_without_modes(name):
    params = _params()
    optimizer = make_optimizer(name, params, 0.01)
    _step(optimizer, params)
    before = [p.detach().clone() for p in params]
    set_training(optimizer, False)
    set_training(optimizer, True)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


# -- param groups and weight decay --------------------------------------------------------------
def _fused_available(cls):
    try:
        cls([torch.nn.Parameter(torch.zeros(2))], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


ONE_LR = [name for name, factory in OPTIMIZERS.items() if factory.one_lr]


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n not in ONE_LR])
def test_param_groups_keep_their_learning_rates(name):
    down, up, rest = _params(0), _params(1), _params(2)
    groups = [{"params": down, "lr": 0.01}, {"params": up, "lr": 0.04}, {"params": rest}]
    keys = [sorted(group) for group in groups]
    optimizer = make_optimizer(name, groups, 0.02)
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, 0.04, 0.02]
    assert [sorted(group) for group in groups] == keys, "the caller's group dicts were changed"
    before = [p.detach().clone() for p in down + up + rest]
    _step(optimizer, down + up + rest)
    assert all(not torch.equal(p, b) for p, b in zip(down + up + rest, before)), name
    if name in ("Adam", "AdamW"):
        fused = _fused_available(OPTIMIZERS[name].load())
        assert all(bool(group.get("fused")) == fused for group in optimizer.param_groups)


def test_prodigy_takes_groups_of_one_learning_rate_and_refuses_lora_plus():
    """prodigyopt estimates one step size: groups may differ only by lr 0 (frozen)."""
    assert ONE_LR == ["Prodigy"]
    a, b, frozen = _params(0), _params(1), _params(2)
    groups = [{"params": a, "lr": 1.0}, {"params": b}, {"params": frozen, "lr": 0.0}]
    optimizer = make_optimizer("Prodigy", groups, 1.0)
    assert [group["lr"] for group in optimizer.param_groups] == [1.0, 1.0, 0.0]
    before = [p.detach().clone() for p in a + b + frozen]
    _step(optimizer, a + b + frozen)
    moved = [not torch.equal(p, q) for p, q in zip(a + b + frozen, before)]
    assert moved == [True] * 4 + [False] * 2
    with pytest.raises(ValueError, match=r"'Prodigy' takes one learning rate.*1, 4.*lora_plus"):
        make_optimizer("Prodigy", [{"params": a}, {"params": b, "lr": 4.0}], 1.0)


def test_params_may_be_a_generator_and_mixing_kinds_is_an_error():
    params = _params()
    optimizer = make_optimizer("AdamW", (p for p in params), 0.01)
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], params, strict=True))
    with pytest.raises(ValueError, match="all parameters or all param-group dicts"):
        make_optimizer("AdamW", [params[0], {"params": [params[1]]}], 0.01)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_weight_decay_is_passed_on_and_none_keeps_the_default(name):
    cls = OPTIMIZERS[name].load()
    signature = inspect.signature(cls.__init__).parameters
    if "weight_decay" not in signature:
        pytest.skip(f"{name} has no weight decay")
    groups = [{"params": _params(0)}, {"params": _params(1)}]
    optimizer = make_optimizer(name, groups, 0.01, weight_decay=0.125)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.125, 0.125]
    default = make_optimizer(name, _params(), 0.01)
    assert default.param_groups[0]["weight_decay"] == signature["weight_decay"].default


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,module,package", THIRD_PARTY)
def test_missing_package_is_a_value_error_that_says_what_to_install(
        monkeypatch, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # the import now fails
    with pytest.raises(ValueError) as raised:
        make_optimizer(name, _params(), 0.01)
    message = str(raised.value)
    assert repr(name) in message and f"pip install {package}" in message
    assert "requirements.txt" in message


def test_adafactor_on_an_older_torch_names_the_version_needed(monkeypatch):
    monkeypatch.delattr(torch.optim, "Adafactor")
    with pytest.raises(ValueError, match=r"'Adafactor' needs torch >= 2\.5") as raised:
        make_optimizer("Adafactor", _params(), 0.01)
    assert torch.__version__ in str(raised.value)


def test_unknown_optimizer_is_a_value_error():
    with pytest.raises(ValueError, match="optimizer='Nadam9' is not available; choose one of "):
        make_optimizer("Nadam9", _params(), 0.01)


def test_the_pack_imports_without_the_optional_packages():
    """Their imports are lazy: with them blocked, the pack (loop included) still imports,
    torch's optimizers are still built, and only building a missing one fails."""
    blocked = [module for _, module, _ in THIRD_PARTY]
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        "import torch\n"
        "import lora_lab.training.loop\n"
        "from lora_lab.optimizers import OPTIMIZERS, make_optimizer\n"
        "p = [torch.nn.Parameter(torch.zeros(2))]\n"
        "make_optimizer('AdamW', p, 0.1); make_optimizer('Adafactor', p, 0.1)\n"
        f"for name in {[n for n, _, _ in THIRD_PARTY]!r}:\n"
        "    try:\n"
        "        make_optimizer(name, p, 0.1)\n"
        "    except ValueError as error:\n"
        "        print(name, '|', error)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split(" | ")[0] for line in lines] == [name for name, _, _ in THIRD_PARTY]
    for line, (_, _, package) in zip(lines, THIRD_PARTY):
        assert f"pip install {package}" in line, line


def test_requirements_txt_lists_the_optimizer_packages_and_pyproject_agrees():
    """requirements.txt (what ComfyUI-Manager installs) = pyproject's dependencies less what
    ComfyUI ships itself."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]

    def names(lines):
        return {re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower() for line in lines}

    lines = [line.split("#")[0] for line in (root / "requirements.txt").read_text().splitlines()]
    required = names(line for line in lines if line.strip())
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = names(project["dependencies"])
    comfyui_ships = {"torch", "safetensors", "numpy", "tqdm"}
    assert not required & comfyui_ships and "torch" in declared
    assert required == declared - comfyui_ships
    assert {package for _, _, package in THIRD_PARTY} <= required
