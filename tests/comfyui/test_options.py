"""Training Options inside real ComfyUI: the node and its chaining, options absent == options
at their defaults, layer presets on the tiny SD1.x and SD3 models, and a run using the
options whose LoRA ComfyUI's core loader reproduces."""

import pytest
import torch

from test_train_node import FAMILIES, core_reload, family_case, model_output, run_train


def defaults(node):
    """The node's widget values at their defaults, as the frontend sends them."""
    info = node.GET_SCHEMA().get_v1_info(node)
    return {name: spec[1]["default"] for name, spec in info.input["required"].items()}


def make_options(node, previous=None, **values):
    with torch.inference_mode():
        return node.execute(options=previous, **{**defaults(node), **values}).result[0]


def test_options_chain_later_changed_values_win(options_node):
    first = make_options(options_node, warmup_steps=3, ema_decay=0.9)
    second = make_options(options_node, first, ema_decay=0.99, lr_schedule="cosine")
    assert second["warmup_steps"] == 3  # kept: left at its default on the later node
    assert second["ema_decay"] == 0.99 and second["lr_schedule"] == "cosine"
    with pytest.raises(ValueError, match="include='\\(' is not a valid regular expression"):
        make_options(options_node, include="(")


def test_options_absent_equals_options_at_defaults(train_node, options_node, comfy):
    model, latents, positive, _ = family_case("sd15")
    at_defaults = make_options(options_node)
    _, plain, loss_plain, _ = run_train(train_node, model, latents, positive, steps=3)
    _, same, loss_same, _ = run_train(train_node, model, latents, positive, steps=3,
                                      options=at_defaults)
    assert loss_plain == loss_same
    assert plain.keys() == same.keys() and all(torch.equal(plain[k], same[k]) for k in plain)


# the layers each preset selects on the tiny models (names under diffusion_model.)
EXPECTED = {
    ("sd15", "attention"): {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
        "output_blocks.1.1.transformer_blocks.0.attn2.to_out.0"},
    ("sd15", "attention_and_mlp"): {
        "input_blocks.1.1.transformer_blocks.0.ff.net.2",
        "output_blocks.1.1.transformer_blocks.0.ff.net.0.proj"},
    ("sd3", "attention"): {"joint_blocks.0.x_block.attn.qkv",
                           "joint_blocks.0.context_block.attn.proj"},
    ("sd3", "attention_and_mlp"): {"joint_blocks.0.x_block.mlp.fc1",
                                   "joint_blocks.1.x_block.mlp.fc2"},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_presets_select_the_expected_layers(family, pack, comfy):
    import importlib

    inject = importlib.import_module(pack.__name__ + ".lora.inject")
    model, *_ = family_case(family)
    network = model.model.diffusion_model
    linear = set(inject.find_targets(network, "linear"))
    every = set(inject.find_targets(network, "all"))
    attention = set(inject.find_targets(network, "attention"))
    mixed = set(inject.find_targets(network, "attention_and_mlp"))
    assert attention < mixed <= linear < every
    assert EXPECTED[family, "attention"] <= attention
    assert EXPECTED[family, "attention_and_mlp"] <= mixed - attention
    assert not {n for n in attention if "mlp" in n or ".ff." in n}
    assert not {n for n in mixed if "embedder" in n}  # t_embedder.mlp is no feed-forward block
    big = {n for n, m in network.named_modules() if isinstance(m, torch.nn.Conv2d)
           and m.kernel_size != (1, 1)}
    if family == "sd15":
        assert big and big <= every - linear  # 3x3 convs only with "all"
    assert set(inject.find_targets(network, "linear", include=r"\.attn2\.|context_block")) \
        == {n for n in linear if ".attn2." in n or "context_block" in n}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_run_with_options_reloads_in_core(family, train_node, options_node, comfy, tmp_path):
    """Warm-up, cosine, clipping, EMA, LoRA+, rsLoRA, every conv (LoCon) and norm/bias
    deltas: ComfyUI's core loader on the saved file reproduces model_with_lora."""
    model, latents, positive, probe = family_case(family)
    before = model_output(model, probe, positive)
    options = make_options(options_node, lr_schedule="cosine", warmup_steps=1, max_grad_norm=1.0,
                           ema_decay=0.5, alpha=4.0, rslora=True, lora_plus_ratio=4.0,
                           target_layers="all", train_norm_bias=True)
    trained, lora, loss, _ = run_train(train_node, model, latents, positive, steps=3,
                                       learning_rate=1e-2, options=options)
    assert lora.metadata["lora_lab.lr_schedule"] == "cosine"
    assert any(k.endswith(".diff_b") for k in lora)  # biases
    if family == "sd15":  # GroupNorm/LayerNorm scales (SD3's norms have none)
        assert any(k.endswith(".diff") for k in lora)
    loaded, lines = core_reload(model, lora, tmp_path / "options.safetensors")
    assert not [line for line in lines if "not loaded" in line.lower()], lines
    with_lora = model_output(trained, probe, positive)
    assert not torch.equal(with_lora, before)
    reloaded = model_output(loaded, probe, positive)
    assert (reloaded - with_lora).abs().max() <= 1e-4 * with_lora.abs().max()
    assert torch.equal(model_output(model, probe, positive), before)
