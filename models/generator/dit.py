"""The per-level generator: a DiT over the latent token grid (patch size 1), nanoGPT style.

Input: the noisy level-l canvas z, fused with the level-(l-1) canvas by channel concatenation and
one linear layer, plus a fixed 2-D sin-cos position embedding. Conditioning (adaLN-Zero): the
interval h = t - r, the class label (num_classes = the null label) and the level. A shared trunk of
depth - head_depth blocks feeds two heads of head_depth blocks each: the x head predicts the clean
canvas (the objective turns it into the average velocity u), the v head is an x-prediction too,
turned into the instantaneous velocity (reference: with width below the channel count a direct v
output would have a rank floor that x-prediction has not).

Attention uses F.scaled_dot_product_attention, whose fused kernels have no forward-mode AD (checked:
on CPU too, torch 2.14). Inside `math_attention(model)` the attention is written out instead, which
torch.func.jvp can differentiate; both paths compute the same function.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TIME_FREQUENCIES = 256  # width of the sinusoidal embedding of h before its MLP


@dataclass(kw_only=True)
class DiTConfig:
    """The backbone's shape: the sizes come from PRESETS (and storage.config.GeneratorConfig's overrides),
    the token shape, classes and level count from the data and the hierarchy (tasks.plan.generator_config),
    so none has a default; mlp_ratio is this model's fixed constant, not a setting."""
    token_dim: int            # channels C of the latent tokens
    grid: int                 # tokens per side, T = grid * grid
    width: int
    depth: int                # blocks on the path to each head = trunk + head_depth
    head_depth: int           # the last head_depth blocks are duplicated into the x and v heads
    heads: int
    mlp_ratio: float = 4.0    # fixed: the MLP's hidden width is mlp_ratio * width (as in DiT)
    num_classes: int          # label == num_classes is the null (dropped) label
    num_levels: int


PRESETS: dict[str, dict] = {
    "tiny": dict(width=128, depth=4, head_depth=2, heads=4),
    "S": dict(width=384, depth=12, head_depth=4, heads=6),
    "B": dict(width=768, depth=16, head_depth=8, heads=12),
    "L": dict(width=1024, depth=32, head_depth=8, heads=16),
    "H": dict(width=1280, depth=48, head_depth=8, heads=16),
}


