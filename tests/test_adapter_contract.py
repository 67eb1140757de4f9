"""The adapter contract: what an algorithm saves is declared once (``SAVED``, ``ALPHA``,
``file_dims``) and saving, loading, detection and the key/shape checks derive from it."""

import pytest
import torch
from torch import nn

from lora_lab.lora import ADAPTERS, DETECTION_ORDER, Adapter, Saved, layer_geometry
from lora_lab.lora.base import size
from lora_lab.lora.io import adapters_from_state_dict, detect_algorithm, modules_by_algorithm
from test_algorithms import PREFIX, build, comfy_merged, perturb, with_weight

FILE_METHODS = ("to_state_dict", "from_state_dict", "identifies", "identifying_suffixes",
                "required_keys", "expected_shapes", "module_tensors")


@pytest.mark.parametrize("cls", list(ADAPTERS.values()), ids=list(ADAPTERS))
def test_no_algorithm_writes_its_own_file_code(cls):
    for name in FILE_METHODS:
        owners = [c.__name__ for c in cls.__mro__ if name in vars(c)]
        assert owners == ["Adapter"], (cls.NAME, name, owners)
    assert cls.SAVED and all(isinstance(s, Saved) for s in cls.SAVED)
    assert cls.ALPHA_OVER_RANK == (cls.ALPHA == "scale")


def test_detection_asks_the_more_specific_algorithm_first():
    order = [cls.NAME for cls in DETECTION_ORDER]
    assert order.index("DoRA") < order.index("LoRA")
    layer, dora, x = build("DoRA", "linear", "fp32")
    perturb(dora)
    sd = dora.to_state_dict(PREFIX)
    assert detect_algorithm(sd).NAME == "DoRA"
    plain = {k: v for k, v in sd.items() if not k.endswith("dora_scale")}
    assert detect_algorithm(plain).NAME == "LoRA"


class Scaled(Adapter):
    """A made-up algorithm: ``dW = alpha / rank * u v`` with a learned per-output gain ``g``
    (``(1 + g) * (W x) + delta``): only its maths and its declaration are written."""

    NAME = "Scaled"
    UP_PARAMETERS = ("u",)
    SAVED = (
        Saved("scaled_u", "u", lambda g, d: ((g.out_features, d["rank"]),)),
        Saved("scaled_v", "v", lambda g, d: ((d["rank"], g.fan_in),)),
        Saved("scaled_gain", "gain", lambda g, d: ((g.out_features,),), float32=True),
    )

    def __init__(self, geometry, rank, alpha, compute_dtype, generator=None, *, weight=None,
                 bias=None):
        super().__init__(geometry, compute_dtype, weight, bias)
        self.rank, self.alpha = rank, float(alpha)
        self.u = nn.Parameter(torch.zeros(geometry.out_features, rank))
        self.v = nn.Parameter(torch.randn(rank, geometry.fan_in, generator=generator) * 0.1)
        self.gain = nn.Parameter(torch.zeros(geometry.out_features))

    @classmethod
    def file_dims(cls, own):
        return {"rank": size(own["scaled_v"], 0)}

    def delta(self, x):
        return nn.functional.linear(x, (self.u @ self.v) * self.scale)


def test_a_new_algorithm_gets_saving_loading_and_checks_from_its_declaration():
    layer = nn.Linear(12, 32)
    g = layer_geometry(layer)
    a = Scaled(g, 4, 8.0, torch.bfloat16, torch.Generator().manual_seed(0))
    assert a.scale == 2.0
    perturb(a)
    sd = a.to_state_dict("m")
    assert set(sd) == {"m.scaled_u", "m.scaled_v", "m.scaled_gain", "m.alpha"}
    assert sd["m.scaled_u"].dtype == torch.bfloat16 and sd["m.scaled_gain"].dtype == torch.float32
    assert Scaled.identifies(sd, "m") and not Scaled.identifies({"m.scaled_v": sd["m.scaled_v"]}, "m")
    assert Scaled.required_keys(sd, "m") == ["m.scaled_u", "m.scaled_v", "m.scaled_gain"]
    again = Scaled.from_state_dict(g, sd, "m", torch.bfloat16)
    assert again.rank == 4 and again.alpha == 8.0
    assert all(torch.equal(v, again.to_state_dict("m")[k]) for k, v in sd.items())
    shapes = Scaled.expected_shapes(g, Scaled.module_tensors(sd, "m"), "m")
    assert shapes == {"scaled_u": {(32, 4)}, "scaled_v": {(4, 12)}, "scaled_gain": {(32,)}}
    no_alpha = {k: v for k, v in sd.items() if k != "m.alpha"}
    assert Scaled.from_state_dict(g, no_alpha, "m", torch.float32).scale == 1.0


