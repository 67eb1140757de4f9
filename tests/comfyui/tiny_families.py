"""Tiny, randomly initialised but *real* ComfyUI diffusion models, one per model family.

Like ``tiny_models.py`` (and reusing its ``_fill_state_dict`` / ``_load``), every family
is built from ComfyUI's own network class and loaded through ComfyUI's normal path
``comfy.sd.load_diffusion_model_state_dict(sd)``, so ``comfy/model_detection.py``,
``comfy/supported_models.py``, the ``BaseModel`` subclass and the ``ModelPatcher`` are
all the genuine ones for the running ComfyUI version.

How a family is built (``_plan`` / ``_build``):

1. A *seed* network: ComfyUI's network class for the family, instantiated on the
   ``meta`` device with a small config (only arguments the running version's class
   accepts are passed).  Its state-dict keys/shapes are the family's checkpoint layout.
2. ComfyUI's detection is run on those (meta) keys/shapes
   (``model_detection.model_config_from_unet``); the detected ``supported_models`` class
   must be the family's, else the family is unavailable in this ComfyUI version.
3. The network ComfyUI itself would build from the detected config is instantiated on
   ``meta`` (``model_config.get_model``).  Sizes that detection hard-codes (rather than
   reading them from weight shapes) show up here; if that network is not small
   (``MAX_PARAMS``) the family is unavailable in this version, with the reason.
4. That network's keys/shapes are filled with seeded small random values (plus any
   marker keys detection needs, see SD2 v-prediction) and loaded for real.

API:

``FAMILIES``: ``OrderedDict`` name -> ``Family`` with
    ``build(seed=0) -> ModelPatcher`` (call it under ``torch.inference_mode()``, as
    ComfyUI's loaders do), ``latent_shape`` (batch 1, e.g. ``(1, 4, 8, 8)`` or
    ``(1, 16, 1, 8, 8)`` for video), ``cond(seed=0) -> CONDITIONING list`` (whatever the
    family's ``extra_conds`` need for ``BaseModel.apply_model`` to run),
    ``available() -> str | None`` (None when the running ComfyUI has the family and it
    builds small, else a skip reason), and the expected ``model_config`` class name
    (``comfy.supported_models``), ``base_model`` class name (``comfy.model_base``) and
    ``model_type`` (``ModelType`` name).
``NOT_SMALL``: family name -> why it cannot be built small in any ComfyUI version here.

Only import ComfyUI lazily (inside functions): this module is imported by pytest only
when COMFYUI_DIR is set (see conftest.py).
"""
import collections
import dataclasses
import functools
import inspect
from typing import Callable, Optional

from tiny_models import _fill_state_dict, _load
import tiny_models

# A family is "small" when the network ComfyUI builds for it has at most this many
# parameters (the tiny SD1.x UNet, whose detection fixes 320 channels, is ~16M).
MAX_PARAMS = 20_000_000


# --------------------------------------------------------------------------------------
# Generic machinery
# --------------------------------------------------------------------------------------

class Unavailable(Exception):
    """The running ComfyUI cannot build this family small (message = the reason)."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How to build one family.

    net: ``"module:Class"`` of ComfyUI's network class for the seed network.
    config: callable ``(cls) -> dict`` of constructor arguments for the seed network
        (arguments the running version's class does not accept are dropped).
    params_cls: ``"module:Class"`` of the dataclass some networks (Flux, HunyuanVideo)
        build from ``**kwargs``; its fields decide which arguments are accepted.
    model_config: expected ``comfy.supported_models`` class name after detection.
    extra_keys: callable ``(torch.Generator) -> dict`` of extra state-dict entries that
        are not weights of the network but that detection reads.
    """
    net: str
    config: Callable
    model_config: str
    params_cls: Optional[str] = None
    extra_keys: Optional[Callable] = None


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    build: Callable            # (seed=0) -> comfy.model_patcher.ModelPatcher
    latent_shape: tuple        # batch 1, (1, C, H, W) or (1, C, T, H, W)
    cond: Callable             # (seed=0) -> CONDITIONING list [[cross_attn, {...}]]
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


def _meta_state_dict(net):
    """{key: meta tensor} of a meta network (keys and shapes are all detection needs)."""
    return dict(net.state_dict())


def _comfy_version():
    try:
        import comfyui_version
        return comfyui_version.__version__
    except Exception:  # pragma: no cover - very old checkouts
        return "?"


def _count(sd):
    import math

    return sum(math.prod(t.shape) for t in sd.values())


