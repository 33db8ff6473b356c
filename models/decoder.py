"""ViT decoder from the normalised token grid to pixels (RAE-style, DESIGN §3).

Tokens [B, T, C] (T = grid * grid, raster order) -> linear projection + fixed
2-D sin-cos positions -> pre-norm transformer blocks -> LayerNorm + Linear to one
patch*patch*3 pixel patch per token -> unpatchify -> sigmoid, so images are in
[0, 1] with gradients everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(kw_only=True)
class DecoderSpec:
    """The decoder's shape. width / depth / heads are settings of storage.config.DecoderConfig and the
    token shape comes from the data (tasks.plan.decoder_spec), so none has a default; mlp_ratio is
    this model's fixed constant, not a setting."""
    token_dim: int
    grid: int  # tokens per side; T = grid * grid
    patch: int  # pixels per token side; image side = grid * patch
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0  # fixed: the MLP's hidden width is mlp_ratio * width (as in ViT)


def sincos_position_embedding(grid: int, width: int) -> Tensor:
    """Fixed 2-D sin-cos embedding [grid*grid, width]: half the channels encode the row, half the column."""
    if width % 4 != 0:
        raise ValueError(f"width {width} must be divisible by 4 for 2-D sin-cos positions")
    quarter = width // 4
    cpu = torch.device("cpu")   # whatever the default device (storage.checkpoints.built_with keeps this table)
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64, device=cpu) / quarter))
    coords = torch.arange(grid, dtype=torch.float64, device=cpu)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # raster order: row-major

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def unpatchify(patches: Tensor, grid: int, patch: int) -> Tensor:
    """[B, grid*grid, patch*patch*3] -> [B, 3, grid*patch, grid*patch].

    Token k = i*grid + j fills pixel rows i*patch:(i+1)*patch, cols j*patch:(j+1)*patch;
    within a token the vector is laid out (pixel row, pixel col, channel).
    """
    batch = patches.shape[0]
    x = patches.reshape(batch, grid, grid, patch, patch, 3)  # b, i, j, py, px, c
    x = x.permute(0, 5, 1, 3, 2, 4)  # b, c, i, py, j, px
    return x.reshape(batch, 3, grid * patch, grid * patch)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, T, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    """Plain pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenDecoder(nn.Module):
    def __init__(self, config: DecoderSpec):
        super().__init__()
        self.config = config
        self.in_proj = nn.Linear(config.token_dim, config.width)
        self.register_buffer("pos_embed", sincos_position_embedding(config.grid, config.width), persistent=False)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.patch * config.patch * 3)
        self.apply(self._init_weights)
        # Zero head: the untrained decoder paints mid-grey instead of noise.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """[B, T, C] normalised tokens -> images [B, 3, H, W] in [0, 1] (sigmoid output)."""
        cfg = self.config
        expected = (cfg.grid * cfg.grid, cfg.token_dim)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(f"tokens must be [B, {expected[0]}, {expected[1]}], got {tuple(tokens.shape)}")
        x = self.in_proj(tokens) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        patches = self.head(self.norm(x))
        return torch.sigmoid(unpatchify(patches, cfg.grid, cfg.patch))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def decoder_loss(
    pred: Tensor, target: Tensor, l1_weight: float = 1.0, l2_weight: float = 1.0
) -> tuple[Tensor, dict[str, float]]:
    """Pixel loss l1_weight * mean|pred - target| + l2_weight * mean (pred - target)^2, images in [0, 1]."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    diff = pred - target
    l1 = diff.abs().mean()
    l2 = diff.square().mean()
    loss = l1_weight * l1 + l2_weight * l2
    return loss, {"loss": loss.detach(), "l1": l1.detach(), "l2": l2.detach()}


def images_to_tensor(images_uint8: np.ndarray) -> Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float32 in [0, 1]."""
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3], got {images_uint8.dtype} {images_uint8.shape}")
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0


def tensor_to_images(x: Tensor) -> np.ndarray:
    """[N, 3, H, W] float in [0, 1] -> [N, H, W, 3] uint8 (clamped, rounded to nearest)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W], got {tuple(x.shape)}")
    scaled = (x.detach().float().clamp(0.0, 1.0) * 255.0).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