def test_a_factored_lokr_file_loads_with_comfyuis_scale():
    layer = nn.Linear(12, 32)
    g = torch.Generator().manual_seed(3)
    tensors = {
        f"{PREFIX}.lokr_w1_a": torch.randn(4, 2, generator=g),
        f"{PREFIX}.lokr_w1_b": torch.randn(2, 4, generator=g),
        f"{PREFIX}.lokr_w2_a": torch.randn(8, 3, generator=g) * 0.1,
        f"{PREFIX}.lokr_w2_b": torch.randn(3, 3, generator=g) * 0.1,
        f"{PREFIX}.alpha": torch.tensor(6.0),
    }
    cls = detect_algorithm(tensors)
    assert cls.NAME == "LoKr"
    assert cls.required_keys(tensors, PREFIX) == [
        f"{PREFIX}.lokr_w1_a", f"{PREFIX}.lokr_w1_b", f"{PREFIX}.lokr_w2_a", f"{PREFIX}.lokr_w2_b"]
    own = cls.module_tensors(tensors, PREFIX)
    shapes = cls.expected_shapes(layer_geometry(layer), own, PREFIX)
    assert all(tuple(own[k].shape) in v for k, v in shapes.items())
    adapter = cls.from_state_dict(layer_geometry(layer), tensors, PREFIX, torch.float32,
                                  weight=layer.weight, bias=layer.bias)
    x = torch.randn(3, 12)
    with torch.no_grad():
        expected = with_weight(layer, x, comfy_merged(layer.weight, tensors, PREFIX))
        assert torch.allclose(adapter.bypass(layer.forward)(x), expected, atol=1e-5)


@pytest.mark.parametrize("tensors, match", [
    ({"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 3), "lokr_t2": (2, 2, 3, 3)},
     "Tucker-decomposed LoKr"),
    ({"lokr_w1_a": (4, 2), "lokr_w1_b": (3, 4), "lokr_w2": (8, 3)}, "do not multiply"),
    ({"hada_w1_a": (32, 2), "hada_w1_b": (2, 12), "hada_w2_a": (32, 2), "hada_w2_b": (2, 12),
      "hada_t1": (2, 2, 1, 1)}, "Tucker-decomposed LoHa"),
])
def test_forms_that_cannot_be_continued_are_named(tensors, match):
    net = nn.Sequential()
    net.add_module("layer", nn.Linear(12, 32))
    state = {f"diffusion_model.layer.{k}": torch.ones(s) for k, s in tensors.items()}
    with pytest.raises(ValueError, match=match):
        adapters_from_state_dict(net, state, "diffusion_model.", torch.float32)


def test_square_glora_of_full_rank_is_refused_as_old_style():
    net = nn.Sequential()
    net.add_module("layer", nn.Linear(8, 8))
    state = {f"diffusion_model.layer.{k}": torch.zeros(s) for k, s in
             {"a1.weight": (8, 8), "a2.weight": (8, 8), "b1.weight": (8, 8), "b2.weight": (8, 8)}.items()}
    assert set(modules_by_algorithm(state, "diffusion_model.")) == {ADAPTERS["GLoRA"]}
    with pytest.raises(ValueError, match="old-style LyCORIS GLoRA"):
        adapters_from_state_dict(net, state, "diffusion_model.", torch.float32)
