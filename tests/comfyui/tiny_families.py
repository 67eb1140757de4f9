"""Tiny, randomly initialised but *real* ComfyUI diffusion models, one per model family.

Like ``tiny_models.py`` (whose ``_fill_state_dict`` and ``_load`` this reuses), every
family is built from ComfyUI's own network class and loaded through ComfyUI's normal
path ``comfy.sd.load_diffusion_model_state_dict(sd)``, so ``comfy/model_detection.py``,
``comfy/supported_models.py``, the ``model_base`` class and the ``ModelPatcher`` are the
genuine ones of the running ComfyUI version.

How a family is built (``_layout`` / ``_build``):

1. *Seed* network: ComfyUI's network class for the family, instantiated on the ``meta``
   device with a small config (arguments the running version's class does not accept
   are dropped).  Its state-dict keys/shapes are the family's checkpoint layout.
2. ComfyUI's detection runs on those keys/shapes (``model_config_from_unet``; it reads
   shapes only) and must pick the family's ``supported_models`` class, else the family
   is unavailable in this ComfyUI version.
3. The network ComfyUI itself builds from the detected config is instantiated on
   ``meta`` (``model_config.get_model``).  Sizes that detection hard-codes instead of
   reading them from weight shapes show up here: if that network has more than
   ``MAX_PARAMS`` parameters the family is unavailable in this version, with the reason.
4. Its keys/shapes are filled with seeded small random values (plus marker keys that
   detection reads, see SD2 v-prediction) and loaded for real.

API
---
``FAMILIES``: ``OrderedDict`` name -> ``Family`` with

- ``build(seed=0) -> ModelPatcher`` - call it under ``torch.inference_mode()``, as
  ComfyUI's loaders do;
- ``latent_shape`` - batch 1: ``(1, C, H, W)`` or ``(1, C, T, H, W)`` for video;
- ``cond(seed=0) -> CONDITIONING`` - ``[[cross_attn [1, T, ctx], {...}]]`` with what the
  family's ``extra_conds`` need for ``BaseModel.apply_model`` to run;
- ``available() -> str | None`` - None when the running ComfyUI has the family and it
  builds small, else the skip reason;
- ``model_config`` / ``base_model`` / ``model_type`` - the expected
  ``comfy.supported_models`` class, ``comfy.model_base`` class and ``ModelType`` names.

``LARGE_FAMILIES``: same, for families whose smallest detectable layout is bigger than
``MAX_PARAMS`` but still usable on CPU (SDXL).
``NOT_SMALL``: family name -> why it cannot be built small here.

Only import ComfyUI lazily (inside functions): this module is imported by pytest only
when COMFYUI_DIR is set (see conftest.py).
"""
import collections
import dataclasses
import functools
import inspect
import math
from typing import Callable, Optional

import tiny_models
from tiny_models import _fill_state_dict, _load

# A family is "small" when the network ComfyUI builds for it has at most this many
# parameters (the tiny SD1.x UNet, whose detection fixes 320 channels, has 16.2M).
MAX_PARAMS = 20_000_000


# --------------------------------------------------------------------------------------
# Machinery
# --------------------------------------------------------------------------------------

class Unavailable(Exception):
    """The running ComfyUI cannot build this family (small); the message says why."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How to build one family.

    net: ``"module:Class"``, ComfyUI's network class for the seed network.
    config: ``() -> dict`` of seed-network constructor arguments (those the running
        version's class does not accept are dropped).
    model_config: the ``comfy.supported_models`` class detection must pick.
    params_cls: ``"module:Class"`` of the dataclass that some networks (Flux,
        HunyuanVideo) build from ``**kwargs``; its fields are the accepted arguments.
    extra_keys: ``(torch.Generator) -> dict`` of state-dict entries that are not weights
        of the network but that detection reads.
    max_params: size limit for this family.
    """
    net: str
    config: Callable
    model_config: str
    params_cls: Optional[str] = None
    extra_keys: Optional[Callable] = None
    max_params: int = MAX_PARAMS


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    build: Callable            # (seed=0) -> comfy.model_patcher.ModelPatcher
    latent_shape: tuple        # batch 1: (1, C, H, W) or (1, C, T, H, W)
    cond: Callable             # (seed=0) -> CONDITIONING [[cross_attn, {...}]]
    available: Callable        # () -> None | skip reason
    model_config: str          # comfy.supported_models class name
    base_model: str            # comfy.model_base class name
    model_type: str            # comfy.model_base.ModelType name
    note: str = ""


