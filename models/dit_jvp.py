"""The DiT's x head and its forward-mode derivative, written out as one plain forward pass.

torch.func.jvp cannot take the fused attention kernels, and torch.compile refuses an
autograd.Function with a custom jvp. So the tangent pass is written by hand: every layer maps
(value, tangent) to (value, tangent), attention uses fused SDPA for the value and the forward-only
tangent kernel of models.jvp_attention for the tangent (an opaque custom op to torch.compile).
The result is ordinary torch code that autocast and torch.compile take whole. Only the x head is
run: the mean-flow tangent du/dt needs u, not v (torch.func.jvp through the model also pushes
tangents through the v head, then drops them).

tests/models/test_dit_jvp.py checks it against torch.func.jvp of the math-attention model in float64.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.dit import TIME_FREQUENCIES, Block, FinalLayer, TrajectoryDiT
from models.jvp_attention import attention_tangent_op

Dual = tuple[Tensor, Tensor]


def _linear(layer: nn.Linear, x: Dual) -> Dual:
    return layer(x[0]), F.linear(x[1], layer.weight)


def _silu(x: Dual) -> Dual:
    sig = torch.sigmoid(x[0])
    return x[0] * sig, x[1] * sig * (1 + x[0] * (1 - sig))


def _gelu_tanh(x: Dual) -> Dual:
    a, da = x
    k = math.sqrt(2.0 / math.pi)
    inner = k * (a + 0.044715 * a ** 3)
    th = torch.tanh(inner)
    slope = 0.5 * (1 + th) + 0.5 * a * (1 - th * th) * k * (1 + 3 * 0.044715 * a * a)
    return 0.5 * a * (1 + th), da * slope


def _layer_norm(norm: nn.LayerNorm, x: Dual) -> Dual:
    """Affine-free LayerNorm: y = (x - mean) / s, dy = (dx - mean(dx) - y mean(y dx)) / s."""
    value, tangent = x
    y = norm(value)
    work = torch.promote_types(value.dtype, torch.float32)   # statistics in fp32 at least, as the kernel
    v32 = value.to(work)
    inv = torch.rsqrt(v32.var(-1, unbiased=False, keepdim=True) + norm.eps)
    y32, t32 = (v32 - v32.mean(-1, keepdim=True)) * inv, tangent.to(work)
    dy = (t32 - t32.mean(-1, keepdim=True) - y32 * (y32 * t32).mean(-1, keepdim=True)) * inv
    return y, dy.to(y.dtype)


def _modulate(x: Dual, shift: Dual, scale: Dual) -> Dual:
    value = x[0] * (1 + scale[0][:, None]) + shift[0][:, None]
    tangent = x[1] * (1 + scale[0][:, None]) + x[0] * scale[1][:, None] + shift[1][:, None]
    return value, tangent


def _chunks(x: Dual, count: int) -> list[Dual]:
    return list(zip(x[0].chunk(count, dim=-1), x[1].chunk(count, dim=-1)))


def _attention(layer, x: Dual) -> Dual:
    batch, tokens, width = x[0].shape
    qkv, dqkv = _linear(layer.qkv, x)

    def heads(t: Tensor):
        return t.view(batch, tokens, 3, layer.heads, width // layer.heads).permute(2, 0, 3, 1, 4)

    (q, k, v), (dq, dk, dv) = heads(qkv), heads(dqkv)
    mixed = F.scaled_dot_product_attention(q, k, v)
    dmixed = attention_tangent_op(q, k, v, dq, dk, dv)
    merge = [m.transpose(1, 2).reshape(batch, tokens, width) for m in (mixed, dmixed)]
    return _linear(layer.proj, (merge[0], merge[1].to(merge[0].dtype)))


def _block(block: Block, x: Dual, c: Dual) -> Dual:
    shift1, scale1, gate1, shift2, scale2, gate2 = _chunks(_linear(block.modulation[1], _silu(c)), 6)
    a = _attention(block.attn, _modulate(_layer_norm(block.norm1, x), shift1, scale1))
    x = x[0] + gate1[0][:, None] * a[0], x[1] + gate1[1][:, None] * a[0] + gate1[0][:, None] * a[1]
    hidden = _gelu_tanh(_linear(block.mlp[0], _modulate(_layer_norm(block.norm2, x), shift2, scale2)))
    m = _linear(block.mlp[2], hidden)
    return x[0] + gate2[0][:, None] * m[0], x[1] + gate2[1][:, None] * m[0] + gate2[0][:, None] * m[1]


def _final(final: FinalLayer, x: Dual, c: Dual) -> Dual:
    shift, scale = _chunks(_linear(final.modulation[1], _silu(c)), 2)
    return _linear(final.linear, _modulate(_layer_norm(final.norm, x), shift, scale))


def _time_embedding(h: Tensor, dh: Tensor, dtype: torch.dtype, dim: int = TIME_FREQUENCIES,
                    max_period: float = 10000.0) -> Dual:
    """models.dit.timestep_embedding and its derivative in h."""
    work = torch.float64 if h.dtype == torch.float64 else torch.float32
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=h.device, dtype=work) / half)
    rate = 1000.0 * frequencies[None]
    angles = rate * h.to(work)[:, None]
    value = torch.cat([angles.cos(), angles.sin()], dim=-1)
    tangent = torch.cat([-angles.sin(), angles.cos()], dim=-1) * torch.cat([rate, rate], dim=-1) * dh.to(work)[:, None]
    return value.to(dtype), tangent.to(dtype)


def x_head_jvp(model: TrajectoryDiT, z: Tensor, h: Tensor, cond: Tensor, label: Tensor, level: Tensor,
               dz: Tensor, dh: Tensor) -> Dual:
    """(x_hat, d x_hat) for the tangent (dz, dh) of (z, h); cond, label and level are held fixed."""
    token_dim = model.config.token_dim
    tokens = (model.fuse(torch.cat([z, cond], dim=-1)) + model.position,
              F.linear(dz, model.fuse.weight[:, :token_dim]))
    time = _time_embedding(h, dh, model.h_embed[0].weight.dtype)
    inner = _linear(model.h_embed[2], _silu(_linear(model.h_embed[0], time)))
    c = (inner[0] + model.class_embed(label) + model.level_embed(level), inner[1])
    for block in model.trunk:
        tokens = _block(block, tokens, c)
    for block in model.x_blocks:
        tokens = _block(block, tokens, c)
    return _final(model.x_final, tokens, c)


def average_velocity_jvp(model: TrajectoryDiT, z: Tensor, t: Tensor, r: Tensor, cond: Tensor, label: Tensor,
                         level: Tensor, dz: Tensor, dt: Tensor, dr: Tensor, t_floor: float) -> Dual:
    """(u, du) for u = (z - x_hat(z, t - r)) / max(t, t_floor), as models.meanflow.average_velocity."""
    x_hat, dx_hat = x_head_jvp(model, z, t - r, cond, label, level, dz, dt - dr)
    tc = t.clamp_min(t_floor)[:, None, None]
    dtc = torch.where(t >= t_floor, dt, torch.zeros_like(dt))[:, None, None]   # clamp_min's derivative, as autograd
    u = (z - x_hat) / tc
    return u, (dz - dx_hat) / tc - u * dtc / tc
