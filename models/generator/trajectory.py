"""Coarse-to-fine trajectory sampling and trajectory edits (DESIGN §3).

A trajectory is one canvas [B, T, C] per level, produced by one network call per
level: level l is generated from its own noise, conditioned on the level-(l-1)
canvas (zeros at level 0). Each per-level generator has the interface

    model(z [B,T,C], h [B], cond [B,T,C], label [B] int64, level [B] int64) -> (x_hat, x_v)

An edit changes one level inside a region and re-samples the finer levels from
the same noises, so coarser levels stay bit-identical.

Snapping (optional, not in the reference sampler): a generated canvas of a partitioned level
is replaced by the means of its own regions (cut at a cosine distance) before it conditions
the next level, so the next level sees a piecewise-constant canvas like the teacher canvases
it was trained on, and the trajectory's regions are explicit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.hierarchy.reference import region_canvas
from models.evaluation.metrics import regions_from_canvas


def one_step_level(
    model: nn.Module,
    z1: Tensor,
    cond: Tensor,
    label: Tensor,
    level: int,
    t_floor: float = 0.05,
) -> Tensor:
    """Clean canvas x0 = z1 - u(z1, r=0, t=1) for one level (one network call)."""
    batch = z1.shape[0]
    t, r = 1.0, 0.0
    h = torch.full((batch,), t - r, dtype=z1.dtype, device=z1.device)
    level_ids = torch.full((batch,), level, dtype=torch.long, device=z1.device)
    # the v head is a training aid only: a model that can skip it (TrajectoryDiT.x_prediction) does
    x_prediction = getattr(model, "x_prediction", None)
    x_hat = x_prediction(z1, h, cond, label, level_ids) if x_prediction else model(z1, h, cond, label, level_ids)[0]
    # x-prediction turned into average velocity, as in training.
    u = (z1 - x_hat) / max(t, t_floor)
    return z1 - (t - r) * u


def level_noises(
    num_levels: int,
    T: int,
    C: int,
    seeds: Sequence[int],
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Per-level N(0, I) noise [B, T, C], B = len(seeds).

    Sample i's noise for every level comes from a generator seeded with seeds[i]
    alone, drawn on CPU, so a trajectory is reproducible alone, in any batch and
    on any device.
    """
    per_sample = []
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        per_sample.append(torch.randn(num_levels, T, C, generator=gen))
    stacked = torch.stack(per_sample, dim=1)  # [L, B, T, C]
    return [stacked[level].to(device) for level in range(num_levels)]


# A snapped canvas is exactly piecewise constant: its own regions are its groups of identical tokens,
# found by the same recovery cut at a distance only rounding can reach. (Re-cutting it at the snap
# threshold would merge regions whose means are closer than the noisy tokens were on average.)
PIECE_CUT = 1e-6


def own_regions_cut(region_threshold: float, snap_threshold: float | None) -> float:
    """The cut that recovers a sampled trajectory's own regions: the pieces of a snapped canvas, or
    region_threshold for the reference sampler's canvases."""
    return region_threshold if snap_threshold is None else PIECE_CUT


def snap_to_regions(canvas: Tensor, threshold: float) -> Tensor:
    """[B, T, C] -> [B, T, C]: every token replaced by the mean of its region, the regions
    recovered per sample as in the metrics (average linkage, cosine distance cut at threshold)."""
    arrays = canvas.detach().float().cpu().numpy()
    ids = torch.from_numpy(np.stack([regions_from_canvas(c, threshold) for c in arrays])).to(canvas.device)
    return region_canvas(canvas.float(), ids).to(canvas.dtype)