def _import(path):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _accepted(cls, kwargs, params_cls=None):
    """The subset of ``kwargs`` that ``cls`` (or its params dataclass) accepts."""
    if params_cls is not None:
        names = {f.name for f in dataclasses.fields(_import(params_cls))}
    else:
        sig = inspect.signature(cls.__init__)
        if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            return dict(kwargs)
        names = set(sig.parameters)
    return {k: v for k, v in kwargs.items() if k in names}


def _comfy_version():
    try:
        import comfyui_version
        return comfyui_version.__version__
    except Exception:  # very old checkouts have no comfyui_version.py
        return "?"


def _count(sd):
    return sum(math.prod(t.shape) for t in sd.values())


@functools.lru_cache(maxsize=None)
def _layout(name):
    """Dry run on ``meta`` (no weights): the state-dict layout ComfyUI builds for family
    ``name`` from the tiny seed network, as ``{key: meta tensor}``; raises
    ``Unavailable`` when this ComfyUI has no such family or cannot build it."""
    import torch
    import comfy.model_detection
    import comfy.ops
    import comfy.supported_models

    spec = _SPECS[name]
    version = _comfy_version()
    if not hasattr(comfy.supported_models, spec.model_config):
        raise Unavailable(f"ComfyUI {version} has no {spec.model_config} model "
                          f"(comfy.supported_models.{spec.model_config})")
    try:
        cls = _import(spec.net)
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"ComfyUI {version} has no {spec.net} ({e})")
    config = _accepted(cls, spec.config(), spec.params_cls)
    try:
        with torch.device("meta"):
            seed_net = cls(**config, operations=comfy.ops.disable_weight_init)
    except Exception as e:
        raise Unavailable(f"ComfyUI {version}'s {spec.net} cannot build the tiny {name} "
                          f"config: {type(e).__name__}: {e}")
    seed_sd = dict(seed_net.state_dict())
    del seed_net

    model_config = comfy.model_detection.model_config_from_unet(dict(seed_sd), "")
    found = type(model_config).__name__ if model_config is not None else None
    if found != spec.model_config:
        raise Unavailable(f"ComfyUI {version} detects the tiny {name} state dict as "
                          f"{found}, not {spec.model_config}")
    try:  # the network ComfyUI itself builds from the detected config
        base = model_config.get_model({}, "", device=torch.device("meta"))
    except Exception as e:
        raise Unavailable(f"ComfyUI {version} cannot build the {spec.model_config} config "
                          f"it detects for the tiny {name} state dict: "
                          f"{type(e).__name__}: {e}")
    sd = dict(base.diffusion_model.state_dict())
    del base
    return sd, seed_sd


def planned_params(name):
    """Parameter count of the network ComfyUI builds for family ``name`` (meta dry run,
    no size limit); raises ``Unavailable``."""
    return _count(_layout(name)[0])


def _plan(name):
    """``_layout`` with the family's size limit applied."""
    sd, seed_sd = _layout(name)
    n, limit = _count(sd), _SPECS[name].max_params
    if n > limit:
        grown = sorted(k for k in sd if k not in seed_sd or seed_sd[k].shape != sd[k].shape)
        why = (f"detection hard-codes sizes, e.g. {grown[0]} {tuple(sd[grown[0]].shape)}"
               if grown else "that is the smallest layout its detection accepts")
        raise Unavailable(f"ComfyUI {_comfy_version()} builds {n / 1e6:.0f}M parameters "
                          f"(> {limit / 1e6:.0f}M) for the tiny {name} state dict: {why}")
    return sd


def _available(name):
    try:
        _plan(name)
    except Unavailable as e:
        return str(e)
    return None


def _build(name, seed=0):
    """Seeded random weights in the planned layout, loaded through ComfyUI's loader."""
    import torch

    spec = _SPECS[name]
    layout = _plan(name)

    class _Layout(torch.nn.Module):  # all _fill_state_dict needs is .state_dict()
        def state_dict(self):
            return layout

    sd = _fill_state_dict(_Layout(), seed)
    _fix_norms(sd)
    if spec.extra_keys is not None:
        sd.update(spec.extra_keys(torch.Generator().manual_seed(seed + 1)))
    return _load(sd)


