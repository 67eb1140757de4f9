"""Tiny, randomly initialised but *real* ComfyUI diffusion models for tests.

Each builder instantiates ComfyUI's own network class on the ``meta`` device to
learn the exact state-dict key names and shapes, fills a state dict with seeded
small random values, and loads it through ComfyUI's normal path
``comfy.sd.load_diffusion_model_state_dict(sd)``, so model detection, the
``BaseModel`` wrapper and the ``ModelPatcher`` are all the genuine ones.

Builders (both return a ``comfy.model_patcher.ModelPatcher``):

``tiny_sd15(seed=0, medium=False)``
    SD1.x UNet (``openaimodel.UNetModel``), detected as ``supported_models.SD15``
    (``model.model.model_type == ModelType.EPS``).  Detection fixes
    model_channels=320 and context_dim=768.
    small:  1 level, 1 res block, 1 transformer in + out, no middle block
            (~16M params).  Latent ``[B, 4, 8, 8]`` (any H, W divisible by 1).
    medium: 2 levels (channel_mult 1, 1), 1 res block each, transformers everywhere,
            middle block with 1 transformer (~44M params).  Latent ``[B, 4, 16, 16]`` (H, W even).
    Conditioning (CONDITIONING list): ``[[torch.randn(1, 77, 768), {}]]``
    Direct call: ``m.model.apply_model(x, sigma, c_crossattn=cond)``.

``tiny_sd3(seed=0, medium=False)``
    SD3 MMDiT (``mmdit.MMDiT``), detected as ``supported_models.SD3``
    (``model.model.model_type == ModelType.FLOW``). hidden = 64 * depth,
    heads = depth, patch 2, 16 latent channels.
    small:  depth 2, context dim 256, pooled (adm) dim 128,
            pos_embed_max_size 8  -> latent ``[B, 16, 16, 16]`` at most.
    medium: depth 6, pos_embed_max_size 16 -> latent ``[B, 16, 32, 32]`` at most.
    Conditioning: ``[[torch.randn(1, T, 256), {"pooled_output": torch.randn(1, 128)}]]``
    Direct call: ``m.model.apply_model(x, sigma, c_crossattn=cond, y=pooled)``.

Only import ComfyUI lazily (inside functions): this module is imported by
pytest only when COMFYUI_DIR is set (see conftest.py).
"""

SD15_CONTEXT_DIM = 768
SD3_CONTEXT_DIM = 256
SD3_POOLED_DIM = 128


def _fill_state_dict(model, seed, std=0.02):
    """Seeded random state dict with the keys/shapes of a (meta) module."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        val = torch.randn(shape, generator=gen, dtype=torch.float32) * std
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        is_norm = ("norm" in parent or parent.startswith("ln") or parent in ("in_layers", "out_layers", "out")) \
            and leaf == "weight" and len(shape) == 1
        if is_norm:
            val = val + 1.0
        sd[name] = val.contiguous()
    return sd


def _load(sd, weight_dtype=None):
    """``weight_dtype``: the stored dtype, as UNETLoader's ``weight_dtype`` sets it."""
    import comfy.sd

    options = {} if weight_dtype is None else {"dtype": weight_dtype}
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
    if model is None:
        raise RuntimeError("ComfyUI could not detect a model config for the tiny state dict")
    return model


def sd15_unet_config(medium=False):
    if medium:
        cfg = dict(num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[1, 1],
                   transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1)
    else:
        cfg = dict(num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                   transformer_depth_output=[1, 0], transformer_depth_middle=-2)
    cfg.update(dict(in_channels=4, out_channels=4, model_channels=320, context_dim=SD15_CONTEXT_DIM,
                    num_heads=8, num_head_channels=-1, use_spatial_transformer=True, legacy=False,
                    use_linear_in_transformer=False, adm_in_channels=None, use_checkpoint=False,
                    image_size=32))
    return cfg


