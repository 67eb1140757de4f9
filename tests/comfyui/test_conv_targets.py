"""Adapters on every conv layer, 3x3 included (kohya's LoCon; ``target_layers=all``), and
norm/bias deltas (``train_norm_bias``: ``diff`` / ``diff_b`` keys) in real ComfyUI.

For each algorithm the adapters get random nonzero weights, their saved keys are applied
by ComfyUI's core loader (``comfy.sd.load_lora_for_models``), and the merged model must
reproduce the training forward (the adapters' bypass patches) within ``TOL`` of the output
scale in fp32, with no "lora key not loaded" (or shape mismatch / error) log line. The
file must also continue: the rebuilt adapters save exactly the keys they were read from.
"""

import inspect

import pytest
import torch

from test_algorithms import ALGORITHMS, TOL, Warnings, sub
from test_train_node import FAMILIES, family_case, model_output

PREFIX = "diffusion_model."
EFFECT_TOL = 1e-4  # of the largest change the adapters make to the output
REPORT = {}  # (family, algorithm) -> (difference / output scale, difference / change)


def not_loaded(log):
    bad = ("not loaded", "error", "mismatch", "failed", "not recognized")
    return [r for r in log.records if any(word in r.lower() for word in bad)]


def layers(pack, network, convs_only):
    """Every layer ``layer_geometry`` accepts (Linear and ConvNd of any kernel), by path."""
    layer_geometry = sub(pack, "lora.base").layer_geometry
    out = {}
    for name, module in network.named_modules():
        geometry = layer_geometry(module)
        if geometry is not None and (geometry.is_conv or not convs_only):
            out[name] = (module, geometry)
    return out


def make_adapters(pack, network, algorithm, targets, monkeypatch, rank=4, alpha=2.0):
    """``create_adapters`` on an explicit target dict (its ``targets=`` keyword where it has
    one, else with ``find_targets`` swapped for the dict)."""
    inject = sub(pack, "lora.inject")
    generator = torch.Generator().manual_seed(0)
    if "targets" in inspect.signature(inject.create_adapters).parameters:
        return inject.create_adapters(network, algorithm, rank, alpha, torch.float32, generator,
                                      targets=targets)
    monkeypatch.setattr(inject, "find_targets", lambda *args, **kwargs: targets)
    return inject.create_adapters(network, algorithm, rank, alpha, torch.float32, generator)


def perturb(modules, std=0.05, seed=7):
    """Move every parameter off its init, as training would (DoRA's magnitude by a factor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                noise = torch.randn(p.shape, generator=g) * std
                p.mul_(1 + noise) if name == "magnitude" else p.add_(noise)


def core_load(model, lora):
    """ComfyUI's core loader on a state dict; the patched ModelPatcher and the log lines."""
    import comfy.sd

    with Warnings() as log:
        loaded = comfy.sd.load_lora_for_models(model, None, dict(lora), 1.0, 0.0)[0]
    return loaded, log


def bypass_output(pack, model, patches, probe, positive):
    inject = sub(pack, "lora.inject")
    model_output(model, probe, positive)  # base weights loaded and unpatched
    with inject.ForwardPatches(patches):
        return model_output(model, probe, positive)


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_conv_layer_loads_in_core(family, algorithm, pack, comfy, monkeypatch):
    inject, io = sub(pack, "lora.inject"), sub(pack, "lora.io")
    model, _, positive, probe = family_case(family)
    base = model_output(model, probe, positive)
    network = model.model.diffusion_model
    targets = layers(pack, network, convs_only=True)
    kxk = [n for n, (_, g) in targets.items() if any(k != 1 for k in g.kernel_size)]
    assert kxk, "the model has no kxk conv"

    adapters = make_adapters(pack, network, algorithm, targets, monkeypatch)
    assert set(adapters) == set(targets), set(targets) - set(adapters)
    perturb(adapters.values())
    lora = inject.lora_state_dict(adapters, PREFIX)
    bypass = bypass_output(pack, model, inject.adapter_patches(network, adapters), probe, positive)
    scale = bypass.abs().max()
    assert (bypass - base).abs().max() > 1e-3 * scale, "the adapters change nothing"

    weights = {n: m.weight.detach().clone() for n, (m, _) in targets.items()}
    loaded, log = core_load(model, lora)
    assert not not_loaded(log), log.records
    assert {f"{PREFIX}{n}.weight" for n in targets} <= set(loaded.patches)
    merged = model_output(loaded, probe, positive)
    diff = float((merged - bypass).abs().max() / scale)
    effect = float((merged - bypass).abs().max() / (bypass - base).abs().max())
    REPORT[(family, algorithm)] = (diff, effect)
    assert diff <= TOL, f"{algorithm}: ComfyUI's merge differs from the training forward by {diff:.2e}"
    assert effect <= EFFECT_TOL, f"{algorithm}: {effect:.2e} of what the adapters change"
    # layer by layer: the weight ComfyUI merged (still in the shared model) == the adapter's
    for name in kxk:
        want = adapters[name].merged_weight(weights[name])
        got = network.get_submodule(name).weight
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name

    # continuing the file: the same adapters, the same keys, the same forward
    model_output(model, probe, positive)  # unpatch the shared weights before copying them
    rebuilt = io.adapters_from_state_dict(network, lora, PREFIX, torch.float32)
    assert set(rebuilt) == set(adapters)
    assert same_state(inject.lora_state_dict(rebuilt, PREFIX), lora)
    again = bypass_output(pack, model, inject.adapter_patches(network, rebuilt), probe, positive)
    assert torch.equal(again, bypass)