def _fix_norms(sd):
    """Norm scales ``_fill_state_dict`` does not recognise (``.scale`` params, ``q_norm`` /
    ``norm_q`` style names) start near 1 too, like a trained norm."""
    for k, v in sd.items():
        parts = k.split(".")
        parent = parts[-2] if len(parts) > 1 else ""
        if v.ndim == 1 and parts[-1] in ("weight", "scale") and "norm" in parent \
                and v.mean() < 0.5:
            sd[k] = v + 1.0


# --------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------

def _cond(ctx_dim, tokens=8, mask=False, **extra):
    """CONDITIONING factory: ``[[cross_attn [1, tokens, ctx_dim], extras]]``.  ``extra``
    int values are the size of a random vector ``[1, n]`` (``pooled_output=768``), other
    values are used as they are (``guidance=3.5``); ``mask`` adds an all-ones
    ``attention_mask`` ``[1, tokens]``, as the family's text encoder would."""
    def cond(seed=0):
        import torch

        g = torch.Generator().manual_seed(seed)
        opts = {}
        for k, v in extra.items():
            is_size = isinstance(v, int) and not isinstance(v, bool)
            opts[k] = torch.randn(1, v, generator=g) if is_size else v
        if mask:
            opts["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
        return [[torch.randn(1, tokens, ctx_dim, generator=g), opts]]
    return cond


# --------------------------------------------------------------------------------------
# Seed-network configs
# --------------------------------------------------------------------------------------
# Context (text feature) sizes: "detected" ones are read from a weight shape and kept
# small; "fixed" ones are hard-coded by detection or are constructor defaults.

SD15_CTX = tiny_models.SD15_CONTEXT_DIM     # 768, fixed by supported_models.SD15
SD20_CTX = tiny_models.SD20_CONTEXT_DIM     # 1024, fixed by supported_models.SD20
SDXL_CTX = 2048                             # fixed by supported_models.SDXL (and KOALA)
SDXL_POOLED = 1280                          # adm 2816 = 1280 pooled + 6 x 256 size embeds
SD3_CTX = tiny_models.SD3_CONTEXT_DIM       # 256, detected
SD3_POOLED = tiny_models.SD3_POOLED_DIM     # 128, detected
FLUX_CTX = 64                               # txt_in input (real 4096, T5-XXL), detected
FLUX_VEC = 32                               # vector_in input (real 768, CLIP-L), detected
LONGCAT_CTX = 3584                          # txt_in input: fixed by LongCatImage matching
FLUX2_CTX = 64                              # txt_in input (real 15360 Mistral), detected
WAN_CTX = 4096                              # WanModel text_dim: constructor default
HYV_CTX = 64                                # txt_in input (real 4096 LLaVA), detected
HYV_VEC = 768                               # vector_in input: fixed by detection
LTXV_CTX = 4096                             # caption_channels: constructor default
COSMOS_CTX = 1024                           # crossattn_emb_channels: fixed by detection
COGVIDEOX_CTX = 64                          # text_proj input (real 4096), detected
KANDINSKY5_CTX = 3584                       # in_text_dim (Qwen2.5-VL): constructor default
KANDINSKY5_POOLED = 768                     # in_text_dim2 (CLIP-L): constructor default
KREA2_TXT_LAYERS, KREA2_TXT_DIM = 2, 80     # text context = layers x dim, detected

UNET = "comfy.ldm.modules.diffusionmodules.openaimodel:UNetModel"
FLUX_NET, FLUX_PARAMS = "comfy.ldm.flux.model:Flux", "comfy.ldm.flux.model:FluxParams"
HYV_NET = "comfy.ldm.hunyuan_video.model:HunyuanVideo"
HYV_PARAMS = "comfy.ldm.hunyuan_video.model:HunyuanVideoParams"


def _sd2_vpred_marker(g):
    """``SD20.model_type()`` reports V_PREDICTION only when the state dict has
    ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` with std > 0.09; a real 12-
    output-block SD2 UNet at the fixed 320 channels is far from small, so the tiny SD2
    UNet carries just that key: detection reads it, loading then ignores it (ComfyUI logs
    ``unet unexpected: [...]``)."""
    import torch

    return {"output_blocks.11.1.transformer_blocks.0.norm1.bias":
            torch.randn(320, generator=g) * 0.5}


def _sdxl_config():
    """KOALA-700M-shaped SDXL UNet (``supported_models.KOALA_700M`` -> ``model_base.SDXL``),
    the smallest layout SDXL detection accepts: it fixes model_channels 320, context 2048,
    adm 2816 and the input transformer depths ([0, 2, 5]; SDXL's own is [0, 0, 2, 2, 10,
    10]); channel_mult and the output/middle depths are free and kept minimal."""
    return dict(in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1, 1],
                channel_mult=[1, 1, 1], transformer_depth=[0, 2, 5],
                transformer_depth_output=[0, 0, 0, 0, 0, 0], transformer_depth_middle=-2,
                context_dim=SDXL_CTX, adm_in_channels=2816, num_classes="sequential",
                num_heads=-1, num_head_channels=64, use_spatial_transformer=True,
                use_linear_in_transformer=True, legacy=False, use_checkpoint=False,
                image_size=32)