@functools.lru_cache(maxsize=None)
def _plan(name):
    """Dry run on ``meta`` (no weights): returns the state-dict layout ComfyUI will load
    for family ``name`` as ``{key: meta tensor}``; raises ``Unavailable``."""
    import torch
    import comfy.ops
    import comfy.model_detection
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
    config = _accepted(cls, spec.config(cls), spec.params_cls)
    try:
        with torch.device("meta"):
            seed_net = cls(**config, operations=comfy.ops.disable_weight_init)
    except Exception as e:
        raise Unavailable(f"ComfyUI {version}'s {spec.net} cannot build the tiny {name} "
                          f"config: {type(e).__name__}: {e}")
    seed_sd = _meta_state_dict(seed_net)
    del seed_net

    model_config = comfy.model_detection.model_config_from_unet(dict(seed_sd), "")
    found = type(model_config).__name__ if model_config is not None else None
    if found != spec.model_config:
        raise Unavailable(f"ComfyUI {version} detects the tiny {name} state dict as "
                          f"{found} (no {spec.model_config} detection for it)")

    # The network ComfyUI itself builds from the detected config.
    base = model_config.get_model({}, "", device=torch.device("meta"))
    sd = _meta_state_dict(base.diffusion_model)
    del base
    n = _count(sd)
    if n > MAX_PARAMS:
        fixed = sorted(k for k in set(seed_sd) | set(sd)
                       if k not in seed_sd or k not in sd or seed_sd[k].shape != sd[k].shape)
        raise Unavailable(f"ComfyUI {version} builds {n / 1e6:.0f}M parameters for the tiny "
                          f"{name} state dict (detection hard-codes sizes; e.g. {fixed[:3]})")
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

    class _Layout(torch.nn.Module):  # _fill_state_dict only needs .state_dict()
        def state_dict(self):
            return layout

    sd = _fill_state_dict(_Layout(), seed)
    _fix_norms(sd, layout)
    if spec.extra_keys is not None:
        sd.update(spec.extra_keys(torch.Generator().manual_seed(seed + 1)))
    return _load(sd)


def _fix_norms(sd, layout):
    """Norm scales that ``_fill_state_dict`` does not recognise (``.scale`` params,
    ``q_norm`` / ``norm_q`` style names) start near 1 like a trained norm."""
    for k, v in sd.items():
        parts = k.split(".")
        leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
        if v.ndim == 1 and leaf in ("weight", "scale") and "norm" in parent and v.mean() < 0.5:
            sd[k] = v + 1.0


# --------------------------------------------------------------------------------------
# Conditioning helpers
# --------------------------------------------------------------------------------------

def _randn(g, *shape):
    import torch

    return torch.randn(*shape, generator=g)


def _cond(ctx_dim, tokens=8, **extra):
    """CONDITIONING factory: ``[[cross_attn [1,tokens,ctx_dim], extras]]``; ``extra``
    values that are ints are the size of a random vector ``[1, n]``
    (e.g. ``pooled_output=768``), others are used as they are."""
    def cond(seed=0):
        import torch

        g = torch.Generator().manual_seed(seed)
        opts = {}
        for k, v in extra.items():
            opts[k] = _randn(g, 1, v) if isinstance(v, int) and not isinstance(v, bool) else v
        return [[_randn(g, 1, tokens, ctx_dim), opts]]
    return cond


# --------------------------------------------------------------------------------------
# Family configs (seed networks)
# --------------------------------------------------------------------------------------

UNET = "comfy.ldm.modules.diffusionmodules.openaimodel:UNetModel"

SD15_CTX = tiny_models.SD15_CONTEXT_DIM      # 768, fixed by supported_models.SD15
SD20_CTX = tiny_models.SD20_CONTEXT_DIM      # 1024, fixed by supported_models.SD20
SDXL_CTX = 2048                              # fixed by supported_models.SDXL & co.
SDXL_POOLED = 1280                           # adm 2816 = 1280 pooled + 6 * 256 size embeds
SD3_CTX, SD3_POOLED = tiny_models.SD3_CONTEXT_DIM, tiny_models.SD3_POOLED_DIM

FLUX_CTX = 64           # Flux txt_in input (real: 4096 T5), read from txt_in.weight
FLUX_VEC = 32           # Flux vector_in input (real: 768 CLIP-L pooled), read from shape
WAN_CTX = 4096          # WanModel text_dim is a constructor default, not detected
HYV_CTX = 64            # HunyuanVideo txt_in input (real: 4096), read from shape
HYV_VEC = 768           # HunyuanVideo vec_in_dim, fixed by detection
FLUX2_CTX = 64          # Flux 2 txt_in input (real: 15360 Mistral), read from shape
LTXV_CTX = 4096         # LTXV caption_channels (T5-XXL) is a constructor default
COSMOS_CTX = 1024       # Cosmos Predict2 crossattn_emb_channels, fixed by detection