def core_trainer_keys(model):
    """The ``diff`` / ``diff_b`` keys ComfyUI's own trainer makes (comfy_extras/nodes_train.py:
    every module with ``weight_function``; a 1-D weight -> ``diff``, a bias -> ``diff_b``),
    restricted to the diffusion model."""
    keys = set()
    for name, module in model.model.named_modules():
        if not name.startswith("diffusion_model.") or not hasattr(module, "weight_function"):
            continue
        if module.weight is not None and module.weight.ndim < 2:
            keys.add(f"{name}.diff")
        if getattr(module, "bias", None) is not None:
            keys.add(f"{name}.diff_b")
    return keys


# WAN 2.1: ComfyUI's ops.RMSNorm (the q/k norms) next to a LayerNorm with weights
NORM_FAMILIES = list(FAMILIES) + ["wan21_t2v"]


def norm_case(family):
    """The model, conditioning and probe latent of ``family`` (tiny_families beyond SD1.x/SD3)."""
    if family in FAMILIES:
        model, _, positive, probe = family_case(family)
        return model, positive, probe
    import tiny_families

    spec = tiny_families.FAMILIES[family]
    reason = spec.available()
    if reason is not None:
        pytest.skip(reason)
    with torch.inference_mode():  # as ComfyUI's loaders run
        model = spec.build(seed=1)
    probe = torch.randn(spec.latent_shape, generator=torch.Generator().manual_seed(5))
    return model, spec.cond(seed=3), probe


@pytest.mark.parametrize("family", NORM_FAMILIES)
def test_norm_and_bias_deltas_load_in_core(family, pack, comfy, monkeypatch):
    inject, io, diff = sub(pack, "lora.inject"), sub(pack, "lora.io"), sub(pack, "lora.diff")
    model, positive, probe = norm_case(family)
    base = model_output(model, probe, positive)
    network = model.model.diffusion_model

    adapters = make_adapters(pack, network, "LoRA", layers(pack, network, convs_only=False),
                             monkeypatch)
    deltas = diff.create_norm_deltas(network, torch.float32)
    perturb(list(adapters.values()) + list(deltas.values()))
    delta_keys = inject.lora_state_dict(deltas, PREFIX)
    assert set(delta_keys) == core_trainer_keys(model)
    kinds = {type(network.get_submodule(n)).__name__ for n in deltas}
    expected_kinds = {"sd15": {"GroupNorm", "LayerNorm"}, "wan21_t2v": {"RMSNorm", "LayerNorm"}}
    assert expected_kinds.get(family, set()) <= kinds, kinds
    if family in expected_kinds:
        assert any(k.endswith(".diff") for k in delta_keys)
    assert any(k.endswith(".diff_b") for k in delta_keys)
    lora = {**inject.lora_state_dict(adapters, PREFIX), **delta_keys}

    patches = inject.adapter_patches(network, adapters) + inject.adapter_patches(network, deltas)
    bypass = bypass_output(pack, model, patches, probe, positive)
    lora_only = bypass_output(pack, model, inject.adapter_patches(network, adapters), probe, positive)
    scale = bypass.abs().max()
    assert (bypass - lora_only).abs().max() > 1e-3 * scale, "the deltas change nothing"
    assert (bypass - base).abs().max() > 1e-3 * scale

    originals = {f"{n}.{attr}": getattr(network.get_submodule(n), attr).detach().clone()
                 for n in deltas for attr in ("weight", "bias")
                 if getattr(network.get_submodule(n), attr, None) is not None}
    loaded, log = core_load(model, lora)
    assert not not_loaded(log), log.records
    patched = set(loaded.patches)
    assert {k[:-len(".diff")] + ".weight" for k in delta_keys if k.endswith(".diff")} <= patched
    assert {k[:-len(".diff_b")] + ".bias" for k in delta_keys if k.endswith(".diff_b")} <= patched
    merged = model_output(loaded, probe, positive)
    difference = float((merged - bypass).abs().max() / scale)
    effect = float((merged - bypass).abs().max() / (bypass - base).abs().max())
    REPORT[(family, "LoRA+diff")] = (difference, effect)
    assert difference <= TOL, f"ComfyUI's merge differs from the training forward by {difference:.2e}"
    assert effect <= EFFECT_TOL, f"{effect:.2e} of what the LoRA and deltas change"
    share = float((merged - bypass).abs().max() / (bypass - lora_only).abs().max())
    assert share <= 10 * EFFECT_TOL, f"{share:.2e} of what the deltas alone change"
    for name, delta in deltas.items():  # the merged norm/bias tensors == base + delta
        module = network.get_submodule(name)
        for suffix, attr in (("diff", "weight"), ("diff_b", "bias")):
            if getattr(delta, suffix) is not None:  # (LoRA patches weights of other layers)
                want = originals[f"{name}.{attr}"] + getattr(delta, suffix).detach()
                assert (getattr(module, attr) - want).abs().max() <= 1e-6 * want.abs().max(), (name, attr)

    # continuing: LoRA keys and delta keys come back, the same keys and values
    model_output(model, probe, positive)
    rebuilt, rebuilt_deltas = io.lora_from_state_dict(network, lora, PREFIX, torch.float32)
    assert set(rebuilt) == set(adapters) and set(rebuilt_deltas) == set(deltas)
    state = {**inject.lora_state_dict(rebuilt, PREFIX), **inject.lora_state_dict(rebuilt_deltas, PREFIX)}
    assert same_state(state, lora)
    again = bypass_output(pack, model, inject.adapter_patches(network, rebuilt)
                          + inject.adapter_patches(network, rebuilt_deltas), probe, positive)
    assert torch.equal(again, bypass)