def _flux_config():
    """Flux dev: hidden 128 with one 128-dim head (0.33 detection reads hidden from
    img_in and sets heads = hidden / sum(axes_dim)), one double and one single block,
    16-channel latents, patch 2, guidance embedding, CLIP-L style vector input."""
    return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=FLUX_VEC,
                context_in_dim=FLUX_CTX, hidden_size=128, mlp_ratio=4.0, num_heads=1,
                depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
                patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])


def _flux2_config():
    """Flux 2: hidden 128 with one head (axes 4 x 32), 128-channel patch-1 latents, global
    modulation, no biases, guidance embedding, one double and one single block."""
    return dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                context_in_dim=FLUX2_CTX, hidden_size=128, mlp_ratio=3.0, num_heads=1,
                depth=1, depth_single_blocks=1, axes_dim=[32, 32, 32, 32], theta=2000,
                patch_size=1, qkv_bias=False, guidance_embed=True, txt_ids_dims=[3],
                global_modulation=True, mlp_silu_act=True, ops_bias=False,
                default_ref_method="index", ref_index_scale=10.0)


def _flux_schnell_config():
    """Flux schnell: as ``_flux_config`` without the guidance embedding."""
    return dict(_flux_config(), guidance_embed=False)


def _longcat_image_config():
    """LongCat-Image: the Flux network with Qwen2.5-VL text input (3584, what detection keys
    LongCat on), no CLIP vector, no guidance embedding; otherwise as ``_flux_config``."""
    cfg = _flux_config()
    cfg.update(context_in_dim=LONGCAT_CTX, vec_in_dim=None, guidance_embed=False,
               txt_ids_dims=[1, 2])
    return cfg


def _wan_config(channels, layers=1):
    def config():
        """Wan text-to-video: dim 128 (one head: detection sets heads = dim / 128), FFN
        256, ``layers`` blocks, patch (1, 2, 2); 16 latent channels (2.1) or 48 (2.2
        TI2V-5B)."""
        return dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=channels,
                    dim=128, ffn_dim=256, freq_dim=256, text_dim=WAN_CTX, out_dim=channels,
                    num_heads=1, num_layers=layers, window_size=(-1, -1), qk_norm=True,
                    cross_attn_norm=True, eps=1e-6)
    return config


def _hunyuan_video_config():
    """HunyuanVideo t2v: hidden 128 (one head: detection sets heads = hidden / 128), one
    double and one single block, 3-D patch (1, 2, 2), CLIP-L vector input (768, fixed by
    detection; without it detection picks HunyuanImage 2.1), guidance embedding."""
    return dict(image_model="hunyuan_video", in_channels=16, out_channels=16,
                vec_in_dim=HYV_VEC, context_in_dim=HYV_CTX, hidden_size=128, mlp_ratio=4.0,
                num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256,
                patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False,
                meanflow=False, use_cond_type_embedding=False, vision_in_dim=None,
                meanflow_sum=False)


def _hunyuan_image21_config():
    """HunyuanImage 2.1: the HunyuanVideo network with a 2-D patch (2, 2) (detection: axes
    (64, 64)), no CLIP vector input, 64-channel latents, no guidance embedding."""
    cfg = _hunyuan_video_config()
    cfg.update(in_channels=64, out_channels=64, vec_in_dim=None, axes_dim=[64, 64],
               patch_size=[2, 2], guidance_embed=False)
    return cfg


