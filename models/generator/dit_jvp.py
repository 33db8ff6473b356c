"""The forward-mode derivative of the DiT's x head, written out, reusing the forward's own values.

torch.func.jvp cannot take the fused attention kernels, and torch.compile refuses an
autograd.Function with a custom jvp. So the tangent pass is written by hand: every layer maps a
tangent (given the layer's values) to a tangent; attention uses the forward-only tangent kernel of
models.generator.jvp_attention (an opaque custom op to torch.compile). The values come from the training
forward itself (TrajectoryDiT(..., keep_values=True)): the mean-flow tangent is taken at the very
point the loss's forward evaluates, so only tangents are computed here, plus layer-norm statistics
and the per-sample conditioning. Only the x head is run: du/dt needs u, not v.

tests/models/test_dit_jvp.py checks it against torch.func.jvp of the math-attention model in float64.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.generator.dit import (TIME_FREQUENCIES, Block, BlockValues, FinalLayer, TrajectoryDiT, XPathValues, merge_heads,
                        timestep_embedding)
from models.generator.jvp_attention import attention_tangent_op

Dual = tuple[Tensor, Tensor]


def _linear(layer: nn.Linear, x: Dual) -> Dual:
    return layer(x[0]), F.linear(x[1], layer.weight)


def _silu(x: Dual) -> Dual:
    sig = torch.sigmoid(x[0])
    return F.silu(x[0]), x[1] * sig * (1 + x[0] * (1 - sig))


def _gelu_tanh_slope(a: Tensor) -> Tensor:
    """d/da of GELU's tanh approximation."""
    k = math.sqrt(2.0 / math.pi)
    th = torch.tanh(k * (a + 0.044715 * a ** 3))
    return 0.5 * (1 + th) + 0.5 * a * (1 - th * th) * k * (1 + 3 * 0.044715 * a * a)


def _layer_norm(norm: nn.LayerNorm, value: Tensor, tangent: Tensor) -> Dual:
    """Affine-free LayerNorm y = (x - mean) / s and dy = (dx - mean(dx) - y mean(y dx)) / s, statistics
    in fp32 at least (as the kernel); y in that precision too."""
    work = torch.promote_types(value.dtype, torch.float32)
    v32, t32 = value.to(work), tangent.to(work)
    inv = torch.rsqrt(v32.var(-1, unbiased=False, keepdim=True) + norm.eps)
    y = (v32 - v32.mean(-1, keepdim=True)) * inv
    return y, (t32 - t32.mean(-1, keepdim=True) - y * (y * t32).mean(-1, keepdim=True)) * inv


def _modulated_tangent(normed: Dual, shift: Dual, scale: Dual) -> Tensor:
    """Tangent of modulate(y, shift, scale) = y (1 + scale) + shift."""
    return normed[1] * (1 + scale[0][:, None]) + normed[0] * scale[1][:, None] + shift[1][:, None]


def _gated_tangent(residual: Tensor, gate: Dual, branch: Tensor, dbranch: Tensor) -> Tensor:
    """Tangent of x + gate * branch."""
    return residual + gate[1][:, None] * branch + gate[0][:, None] * dbranch


def _chunks(x: Dual, count: int) -> list[Dual]:
    return list(zip(x[0].chunk(count, dim=-1), x[1].chunk(count, dim=-1)))


def _block_tangent(block: Block, saved: BlockValues, dx: Tensor, c: Dual) -> Tensor:
    shift1, scale1, gate1, shift2, scale2, gate2 = _chunks(_linear(block.modulation[1], _silu(c)), 6)
    attn = block.attn
    dqkv = F.linear(_modulated_tangent(_layer_norm(block.norm1, saved.x, dx), shift1, scale1).to(dx.dtype),
                    attn.qkv.weight)
    dmixed = attention_tangent_op(*attn.split_heads(saved.qkv), *attn.split_heads(dqkv.to(saved.qkv.dtype)))
    dmid = _gated_tangent(dx, gate1, saved.a, F.linear(merge_heads(dmixed), attn.proj.weight))
    dmod2 = _modulated_tangent(_layer_norm(block.norm2, saved.mid, dmid), shift2, scale2).to(dmid.dtype)
    dhidden = F.linear(dmod2, block.mlp[0].weight) * _gelu_tanh_slope(saved.pre)
    return _gated_tangent(dmid, gate2, saved.m, F.linear(dhidden, block.mlp[2].weight))


