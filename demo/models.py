"""Two small diffusion networks shaped like the families LoRA Lab trains.

- :class:`TinyUNet`: an SD1.x-like eps UNet (res blocks with conv + timestep embedding,
  attention blocks with 1x1 ``proj_in``/``proj_out``, self- and cross-attention, MLP).
- :class:`TinyDiT`: an SD3-like flow transformer (patch embedding, adaLN-modulated blocks with
  self-attention over image tokens, cross-attention to the context, MLP).

Both take ``(x, timestep, context)`` and return a tensor shaped like ``x``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None = None, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        split = lambda t: t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads)
        self.attn2 = Attention(dim, context_dim, heads=heads)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, channels)
        self.norm2 = nn.GroupNorm(8, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, context_dim: int, heads: int, depth: int = 1) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, context_dim, heads) for _ in range(depth))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.blocks:
            t = block(t, context)
        return x + self.proj_out(t.transpose(1, 2).reshape(b, c, h, w))


class TinyUNet(nn.Module):
    """``levels`` resolutions of ``channels * mult`` channels, each a res + attention block."""

    def __init__(
        self, in_channels: int = 4, channels: int = 32, context_dim: int = 32,
        mults: tuple[int, ...] = (1, 2), heads: int = 4, depth: int = 1,
    ) -> None:
        super().__init__()
        emb_dim = channels * 4
        self.channels = channels
        self.time_embed = nn.Sequential(
            nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, channels * mults[0], 3, padding=1)
        self.down_res, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        widths = [channels * m for m in mults]
        for i, width in enumerate(widths):
            self.down_res.append(ResBlock(width, emb_dim))
            self.down_attn.append(SpatialTransformer(width, context_dim, heads, depth))
            nxt = widths[min(i + 1, len(widths) - 1)]
            self.downsample.append(
                nn.Conv2d(width, nxt, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity())
        self.mid_res = ResBlock(widths[-1], emb_dim)
        self.mid_attn = SpatialTransformer(widths[-1], context_dim, heads, depth)
        self.up_res, self.up_attn, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(widths))):
            width = widths[i]
            self.upsample.append(
                nn.Conv2d(widths[i + 1], width, 3, padding=1) if i < len(widths) - 1 else nn.Identity())
            self.up_res.append(ResBlock(width, emb_dim))
            self.up_attn.append(SpatialTransformer(width, context_dim, heads, depth))
        self.norm_out = nn.GroupNorm(8, widths[0])
        self.conv_out = nn.Conv2d(widths[0], in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timestep, self.channels))
        h = self.conv_in(x)
        skips = []
        for res, attn, down in zip(self.down_res, self.down_attn, self.downsample):
            h = attn(res(h, emb), context)
            skips.append(h)
            h = down(h)
        h = self.mid_attn(self.mid_res(h, emb), context)
        for res, attn, up in zip(self.up_res, self.up_attn, self.upsample):
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = attn(res(h + skips.pop(), emb), context)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.adaLN = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim, heads=heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross = Attention(dim, context_dim, heads=heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(F.silu(c))[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        x = x + self.cross(self.norm2(x), context)
        return x + gate2 * self.mlp(self.norm3(x) * (1 + scale2) + shift2)


class TinyDiT(nn.Module):
    def __init__(
        self, in_channels: int = 4, dim: int = 64, depth: int = 2, heads: int = 4,
        context_dim: int = 32, patch: int = 2,
    ) -> None:
        super().__init__()
        self.patch, self.dim = patch, dim
        self.x_embedder = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.t_embedder = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.context_embedder = nn.Linear(context_dim, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.final = nn.Linear(dim, patch * patch * in_channels)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = x.shape
        p = self.patch
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)
        gh, gw = h // p, w // p
        pos = timestep_embedding(torch.arange(gh * gw, device=x.device), self.dim)
        tokens = tokens + pos[None].to(tokens.dtype)
        c = self.t_embedder(timestep_embedding(timestep, self.dim))
        ctx = self.context_embedder(context)
        for block in self.blocks:
            tokens = block(tokens, c, ctx)
        out = self.final(self.norm_out(tokens))
        out = out.reshape(b, gh, gw, ch, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, ch, h, w)