def _hunyuan_video15_config():
    """HunyuanVideo 1.5 t2v/i2v: the HunyuanVideo network with 32-channel latents, input
    65 = 32 noise + 32 image + 1 mask, SigLIP vision input (1152, what detection keys
    HunyuanVideo 1.5 on), condition-type embedding, no CLIP vector, no guidance."""
    cfg = _hunyuan_video_config()
    cfg.update(in_channels=65, out_channels=32, vec_in_dim=None, guidance_embed=False,
               use_cond_type_embedding=True, vision_in_dim=1152, meanflow_sum=True)
    return cfg


def _ltxv_config():
    """LTXV: 32 heads of dim 4 (detection: head dim = attn2.to_k rows / 32) = inner and
    cross-attention dim 128, one transformer block, 128-channel latents."""
    return dict(in_channels=128, cross_attention_dim=128, attention_head_dim=4,
                num_attention_heads=32, caption_channels=LTXV_CTX, num_layers=1)


def _cosmos_predict2_config():
    """Cosmos Predict2 text-to-image (MiniTrainDIT): 192 channels = 16 heads (the
    constructor default; detection sets heads only for 2048/5120 channels) of dim 12,
    the smallest head the 3-D RoPE accepts.  One block: 0.33 counts blocks, 0.3.64 sets
    the count only for 2048/5120 channels and gets the constructor default of 10."""
    return dict(max_img_h=240, max_img_w=240, max_frames=128, in_channels=16,
                out_channels=16, patch_spatial=2, patch_temporal=1, concat_padding_mask=True,
                model_channels=192, num_blocks=1, num_heads=16,
                crossattn_emb_channels=COSMOS_CTX, pos_emb_cls="rope3d",
                pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1, max_fps=30,
                use_adaln_lora=True, adaln_lora_dim=256, extra_per_block_abs_pos_emb=False,
                rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0,
                rope_t_extrapolation_ratio=1.0, extra_h_extrapolation_ratio=1.0,
                extra_w_extrapolation_ratio=1.0, extra_t_extrapolation_ratio=1.0,
                rope_enable_fps_modulation=False)


def _cogvideox_config():
    """CogVideoX 1.0 t2v: 2 heads of 64 (detection: heads = dim / 64) = dim 128, one
    layer, time embedding 64, conv patch 2, rotary positions (no learned pos_embedding)."""
    return dict(num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
                time_embed_dim=64, text_embed_dim=COGVIDEOX_CTX, num_layers=1, patch_size=2,
                use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False)


def _kandinsky5_config():
    """Kandinsky 5 video: dim 128 = 2 heads of 64 (head dim = sum of the
    default RoPE axes (16, 24, 24); detection reads dims from shapes), FFN 256, time 64,
    one text and one visual block; visual input 132 = (16 noise + 16 image + 1 mask) x
    patch (1, 2, 2), Qwen2.5-VL text (3584) and CLIP-L pooled (768) inputs (constructor
    defaults)."""
    return dict(in_visual_dim=16, out_visual_dim=16, in_text_dim=KANDINSKY5_CTX,
                in_text_dim2=KANDINSKY5_POOLED, time_dim=64, model_dim=128, ff_dim=256,
                visual_embed_dim=132, patch_size=(1, 2, 2), num_text_blocks=1,
                num_visual_blocks=1)


def _krea2_config():
    """Krea 2 single-stream DiT: 128 features = one 128-dim head (detection: heads = wq rows
    / 128), one block, patch 2, 16 channels; text fusion over 2 text-encoder layers of dim
    80 (20 text heads, the constructor default: dim must divide by 20)."""
    return dict(features=128, tdim=256, txtdim=KREA2_TXT_DIM, heads=1, kvheads=1,
                multiplier=4, layers=1, patch=2, channels=16, txtlayers=KREA2_TXT_LAYERS)


# Seed configs of families that cannot be small (planned_params() measures them).

def _chroma_config():
    return dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=64,
                hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, in_dim=64,
                out_dim=128, hidden_dim=128, n_layers=1, txt_ids_dims=[], vec_in_dim=None)


def _lumina2_config():
    return dict(patch_size=2, in_channels=16, dim=2304, n_layers=1, n_heads=24, n_kv_heads=8,
                qk_norm=True, cap_feat_dim=64, axes_dims=[32, 32, 32],
                axes_lens=[300, 512, 512])