def dit_config(preset: str, **fields) -> DiTConfig:
    """The preset's sizes, any of them overridden, plus the fields no preset holds (token_dim, grid,
    num_classes, num_levels: required)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown generator preset {preset!r}; choose from {sorted(PRESETS)}")
    return DiTConfig(**{**PRESETS[preset], **fields})


def sincos_position_embedding(grid: int, width: int) -> Tensor:
    """[grid*grid, width]: half the channels encode the row, half the column (sin and cos each)."""
    quarter = width // 4
    # on the CPU whatever the default device: a module laid out on the meta device keeps this table
    # (storage.checkpoints.built_with)
    cpu = torch.device("cpu")
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=cpu) / max(quarter, 1))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64, device=cpu),
                                torch.arange(grid, dtype=torch.float64, device=cpu), indexing="ij")
    parts = []
    for coordinate in (rows.reshape(-1), cols.reshape(-1)):
        angles = coordinate[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)
    return F.pad(embedding, (0, width - embedding.shape[1])).float()   # width not divisible by 4: zero tail


def timestep_embedding(h: Tensor, dim: int = TIME_FREQUENCIES, max_period: float = 10000.0) -> Tensor:
    """[B] -> [B, dim] sinusoids; h in [0, 1] is scaled by 1000 like diffusion timesteps."""
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=h.device, dtype=dtype) / half)
    angles = 1000.0 * h.to(dtype)[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    # q, k and v are one linear for speed; the reference holds three matrices, and Muon orthogonalises
    # each of them on its own (models/generator/optim.py)
    fused_linears = {"qkv": 3}

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.use_math_attention = False   # set by math_attention(); the fused kernels lack forward AD

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, T, 3 * width] -> q, k, v as [B, heads, T, width / heads] views (no copies)."""
        batch, tokens, three_width = qkv.shape
        q, k, v = qkv.view(batch, tokens, 3, self.heads, three_width // (3 * self.heads)).permute(2, 0, 3, 1, 4)
        return q, k, v

    def mix(self, qkv: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d)) v per head, heads merged back: [B, T, width]."""
        q, k, v = self.split_heads(qkv)
        if self.use_math_attention:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            mixed = torch.softmax(scores, dim=-1) @ v
        else:
            mixed = F.scaled_dot_product_attention(q, k, v)
        return merge_heads(mixed)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.mix(self.qkv(x)))


def merge_heads(mixed: Tensor) -> Tensor:
    """[B, heads, T, d] -> [B, T, heads * d] (a view when the heads are token-major)."""
    batch, heads, tokens, dim = mixed.shape
    return mixed.transpose(1, 2).reshape(batch, tokens, heads * dim)


class BlockValues(NamedTuple):
    """What one block's forward-mode tangent needs of its forward pass (models/generator/dit_jvp.py); each is
    also saved for the backward, so keeping them costs no memory."""
    x: Tensor      # block input (residual stream)
    qkv: Tensor    # fused q, k, v projection
    a: Tensor      # attention output after proj, before its gate
    mid: Tensor    # residual stream after the attention branch
    pre: Tensor    # MLP hidden before the GELU
    m: Tensor      # MLP output, before its gate


class XPathValues(NamedTuple):
    """The x path's values from one forward: trunk then x-head blocks, and the x final layer's input."""
    blocks: tuple[BlockValues, ...]
    final_input: Tensor


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: shift, scale and gate for attention and MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def run(self, x: Tensor, c: Tensor) -> tuple[Tensor, BlockValues]:
        """The block's output and the values its tangent pass reuses."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        qkv = self.attn.qkv(modulate(self.norm1(x), shift1, scale1))
        a = self.attn.proj(self.attn.mix(qkv))
        mid = x + gate1[:, None] * a
        pre = self.mlp[0](modulate(self.norm2(mid), shift2, scale2))
        m = self.mlp[2](self.mlp[1](pre))
        return mid + gate2[:, None] * m, BlockValues(x, qkv, a, mid, pre, m)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.run(x, c)[0]


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class TrajectoryDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        if not 0 < config.head_depth <= config.depth:
            raise ValueError(f"head_depth must be in 1..depth, got {config.head_depth} with depth {config.depth}")
        if config.width % config.heads:
            raise ValueError(f"width {config.width} is not divisible by heads {config.heads}")
        self.config = config
        width = config.width
        self.fuse = nn.Linear(2 * config.token_dim, width)
        self.register_buffer("position", sincos_position_embedding(config.grid, width)[None], persistent=False)
        self.h_embed = nn.Sequential(nn.Linear(TIME_FREQUENCIES, width), nn.SiLU(), nn.Linear(width, width))
        self.class_embed = nn.Embedding(config.num_classes + 1, width)
        self.level_embed = nn.Embedding(config.num_levels, width)

        def blocks(count: int) -> nn.ModuleList:
            return nn.ModuleList(Block(width, config.heads, config.mlp_ratio) for _ in range(count))

        self.trunk = blocks(config.depth - config.head_depth)
        self.x_blocks, self.v_blocks = blocks(config.head_depth), blocks(config.head_depth)
        self.x_final, self.v_final = FinalLayer(width, config.token_dim), FinalLayer(width, config.token_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT init: xavier linears, N(0, 0.02) tables and h-MLP; zero modulations and output linears."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for table in (self.class_embed, self.level_embed):
            nn.init.normal_(table.weight, std=0.02)
        for layer in (self.h_embed[0], self.h_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for module in self.modules():   # adaLN-Zero: every block starts as the identity, outputs as zero
            if isinstance(module, (Block, FinalLayer)):
                nn.init.zeros_(module.modulation[-1].weight)
                nn.init.zeros_(module.modulation[-1].bias)
        for final in (self.x_final, self.v_final):
            nn.init.zeros_(final.linear.weight)

    def _inputs(self, z: Tensor, h: Tensor, cond: Tensor, label: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens entering the trunk, per-sample conditioning c)."""
        tokens = self.fuse(torch.cat([z, cond], dim=-1)) + self.position
        time = timestep_embedding(h).to(self.h_embed[0].weight.dtype)
        return tokens, self.h_embed(time) + self.class_embed(label) + self.level_embed(level)

    def x_prediction(self, z: Tensor, h: Tensor, cond: Tensor, label: Tensor, level: Tensor) -> Tensor:
        """forward's x_hat alone, the same operations without the v head (what sampling uses: a third of the
        blocks fewer for the B preset)."""
        tokens, c = self._inputs(z, h, cond, label, level)
        for block in (*self.trunk, *self.x_blocks):
            tokens = block(tokens, c)
        return self.x_final(tokens, c)

    def forward(self, z: Tensor, h: Tensor, cond: Tensor, label: Tensor, level: Tensor,
                keep_values: bool = False) -> tuple[Tensor, ...]:
        """z: noisy level-l canvas [B, T, C]; h = t - r [B] float; cond: level-(l-1) canvas [B, T, C]
        (zeros at level 0); label [B] int64 (num_classes = null); level [B] int64.
        Returns (x_hat, x_v), both [B, T, C] x-predictions: the x head's and the v head's;
        with keep_values, also the x path's XPathValues for the tangent pass."""
        tokens, c = self._inputs(z, h, cond, label, level)
        kept = []
        for block in self.trunk:
            tokens, values = block.run(tokens, c)
            kept.append(values)
        x_tokens, v_tokens = tokens, tokens
        for x_block, v_block in zip(self.x_blocks, self.v_blocks):
            (x_tokens, values), v_tokens = x_block.run(x_tokens, c), v_block(v_tokens, c)
            kept.append(values)
        x_hat, x_v = self.x_final(x_tokens, c), self.v_final(v_tokens, c)
        if keep_values:   # detached: for the no-grad tangent pass only (no zero gradients flow back into them)
            kept = tuple(BlockValues(*(value.detach() for value in block)) for block in kept)
            return x_hat, x_v, XPathValues(kept, x_tokens.detach())
        return x_hat, x_v

    def num_flops_per_token(self) -> int:
        """Forward matmul FLOPs per token (2 per multiply-add), both heads included: the per-token
        linears, attention scores and mixing (2 * T * width multiply-adds per block), and the
        per-sample conditioning (h MLP, adaLN modulations) spread over the T tokens. Norms,
        activations and softmax are not counted."""
        cfg = self.config
        width, tokens = cfg.width, cfg.grid * cfg.grid
        hidden = int(width * cfg.mlp_ratio)
        blocks = cfg.depth + cfg.head_depth   # trunk + two heads
        per_block = 4 * width * width + 2 * width * hidden + 2 * tokens * width
        per_token = 2 * cfg.token_dim * width + blocks * per_block + 2 * width * cfg.token_dim
        per_sample = TIME_FREQUENCIES * width + width * width + blocks * 6 * width * width + 2 * 2 * width * width
        return 2 * per_token + round(2 * per_sample / tokens)

    def training_flops_per_sample(self, v_tangent: str) -> int:
        """Model FLOPs of one sample's mean-flow training step (what MFU counts, as bench/generators.py):
        forward and backward of both heads (3 F); the tangent pass through trunk and x head (J: its matmuls
        once more, attention's two products twice); with the reference's h0 tangent (v_tangent "h0") one
        more no-grad forward of trunk and v head."""
        cfg = self.config
        width, tokens = cfg.width, cfg.grid * cfg.grid
        per_block = 4 * width * width + 2 * width * int(width * cfg.mlp_ratio) + 2 * tokens * width
        forward = self.num_flops_per_token() * tokens
        v_head = 2 * (cfg.head_depth * per_block + width * cfg.token_dim) * tokens + 2 * cfg.head_depth * 6 * width * width
        x_path = forward - v_head        # trunk and x head: the shape of trunk and v head too
        tangent = x_path + 4 * tokens * tokens * width * cfg.depth
        return 3 * forward + tangent + (x_path if v_tangent == "h0" else 0)


@contextlib.contextmanager
def math_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every attention layer of `model` uses the written-out softmax(QK^T/sqrt(d))V path
    (differentiable by torch.func.jvp); the previous setting is restored on exit."""
    layers = [module for module in model.modules() if isinstance(module, Attention)]
    previous = [layer.use_math_attention for layer in layers]
    for layer in layers:
        layer.use_math_attention = True
    try:
        yield model
    finally:
        for layer, setting in zip(layers, previous):
            layer.use_math_attention = setting