def _final_tangent(final: FinalLayer, x: Tensor, dx: Tensor, c: Dual) -> Tensor:
    shift, scale = _chunks(_linear(final.modulation[1], _silu(c)), 2)
    dmod = _modulated_tangent(_layer_norm(final.norm, x, dx), shift, scale).to(dx.dtype)
    return F.linear(dmod, final.linear.weight)


def _time_embedding(h: Tensor, dh: Tensor, dtype: torch.dtype, dim: int = TIME_FREQUENCIES,
                    max_period: float = 10000.0) -> Dual:
    """models.generator.dit.timestep_embedding and its derivative in h."""
    work = torch.float64 if h.dtype == torch.float64 else torch.float32
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=h.device, dtype=work) / half)
    rate = 1000.0 * frequencies[None]
    angles = rate * h.to(work)[:, None]
    tangent = torch.cat([-angles.sin(), angles.cos()], dim=-1) * torch.cat([rate, rate], dim=-1) * dh.to(work)[:, None]
    return timestep_embedding(h, dim, max_period).to(dtype), tangent.to(dtype)


def x_head_tangent(model: TrajectoryDiT, values: XPathValues, h: Tensor, label: Tensor, level: Tensor,
                   dz: Tensor, dh: Tensor) -> Tensor:
    """d x_hat along the tangent (dz, dh) of (z, h), cond, label and level held fixed; `values` are the
    x path's values from model(z, h, cond, label, level, keep_values=True) at the same point."""
    dtokens = F.linear(dz, model.fuse.weight[:, :model.config.token_dim])
    time = _time_embedding(h, dh, model.h_embed[0].weight.dtype)
    inner = _linear(model.h_embed[2], _silu(_linear(model.h_embed[0], time)))
    c = (inner[0] + model.class_embed(label) + model.level_embed(level), inner[1])
    for block, saved in zip([*model.trunk, *model.x_blocks], values.blocks, strict=True):
        dtokens = _block_tangent(block, saved, dtokens, c)
    return _final_tangent(model.x_final, values.final_input, dtokens, c)


def x_head_jvp(model: TrajectoryDiT, z: Tensor, h: Tensor, cond: Tensor, label: Tensor, level: Tensor,
               dz: Tensor, dh: Tensor) -> Dual:
    """(x_hat, d x_hat) for the tangent (dz, dh) of (z, h): a forward that keeps its values, then the
    tangent pass."""
    x_hat, _, values = model(z, h, cond, label, level, keep_values=True)
    return x_hat, x_head_tangent(model, values, h, label, level, dz, dh)


def average_velocity_tangent(model: TrajectoryDiT, x_hat: Tensor, values: XPathValues, z: Tensor, t: Tensor,
                             r: Tensor, label: Tensor, level: Tensor, dz: Tensor, dt: Tensor, dr: Tensor,
                             t_floor: float) -> Tensor:
    """du for u = (z - x_hat(z, t - r)) / max(t, t_floor), as models.generator.meanflow.average_velocity, from
    the forward's x_hat and values at (z, t, r)."""
    dx_hat = x_head_tangent(model, values, t - r, label, level, dz, dt - dr)
    tc = t.clamp_min(t_floor)[:, None, None]
    dtc = torch.where(t >= t_floor, dt, torch.zeros_like(dt))[:, None, None]   # clamp_min's derivative, as autograd
    u = (z - x_hat) / tc
    return (dz - dx_hat) / tc - u * dtc / tc