def _z_image_config():
    return dict(patch_size=2, in_channels=16, dim=3840, n_layers=1, n_heads=30, n_kv_heads=30,
                qk_norm=True, cap_feat_dim=64, axes_dims=[32, 48, 48],
                axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                z_image_modulation=True, time_scale=1000.0)


def _qwen_image_config():
    return dict(in_channels=64, out_channels=16, num_layers=1)


def _hunyuan_dit_config():
    return dict(input_size=(16, 16), patch_size=2, in_channels=4, hidden_size=128, depth=2,
                num_heads=4)


def _auraflow_config():
    return dict(in_channels=4, out_channels=4, patch_size=2, dim=128, n_layers=2,
                n_double_layers=1, n_heads=2, global_conddim=128, cond_seq_dim=2048,
                max_seq=64)


_SPECS = {
    "sd15": _Spec(UNET, tiny_models.sd15_unet_config, "SD15"),
    "sd20_v": _Spec(UNET, tiny_models.sd20_unet_config, "SD20", extra_keys=_sd2_vpred_marker),
    "sd3": _Spec("comfy.ldm.modules.diffusionmodules.mmdit:MMDiT",
                 tiny_models.sd3_mmdit_config, "SD3"),
    "flux": _Spec(FLUX_NET, _flux_config, "Flux", params_cls=FLUX_PARAMS),
    "flux_schnell": _Spec(FLUX_NET, _flux_schnell_config, "FluxSchnell",
                          params_cls=FLUX_PARAMS),
    "flux2": _Spec(FLUX_NET, _flux2_config, "Flux2", params_cls=FLUX_PARAMS),
    "longcat_image": _Spec(FLUX_NET, _longcat_image_config, "LongCatImage",
                           params_cls=FLUX_PARAMS),
    "wan21_t2v": _Spec("comfy.ldm.wan.model:WanModel", _wan_config(16), "WAN21_T2V"),
    "wan22_ti2v": _Spec("comfy.ldm.wan.model:WanModel", _wan_config(48), "WAN22_T2V"),
    # two blocks (the video test's model; not in FAMILIES)
    "wan21_t2v_2": _Spec("comfy.ldm.wan.model:WanModel", _wan_config(16, layers=2),
                         "WAN21_T2V"),
    "hunyuan_video": _Spec(HYV_NET, _hunyuan_video_config, "HunyuanVideo",
                           params_cls=HYV_PARAMS),
    "hunyuan_image21": _Spec(HYV_NET, _hunyuan_image21_config, "HunyuanImage21",
                             params_cls=HYV_PARAMS),
    "hunyuan_video15": _Spec(HYV_NET, _hunyuan_video15_config, "HunyuanVideo15",
                             params_cls=HYV_PARAMS),
    "ltxv": _Spec("comfy.ldm.lightricks.model:LTXVModel", _ltxv_config, "LTXV"),
    "cosmos_predict2": _Spec("comfy.ldm.cosmos.predict2:MiniTrainDIT", _cosmos_predict2_config,
                             "CosmosT2IPredict2"),
    "cogvideox": _Spec("comfy.ldm.cogvideo.model:CogVideoXTransformer3DModel",
                       _cogvideox_config, "CogVideoX_T2V"),
    "kandinsky5": _Spec("comfy.ldm.kandinsky5.model:Kandinsky5", _kandinsky5_config,
                        "Kandinsky5"),
    "krea2": _Spec("comfy.ldm.krea2.model:SingleStreamDiT", _krea2_config, "Krea2"),
    # larger than MAX_PARAMS
    "sdxl": _Spec(UNET, _sdxl_config, "KOALA_700M", max_params=80_000_000),
    # not small (kept for planned_params(), not in FAMILIES)
    "chroma": _Spec("comfy.ldm.chroma.model:Chroma", _chroma_config, "Chroma",
                    params_cls="comfy.ldm.chroma.model:ChromaParams"),
    "lumina2": _Spec("comfy.ldm.lumina.model:NextDiT", _lumina2_config, "Lumina2"),
    "z_image": _Spec("comfy.ldm.lumina.model:NextDiT", _z_image_config, "ZImage"),
    "qwen_image": _Spec("comfy.ldm.qwen_image.model:QwenImageTransformer2DModel",
                        _qwen_image_config, "QwenImage"),
    "hunyuan_dit": _Spec("comfy.ldm.hydit.models:HunYuanDiT", _hunyuan_dit_config,
                         "HunyuanDiT"),
    "auraflow": _Spec("comfy.ldm.aura.mmdit:MMDiT", _auraflow_config, "AuraFlow"),
}