def tiny_sd15(seed=0, medium=False, weight_dtype=None):
    """Tiny SD1.x UNet ModelPatcher (see module docstring); ``weight_dtype`` e.g.
    ``torch.float8_e4m3fn`` stores its weights as UNETLoader's fp8 choices do."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        net = UNetModel(**sd15_unet_config(medium), operations=comfy.ops.disable_weight_init)
    sd = _fill_state_dict(net, seed)
    del net
    return _load(sd, weight_dtype)


def sd3_mmdit_config(medium=False):
    depth = 6 if medium else 2
    pos = 16 if medium else 8
    return dict(in_channels=16, out_channels=16, patch_size=2, depth=depth,
                adm_in_channels=SD3_POOLED_DIM,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": SD3_CONTEXT_DIM,
                                                    "out_features": 64 * depth}},
                pos_embed_max_size=pos, num_patches=pos * pos, input_size=None)


def tiny_sd3(seed=0, medium=False):
    """Tiny SD3 MMDiT ModelPatcher (see module docstring)."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    with torch.device("meta"):
        net = MMDiT(**sd3_mmdit_config(medium), operations=comfy.ops.disable_weight_init)
    sd = _fill_state_dict(net, seed)
    del net
    return _load(sd)


def sd15_cond(batch=1, tokens=77, seed=0):
    """SD1.x CONDITIONING list: [[cross_attn [B,77,768], {}]]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, SD15_CONTEXT_DIM, generator=g), {}]]


def sd3_cond(batch=1, tokens=8, seed=0):
    """SD3 CONDITIONING list: [[cross_attn [B,T,256], {"pooled_output": [B,128]}]]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, SD3_CONTEXT_DIM, generator=g),
             {"pooled_output": torch.randn(batch, SD3_POOLED_DIM, generator=g)}]]


SD20_CONTEXT_DIM = 1024


def sd20_unet_config():
    """Tiny SD2.x-style UNet config: like the small ``sd15_unet_config`` but with context
    dim 1024 and linear proj_in/proj_out, which ComfyUI's detection maps to
    ``supported_models.SD20`` (EPS, as the tiny net has no ``output_blocks.11``). Its
    cross-attention accepts ``LotusConditioning``'s [1, 2, 1024] conditioning."""
    cfg = sd15_unet_config(medium=False)
    cfg.update(dict(context_dim=SD20_CONTEXT_DIM, use_linear_in_transformer=True,
                    num_heads=-1, num_head_channels=64))
    return cfg


def unet_state_dict(config, seed=0):
    """Seeded random raw state dict (no key prefix) of an ``openaimodel.UNetModel`` built
    from ``config``; save it with safetensors to get a file UNETLoader can load."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        net = UNetModel(**config, operations=comfy.ops.disable_weight_init)
    sd = _fill_state_dict(net, seed)
    del net
    return sd


def tiny_sd_vae(seed=0):
    """A real ComfyUI ``comfy.sd.VAE`` of the SD1.x layout (its own Encoder and Decoder
    classes, ~84M random weights: detection fixes the widths), loaded from a state dict as
    VAELoader does. Decodes ``[B, 4, h, w]`` latents to ``[B, 8h, 8w, 3]`` images."""
    import torch

    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    config = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
              "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
              "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        parts = {"encoder": Encoder(**config), "decoder": Decoder(**config)}
    shapes = {f"{prefix}.{k}": tuple(v.shape) for prefix, module in parts.items()
              for k, v in module.state_dict().items()}
    shapes.update({"quant_conv.weight": (8, 8, 1, 1), "quant_conv.bias": (8,),
                   "post_quant_conv.weight": (4, 4, 1, 1), "post_quant_conv.bias": (4,)})
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        if name.endswith("bias"):
            sd[name] = torch.zeros(shape)
        elif len(shape) == 1:  # norm scales
            sd[name] = torch.ones(shape)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            sd[name] = torch.randn(shape, generator=gen) / fan_in ** 0.5
    return comfy.sd.VAE(sd=sd)
