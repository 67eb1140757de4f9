"""Renaming a saved LoRA for other tools (lora/export.py), on plain tensors: kohya keeps every
key and only renames modules; PEFT names fold alpha into lora_B and split fused layers by
rows; merge_slices puts the parts back exactly."""

import pytest
import torch

from lora_lab.lora import ADAPTERS, layer_geometry
from lora_lab.lora.export import ExportName, ExportNames, Part, Slice, export_lora, merge_slices, split_key

P = "diffusion_model."


def lora_keys(module, out=12, inp=6, rank=3, alpha=1.5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"{P}{module}.lora_down.weight": torch.randn(rank, inp, generator=g).to(dtype),
            f"{P}{module}.lora_up.weight": torch.randn(out, rank, generator=g).to(dtype),
            f"{P}{module}.alpha": torch.tensor(alpha)}


def delta(down, up, scale=1.0):
    return (up.float() @ down.float()) * scale


@pytest.mark.parametrize("algorithm", list(ADAPTERS))
def test_kohya_renames_modules_and_keeps_every_key(algorithm):
    layer = torch.nn.Linear(8, 16)
    adapter = ADAPTERS[algorithm](layer_geometry(layer), 4, 2.0, torch.float32,
                                  torch.Generator().manual_seed(0), weight=layer.weight,
                                  bias=layer.bias)
    tensors = adapter.to_state_dict(f"{P}blocks.0.attn.qkv")
    tensors[f"{P}blocks.0.norm.diff"] = torch.ones(16)
    names = ExportNames("kohya", {"blocks.0.attn.qkv": (ExportName("lora_unet_blocks_0_attn_qkv"),),
                                  "blocks.0.norm": (ExportName("lora_unet_blocks_0_norm"),)})
    out = export_lora(tensors, names)
    assert len(out) == len(tensors)
    for key, value in tensors.items():
        module, suffix = split_key(key, P)
        renamed = "lora_unet_" + module.replace(".", "_") + "." + suffix
        assert torch.equal(out[renamed], value)


def test_peft_folds_alpha_and_splits_rows_exactly():
    tensors = lora_keys("blocks.0.qkv", out=12, rank=3, alpha=1.5)
    tensors.update(lora_keys("blocks.0.proj", out=6, rank=3, alpha=3.0, seed=1))
    names = ExportNames("peft", {
        "blocks.0.qkv": tuple(ExportName(f"transformer.b.0.to_{c}", Slice(4 * i, 4))
                              for i, c in enumerate("qkv")),
        "blocks.0.proj": (ExportName("transformer.b.0.out", Slice(0, 6, lambda t: t.flip(0))),),
    })
    out = export_lora(tensors, names)
    assert sorted(out) == sorted(f"transformer.b.0.{m}.lora_{ab}.weight"
                                 for m in ("to_q", "to_k", "to_v", "out") for ab in "AB")
    full = delta(tensors[f"{P}blocks.0.qkv.lora_down.weight"],
                 tensors[f"{P}blocks.0.qkv.lora_up.weight"], 1.5 / 3)
    for i, c in enumerate("qkv"):
        a, b = out[f"transformer.b.0.to_{c}.lora_A.weight"], out[f"transformer.b.0.to_{c}.lora_B.weight"]
        assert torch.allclose(delta(a, b), full[4 * i: 4 * i + 4], atol=1e-6)
    proj = delta(tensors[f"{P}blocks.0.proj.lora_down.weight"],
                 tensors[f"{P}blocks.0.proj.lora_up.weight"], 1.0)
    got = delta(out["transformer.b.0.out.lora_A.weight"], out["transformer.b.0.out.lora_B.weight"])
    assert torch.allclose(got, proj.flip(0), atol=1e-6)


def test_peft_keeps_the_lora_dtype():
    tensors = lora_keys("m", dtype=torch.bfloat16, alpha=3.0)  # scale 1: exact
    out = export_lora(tensors, ExportNames("peft", {"m": (ExportName("transformer.m"),)}))
    assert out["transformer.m.lora_B.weight"].dtype == torch.bfloat16
    assert torch.equal(out["transformer.m.lora_B.weight"], tensors[f"{P}m.lora_up.weight"])


@pytest.mark.parametrize("extra, match", [
    ({"m.diff_b": torch.zeros(12)}, "norm/bias deltas"),
    ({"m.dora_scale": torch.ones(1, 6)}, "DoRA keys"),
])
def test_peft_refuses_what_it_cannot_carry(extra, match):
    tensors = {**lora_keys("m"), **{P + k: v for k, v in extra.items()}}
    with pytest.raises(ValueError, match=f"{match}.*format comfyui"):
        export_lora(tensors, ExportNames("peft", {"m": (ExportName("transformer.m"),)}, "SD3"))


def test_unnamed_layers_and_clashes_are_refused():
    tensors = {**lora_keys("a"), **lora_keys("b", seed=1)}
    with pytest.raises(ValueError, match=f"{P}b.* has no kohya name in Toy"):
        export_lora(tensors, ExportNames("kohya", {"a": (ExportName("x"),)}, "Toy"))
    with pytest.raises(ValueError, match="Two layers would both be saved as x"):
        export_lora(tensors, ExportNames("kohya", {"a": (ExportName("x"),), "b": (ExportName("x"),)}))
    with pytest.raises(ValueError, match="split into 2 layers"):
        export_lora(lora_keys("a"), ExportNames("kohya", {"a": (
            ExportName("x", Slice(0, 6)), ExportName("y", Slice(6, 6)))}))
    with pytest.raises(ValueError, match="not a key of a known algorithm"):
        split_key(f"{P}a.weird", P)


def test_merge_slices_shared_down_gives_the_original_lora():
    tensors = lora_keys("qkv", out=12, rank=3, alpha=3.0)
    names = ExportNames("peft", {"qkv": tuple(ExportName(f"t.{c}", Slice(4 * i, 4))
                                              for i, c in enumerate("qkv"))})
    out = export_lora(tensors, names)
    parts = [Part(4 * i, 4, out[f"t.{c}.lora_A.weight"], out[f"t.{c}.lora_B.weight"])
             for i, c in enumerate("qkv")]
    down, up = merge_slices(parts[::-1], 12)
    assert torch.equal(down, tensors[f"{P}qkv.lora_down.weight"])
    assert torch.equal(up, tensors[f"{P}qkv.lora_up.weight"])


def test_merge_slices_different_downs_is_block_diagonal_and_exact():
    g = torch.Generator().manual_seed(4)
    parts = [Part(0, 4, torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g), 0.5),
             Part(8, 4, torch.randn(3, 6, generator=g), torch.randn(4, 3, generator=g), 2.0)]
    down, up = merge_slices(parts, 12)
    assert down.shape == (5, 6) and up.shape == (12, 5)
    merged = delta(down, up)
    assert torch.allclose(merged[0:4], delta(parts[0].down, parts[0].up, 0.5), atol=1e-6)
    assert torch.allclose(merged[8:12], delta(parts[1].down, parts[1].up, 2.0), atol=1e-6)
    assert torch.count_nonzero(merged[4:8]) == 0
    with pytest.raises(ValueError, match="rows 8:16"):
        merge_slices([Part(8, 8, parts[0].down, torch.zeros(8, 2))], 12)