# ComfyUI's forward of these families adds residuals in place (``img += ...``): plain
# autograd fails ("modified by an inplace operation"); back-propagate with gradient
# checkpointing (saved-tensor hooks), as ComfyUI's and this pack's trainers do by default.
def _family(name, latent_shape, cond, base_model, model_type, note=""):
    return Family(name=name, build=functools.partial(_build, name), latent_shape=latent_shape,
                  cond=cond, available=functools.partial(_available, name),
                  model_config=_SPECS[name].model_config,
                  base_model=base_model, model_type=model_type, note=note)


FAMILIES = collections.OrderedDict((f.name, f) for f in [
    _family("sd15", (1, 4, 8, 8), _cond(SD15_CTX, tokens=77), "BaseModel", "EPS"),
    _family("sd20_v", (1, 4, 8, 8), _cond(SD20_CTX, tokens=77), "BaseModel", "V_PREDICTION",
            note="v-prediction through a marker key (see _sd2_vpred_marker); loading logs "
                 "'unet unexpected' for it"),
    _family("sd3", (1, 16, 16, 16), _cond(SD3_CTX, pooled_output=SD3_POOLED), "SD3", "FLOW",
            note="latent H, W <= 16 (pos_embed_max_size 8, patch 2)"),
    _family("flux", (1, 16, 8, 8), _cond(FLUX_CTX, pooled_output=FLUX_VEC, guidance=3.5),
            "Flux", "FLUX", note="small where detection reads hidden size from img_in (0.33, "
                                 "not 0.3.64)"),
    _family("flux_schnell", (1, 16, 8, 8), _cond(FLUX_CTX, pooled_output=FLUX_VEC), "Flux",
            "FLOW"),
    _family("flux2", (1, 128, 4, 4), _cond(FLUX2_CTX, guidance=4.0), "Flux2", "FLUX",
            note="Flux2.extra_conds pads the text to 512 tokens"),
    _family("longcat_image", (1, 16, 8, 8), _cond(LONGCAT_CTX), "LongCatImage", "FLUX"),
    _family("wan21_t2v", (1, 16, 1, 8, 8), _cond(WAN_CTX), "WAN21", "FLOW"),
    _family("wan22_ti2v", (1, 48, 1, 8, 8), _cond(WAN_CTX), "WAN22", "FLOW"),
    _family("hunyuan_video", (1, 16, 1, 8, 8),
            _cond(HYV_CTX, pooled_output=HYV_VEC, guidance=6.0), "HunyuanVideo", "FLOW"),
    _family("hunyuan_image21", (1, 64, 8, 8), _cond(HYV_CTX), "HunyuanImage21", "FLOW"),
    _family("hunyuan_video15", (1, 32, 1, 8, 8), _cond(HYV_CTX, pooled_output=None),
            "HunyuanVideo15", "FLOW", note="vision_in and cond_type_embedding "
                                                    "get no gradient without an image"),
    _family("ltxv", (1, 128, 1, 4, 4), _cond(LTXV_CTX, mask=True), "LTXV", "FLUX"),
    _family("cosmos_predict2", (1, 16, 1, 8, 8), _cond(COSMOS_CTX), "CosmosPredict2",
            "FLOW_COSMOS"),
    _family("cogvideox", (1, 16, 1, 8, 8), _cond(COGVIDEOX_CTX), "CogVideoX",
            "V_PREDICTION_DDPM"),
    _family("kandinsky5", (1, 16, 1, 8, 8),
            _cond(KANDINSKY5_CTX, pooled_output=KANDINSKY5_POOLED), "Kandinsky5", "FLOW"),
    _family("krea2", (1, 16, 1, 8, 8), _cond(KREA2_TXT_LAYERS * KREA2_TXT_DIM), "Krea2",
            "FLUX"),
])