def _sd2_vpred_marker(g):
    """SD20.model_type() reports V_PREDICTION when the state dict has
    ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` with std > 0.09 (a 12-output-
    block SD2 UNet at 320 channels would be ~100M params), so the tiny SD2 UNet carries
    just that one key: detection reads it, loading ignores it ("unet unexpected")."""
    import torch

    return {"output_blocks.11.1.transformer_blocks.0.norm1.bias":
            torch.randn(320, generator=g) * 0.5}


def _sdxl_config(cls):
    """KOALA-700M-shaped SDXL UNet (supported_models.KOALA_700M, model_base.SDXL):
    detection fixes model_channels=320, context 2048, adm 2816 and the input transformer
    depths [0, 2, 5]; channel_mult, output/middle depths are free (kept minimal)."""
    return dict(in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1, 1],
                channel_mult=[1, 1, 1], transformer_depth=[0, 2, 5],
                transformer_depth_output=[0, 0, 0, 0, 0, 0], transformer_depth_middle=-2,
                context_dim=SDXL_CTX, adm_in_channels=2816, num_classes="sequential",
                num_heads=-1, num_head_channels=64, use_spatial_transformer=True,
                use_linear_in_transformer=True, legacy=False, use_checkpoint=False, image_size=32)


def _flux_config(cls):
    """Flux dev: hidden 128 (one 128-dim head: detection sets heads = hidden / sum(axes_dim)
    = 128 / 128), one double + one single block, 16-channel latents, guidance embed."""
    return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=FLUX_VEC,
                context_in_dim=FLUX_CTX, hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1,
                depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                qkv_bias=True, guidance_embed=True, txt_ids_dims=[])


def _flux2_config(cls):
    """Flux 2: hidden 128 (one head, axes 4 x 32), 128-channel patch-1 latents, global
    modulation, no bias, guidance embed."""
    return dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                context_in_dim=FLUX2_CTX, hidden_size=128, mlp_ratio=3.0, num_heads=1, depth=1,
                depth_single_blocks=1, axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1,
                qkv_bias=False, guidance_embed=True, txt_ids_dims=[3], global_modulation=True,
                mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                ref_index_scale=10.0)


def _wan_config(out_dim):
    def config(cls):
        """Wan text-to-video: dim 128 (one head, detection: heads = dim / 128), one block."""
        return dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=out_dim,
                    dim=128, ffn_dim=256, freq_dim=256, text_dim=WAN_CTX, out_dim=out_dim,
                    num_heads=1, num_layers=1, window_size=(-1, -1), qk_norm=True,
                    cross_attn_norm=True, eps=1e-6)
    return config


def _hunyuan_video_config(cls):
    """HunyuanVideo t2v: hidden 128 (one head: detection heads = hidden / 128), one double
    and one single block, 3-D patch (1, 2, 2), CLIP-L vector input, guidance embed."""
    return dict(image_model="hunyuan_video", in_channels=16, out_channels=16,
                vec_in_dim=HYV_VEC, context_in_dim=HYV_CTX, hidden_size=128, mlp_ratio=4.0,
                num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256,
                patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False,
                meanflow=False, use_cond_type_embedding=False, vision_in_dim=None,
                meanflow_sum=False)


def _ltxv_config(cls):
    """LTXV: 32 heads of dim 4 (detection: head dim = attn2.to_k rows / 32), inner and
    cross-attention dim 128, one transformer block, 128-channel latents; the caption
    projection input (4096, T5-XXL) is a constructor default, not detected."""
    return dict(in_channels=128, cross_attention_dim=128, attention_head_dim=4,
                num_attention_heads=32, caption_channels=LTXV_CTX, num_layers=1)


def _cosmos_predict2_config(cls):
    """Cosmos Predict2 text-to-image (MiniTrainDIT): 192 model channels, one block
    (ComfyUI 0.3.64's detection hard-codes 28/36 blocks for 2048/5120 channels only and
    leaves the constructor default of 10 blocks otherwise; 0.33 counts them), 16 heads,
    head dim 12 (the 3-D RoPE needs head dim >= 12: 16 heads are not detected), cross-
    attention input 1024 (fixed by detection)."""
    return dict(max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
                patch_spatial=2, patch_temporal=1, concat_padding_mask=True, model_channels=192,
                num_blocks=1, num_heads=16, crossattn_emb_channels=COSMOS_CTX,
                pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop",
                min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=256,
                extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0,
                rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0,
                extra_h_extrapolation_ratio=1.0, extra_w_extrapolation_ratio=1.0,
                extra_t_extrapolation_ratio=1.0, rope_enable_fps_modulation=False)


