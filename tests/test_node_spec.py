"""The Train LoRA node declares exactly the contract's inputs and outputs (no ComfyUI needed)."""

from lora_lab.lora import ADAPTERS
from lora_lab.nodes.spec import TRAIN_INPUTS, TRAIN_OUTPUTS

# The contract (shared/spec/train_lora_node.md): name, type, default, min, max, options.
CONTRACT = [
    ("model", "MODEL", None, None, None, None),
    ("latents", "LATENT", None, None, None, None),
    ("positive", "CONDITIONING", None, None, None, None),
    ("batch_size", "INT", 1, 1, 10000, None),
    ("grad_accumulation_steps", "INT", 1, 1, 1024, None),
    ("steps", "INT", 16, 1, 100000, None),
    ("learning_rate", "FLOAT", 0.0005, 0.0000001, 1.0, None),
    ("rank", "INT", 8, 1, 128, None),
    # the contract's four, then the optimizers added since (issue: Training Options)
    ("optimizer", "COMBO", "AdamW", None, None, ["AdamW", "Adam", "SGD", "RMSprop", "Prodigy",
                                                 "AdamWScheduleFree", "Adafactor", "Lion"]),
    ("loss_function", "COMBO", "MSE", None, None, ["MSE", "L1", "Huber", "SmoothL1"]),
    ("seed", "INT", 0, 0, 18446744073709551615, None),
    ("training_dtype", "COMBO", "bf16", None, None, ["bf16", "fp32"]),
    ("lora_dtype", "COMBO", "bf16", None, None, ["bf16", "fp32"]),
    ("algorithm", "COMBO", "LoRA", None, None, None),
    ("gradient_checkpointing", "BOOLEAN", True, None, None, None),
    ("existing_lora", "COMBO", "[None]", None, None, None),
]


def test_inputs_equal_the_contract():
    """The contract's 16 inputs in order, then only optional inputs (the options socket)."""
    assert len(TRAIN_INPUTS) == 18
    for (name, kind, options), (c_name, c_kind, default, low, high, choices) in zip(
            TRAIN_INPUTS, CONTRACT):
        assert (name, kind) == (c_name, c_kind)
        assert options.get("default") == default, name
        assert options.get("min") == low and options.get("max") == high, name
        if choices is not None:
            assert options["options"] == choices, name
        assert options.get("tooltip"), f"{name} has no tooltip"
        assert not options.get("optional"), name
    name, kind, options = TRAIN_INPUTS[16]
    assert (name, kind) == ("options", "LORALAB_OPTIONS") and options["optional"]


def test_algorithm_lists_lora_first_and_only_registered_algorithms():
    options = dict((n, o) for n, _, o in TRAIN_INPUTS)["algorithm"]
    assert options["options"][0] == "LoRA" and options["options"] == list(ADAPTERS)


def test_outputs():
    """The contract's four outputs in order, then the previews grid."""
    assert [(k, d) for _, k, d, _ in TRAIN_OUTPUTS] == [
        ("MODEL", "model_with_lora"), ("LORA_MODEL", "lora"), ("LOSS_MAP", "loss"),
        ("INT", "steps"), ("IMAGE", "previews")]
    ids = [i for i, *_ in TRAIN_OUTPUTS]
    assert not set(ids) & {n for n, *_ in TRAIN_INPUTS}, "an output id equals an input id"
    assert all(tip for *_, tip in TRAIN_OUTPUTS)