def test_report(capsys):
    """Prints ComfyUI's merge vs the training forward per case (run with -s to see it)."""
    with capsys.disabled():
        for (family, algorithm), (diff, effect) in sorted(REPORT.items()):
            print(f"{family:9s} {algorithm:9s} merge vs training forward: {diff:.2e} of the output, "
                  f"{effect:.2e} of the change")


F = torch.nn.functional
OPS = {  # name -> (constructor args, input shape, the op with explicit weight and bias)
    "Linear": ((12, 20), (2, 5, 12), lambda m, x, w, b: F.linear(x, w, b)),
    "Conv2d": ((12, 20, 3), (2, 12, 6, 6), lambda m, x, w, b: F.conv2d(x, w, b, 1, 0)),
    "GroupNorm": ((4, 12), (2, 12, 5, 5), lambda m, x, w, b: F.group_norm(x, 4, w, b, m.eps)),
    "LayerNorm": ((12,), (2, 5, 12), lambda m, x, w, b: F.layer_norm(x, (12,), w, b, m.eps)),
    "RMSNorm": ((12,), (2, 5, 12), lambda m, x, w, b: F.rms_norm(x, (12,), w, m.eps)),
}


@pytest.mark.parametrize("mode", ["plain", "manual_cast_bf16", "weight_function"])
@pytest.mark.parametrize("op", list(OPS))
def test_norm_delta_on_comfyui_ops(op, mode, pack, comfy):
    """The bypass of a ComfyUI op == the op run with (weight + diff, bias + diff_b), whether
    the op uses its weight as is, casts it (manual_cast: bf16 weights, fp32 input) or runs
    weight functions on it (ComfyUI's low-VRAM patches)."""
    import comfy.ops

    diff = sub(pack, "lora.diff")
    args, shape, reference = OPS[op]
    ops = comfy.ops.manual_cast if mode == "manual_cast_bf16" else comfy.ops.disable_weight_init
    kwargs = {"eps": 1e-6, "elementwise_affine": True} if op == "RMSNorm" else {}
    dtype = torch.bfloat16 if mode == "manual_cast_bf16" else torch.float32
    module = getattr(ops, op)(*args, dtype=dtype, **kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1 if p.ndim == 1 else 0))
    module.requires_grad_(False)
    weight, bias = module.weight.float(), None if module.bias is None else module.bias.float()
    if mode == "weight_function":
        module.weight_function = [lambda w: w * 1.5]
        weight = weight * 1.5
        if bias is not None:
            module.bias_function = [lambda b: b + 0.1]
            bias = bias + 0.1
    delta = diff.NormDelta.for_module(module, torch.float32)
    assert delta is not None and op in diff.norm_targets(torch.nn.ModuleDict({op: module}))
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(shape, generator=g)
    got = delta.bypass(module.forward)(x)
    want = reference(module, x, weight if delta.diff is None else weight + delta.diff,
                     bias if delta.diff_b is None else bias + delta.diff_b)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (got - module(x)).abs().max() > 1e-2