def _hunyuan_image21_config(cls):
    """HunyuanImage 2.1: a HunyuanVideo network with a 2-D patch (2, 2) (detection: axes
    (64, 64), heads = hidden / 128), no CLIP vector input, 64-channel latents."""
    cfg = _hunyuan_video_config(cls)
    cfg.update(in_channels=64, out_channels=64, vec_in_dim=None, axes_dim=[64, 64],
               patch_size=[2, 2], guidance_embed=False)
    return cfg


_SPECS = {
    "sd15": _Spec(UNET, lambda cls: tiny_models.sd15_unet_config(), "SD15"),
    "sd20_v": _Spec(UNET, lambda cls: tiny_models.sd20_unet_config(), "SD20",
                    extra_keys=_sd2_vpred_marker),
    "sdxl": _Spec(UNET, _sdxl_config, "KOALA_700M"),
    "sd3": _Spec("comfy.ldm.modules.diffusionmodules.mmdit:MMDiT",
                 lambda cls: tiny_models.sd3_mmdit_config(), "SD3"),
    "flux": _Spec("comfy.ldm.flux.model:Flux", _flux_config, "Flux",
                  params_cls="comfy.ldm.flux.model:FluxParams"),
    "flux2": _Spec("comfy.ldm.flux.model:Flux", _flux2_config, "Flux2",
                   params_cls="comfy.ldm.flux.model:FluxParams"),
    "wan21_t2v": _Spec("comfy.ldm.wan.model:WanModel", _wan_config(16), "WAN21_T2V"),
    "wan22_ti2v": _Spec("comfy.ldm.wan.model:WanModel", _wan_config(48), "WAN22_T2V"),
    "hunyuan_video": _Spec("comfy.ldm.hunyuan_video.model:HunyuanVideo", _hunyuan_video_config,
                           "HunyuanVideo",
                           params_cls="comfy.ldm.hunyuan_video.model:HunyuanVideoParams"),
    "ltxv": _Spec("comfy.ldm.lightricks.model:LTXVModel", _ltxv_config, "LTXV"),
    "cosmos_predict2": _Spec("comfy.ldm.cosmos.predict2:MiniTrainDIT", _cosmos_predict2_config,
                             "CosmosT2IPredict2"),
    "hunyuan_image21": _Spec("comfy.ldm.hunyuan_video.model:HunyuanVideo",
                             _hunyuan_image21_config, "HunyuanImage21",
                             params_cls="comfy.ldm.hunyuan_video.model:HunyuanVideoParams"),
}


def _family(name, latent_shape, cond, base_model, model_type, note=""):
    return Family(name=name, build=functools.partial(_build, name), latent_shape=latent_shape,
                  cond=cond, available=functools.partial(_available, name),
                  model_config=_SPECS[name].model_config, base_model=base_model,
                  model_type=model_type, note=note)


FAMILIES = collections.OrderedDict((f.name, f) for f in [
    _family("sd15", (1, 4, 8, 8), _cond(SD15_CTX, tokens=77), "BaseModel", "EPS"),
    _family("sd20_v", (1, 4, 8, 8), _cond(SD20_CTX, tokens=77), "BaseModel", "V_PREDICTION",
            note="v-prediction via a marker key, see _sd2_vpred_marker"),
    _family("sdxl", (1, 4, 8, 8), _cond(SDXL_CTX, tokens=77, pooled_output=SDXL_POOLED),
            "SDXL", "EPS", note="KOALA-700M layout; SDXL detection fixes 320 channels"),
    _family("sd3", (1, 16, 16, 16), _cond(SD3_CTX, pooled_output=SD3_POOLED), "SD3", "FLOW"),
    _family("flux", (1, 16, 8, 8), _cond(FLUX_CTX, pooled_output=FLUX_VEC, guidance=3.5),
            "Flux", "FLUX"),
    _family("flux2", (1, 128, 4, 4), _cond(FLUX2_CTX, guidance=4.0), "Flux2", "FLUX"),
    _family("wan21_t2v", (1, 16, 1, 8, 8), _cond(WAN_CTX), "WAN21", "FLOW"),
    _family("wan22_ti2v", (1, 48, 1, 8, 8), _cond(WAN_CTX), "WAN22", "FLOW"),
    _family("hunyuan_video", (1, 16, 1, 8, 8),
            _cond(HYV_CTX, pooled_output=HYV_VEC, guidance=6.0), "HunyuanVideo", "FLOW"),
    _family("ltxv", (1, 128, 1, 4, 4), _cond(LTXV_CTX), "LTXV", "FLUX"),
    _family("cosmos_predict2", (1, 16, 1, 8, 8), _cond(COSMOS_CTX), "CosmosPredict2",
            "FLOW_COSMOS"),
    _family("hunyuan_image21", (1, 64, 8, 8), _cond(HYV_CTX), "HunyuanImage21", "FLOW"),
])

NOT_SMALL = {}