LARGE_FAMILIES = collections.OrderedDict((f.name, f) for f in [
    _family("sdxl", (1, 4, 8, 8), _cond(SDXL_CTX, tokens=77, pooled_output=SDXL_POOLED),
            "SDXL", "EPS", note="KOALA-700M layout, ~61M parameters (see NOT_SMALL['sdxl'])"),
])

# Families that cannot be built small (parameter counts: planned_params() on ComfyUI
# 0.3.64 / 0.33.0 for the smallest seed network that detection maps to the family).
NOT_SMALL = {
    "sdxl": "SDXL detection (SDXL, SSD1B, Segmind_Vega, KOALA_*) fixes model_channels 320, "
            "context 2048, adm 2816 and the per-block input transformer depths; the smallest "
            "accepted layout (KOALA-700M: depths [0, 2, 5], channel_mult 1, no output/middle "
            "transformers) has 60.6M parameters; available as LARGE_FAMILIES['sdxl']",
    "chroma": "detection hard-codes the distilled-guidance approximator (5 layers of width "
              "5120, output 3072): 279M parameters with one double + one single block on "
              "0.33 (hidden read from img_in), 631M on 0.3.64 (hidden fixed at 3072); "
              "Chroma Radiance shares the approximator",
    "lumina2": "0.3.64 fixes dim 2304 / 24 heads; 0.33 reads dim from cap_embedder but sets "
               "heads and RoPE axes only for 2304 (Lumina 2) and 3840 (Z-Image), other dims "
               "get 32 heads and 128-dim axes, so NextDiT's dim // n_heads == sum(axes_dims) "
               "forces dim 4096; one layer + the 2 + 2 refiner layers: 422M",
    "z_image": "detected by dim 3840 (30 heads): 899M with one layer + refiners; 0.3.64 has "
               "no Z-Image",
    "qwen_image": "detection reads only in_channels and the block count; the 24 x 128-dim "
                  "heads (inner 3072) and the 3584 text input are constructor defaults: 380M "
                  "with one block",
    "hunyuan_dit": "text inputs are constructor defaults, not detected: the mT5 MLP "
                   "(2048 -> 8192 -> 1024) and a 2048-dim attention pooler alone are ~40M; "
                   "42M with hidden 128, depth 2 (it would be the V_PREDICTION DiT)",
    "pixart": "detection fixes hidden 1152 / 16 heads, T5 caption input 4096: 37M with one "
              "block (and PixArtMS cannot be built on the meta device)",
    "auraflow": "supported_models.AuraFlow requires cond_seq_dim 2048 and dim / "
                "global_conddim 3072 are constructor defaults: 545M with one double + one "
                "single layer",
    "hidream": "detection hard-codes the whole config (16 double + 32 single MoE layers, "
               "20 x 128-dim heads, 4096-dim Llama/T5 inputs): billions of parameters",
    "mochi": "detection hard-codes depth 48, hidden 3072 / 1536: ~10B",
    "omnigen2": "detection hard-codes hidden 2520, 32 layers, 21 heads: ~4B",
    "cosmos_1": "Cosmos 1.0 detection sets 28 blocks x 32 heads (4096 channels) or 36 x 40 "
                "(anything else), i.e. the 7B / 14B layouts",
    "stable_cascade": "stage C/B detection fixes c_hidden, heads and block counts of the "
                      "released models (stage C 1536 / 2048 wide, stage B 576 / 640 "
                      "at level 2): 0.7B and up",
}


def tiny_flux_from_config(seed=0):
    """The tiny Flux of ``FAMILIES['flux']`` for a ComfyUI whose detection fixes Flux's full
    size (0.3.64 builds 543M parameters from any Flux state dict): ComfyUI's own
    ``supported_models.Flux`` given the tiny config, its ``model_base.Flux`` and a
    ``ModelPatcher``, loaded with seeded weights; only detection is skipped. Call it under
    ``torch.inference_mode()``, as the loaders run."""
    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.supported_models

    spec = _SPECS["flux"]
    config = _accepted(_import(spec.net), spec.config(), spec.params_cls)
    model_config = comfy.supported_models.Flux(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    sd = _fill_state_dict(model.diffusion_model, seed)
    _fix_norms(sd)
    model.diffusion_model.load_state_dict(sd)
    return comfy.model_patcher.ModelPatcher(
        model, comfy.model_management.get_torch_device(),
        comfy.model_management.unet_offload_device())