@torch.no_grad()
def sample_trajectory(
    models: Sequence[nn.Module],
    noises: Sequence[Tensor],
    label: Tensor,
    start_level: int = 0,
    prefix: Sequence[Tensor] | None = None,
    snap_threshold: float | None = None,
) -> list[Tensor]:
    """Canvases [B, T, C] for levels 0..L-1.

    Levels below start_level are taken from prefix unchanged (the same tensors);
    levels from start_level on are sampled one step each, conditioned on the
    previous canvas. With snap_threshold, each sampled level but the last is
    snapped to its region means (snap_to_regions) and kept so. Models are used
    as given (put them in eval mode first).
    """
    num_levels = len(models)
    if len(noises) != num_levels:
        raise ValueError(f"got {len(noises)} noises for {num_levels} levels")
    if not 0 <= start_level <= num_levels:
        raise ValueError(f"start_level {start_level} outside 0..{num_levels}")
    if start_level > 0 and (prefix is None or len(prefix) < start_level):
        raise ValueError(f"start_level {start_level} needs a prefix of at least that many canvases")

    canvases: list[Tensor] = [prefix[level] for level in range(start_level)] if start_level else []
    for level in range(start_level, num_levels):
        z1 = noises[level]
        cond = torch.zeros_like(z1) if level == 0 else canvases[level - 1]
        canvas = one_step_level(models[level], z1, cond, label, level)
        if snap_threshold is not None and level < num_levels - 1:
            canvas = snap_to_regions(canvas, snap_threshold)
        canvases.append(canvas)
    return canvases


@dataclass(frozen=True, eq=False)
class Edit:
    """Replace level `level` by `source` inside `mask`; finer levels follow."""

    level: int  # l*: the level whose canvas is changed
    mask: Tensor  # [B, T] bool: the region (a level-l* region id as a mask, or any token mask)
    source: Tensor  # [B, T, C]: replacement tokens (token exchange, a vector or a region mean)

    def __post_init__(self) -> None:
        if self.mask.dtype != torch.bool or self.mask.dim() != 2:
            raise ValueError(f"mask must be bool [B, T], got {self.mask.dtype} {tuple(self.mask.shape)}")
        if self.source.dim() != 3 or self.source.shape[:2] != self.mask.shape:
            raise ValueError(
                f"source must be [B, T, C] matching mask {tuple(self.mask.shape)}, got {tuple(self.source.shape)}"
            )


def region_mask(ids: Tensor, region_id: int | Tensor) -> Tensor:
    """Bool [B, T]: tokens whose region id equals region_id (a scalar or one id per sample [B])."""
    target = torch.as_tensor(region_id, dtype=ids.dtype, device=ids.device)
    if target.dim() == 1:
        target = target[:, None]
    return ids == target


def region_mean_source(canvas: Tensor, mask: Tensor, vector: Tensor | None = None) -> Tensor:
    """Source [B, T, C] filled with `vector` [B, C], or with the mean of canvas over mask.

    A sample with an empty mask gets a zero mean; its source is never used by apply_edit.
    """
    batch, tokens, channels = canvas.shape
    if vector is None:
        weights = mask.to(canvas.dtype)[..., None]  # [B, T, 1]
        count = weights.sum(dim=1).clamp(min=1.0)  # [B, 1]
        vector = (canvas * weights).sum(dim=1) / count
    if vector.shape != (batch, channels):
        raise ValueError(f"vector must be [B, C] = {(batch, channels)}, got {tuple(vector.shape)}")
    return vector.to(canvas.dtype)[:, None, :].expand(batch, tokens, channels).contiguous()


@torch.no_grad()
def apply_edit(
    models: Sequence[nn.Module],
    noises: Sequence[Tensor],
    label: Tensor,
    base: Sequence[Tensor],
    edit: Edit,
    snap_threshold: float | None = None,
) -> list[Tensor]:
    """Edited trajectory: levels < l* are base's own tensors, level l* is
    where(mask, source, base[l*]), levels > l* are re-sampled from the same noises
    conditioned on the edited level (snapped like the base when snap_threshold is given)."""
    level = edit.level
    if not 0 <= level < len(base):
        raise ValueError(f"edit level {level} outside 0..{len(base) - 1}")
    if edit.source.shape != base[level].shape:
        raise ValueError(f"source {tuple(edit.source.shape)} does not match canvas {tuple(base[level].shape)}")
    source = edit.source.to(base[level].dtype)
    edited = torch.where(edit.mask[..., None], source, base[level])
    prefix = list(base[:level]) + [edited]
    return sample_trajectory(models, noises, label, start_level=level + 1, prefix=prefix,
                             snap_threshold=snap_threshold)
