"""Reading latents and teacher partitions back as tensors, and building level canvases from them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.hierarchy.reference import region_canvas
from models.generator.train_loop import LevelData
from storage import zarr_store


@dataclass
class Latents:
    tokens: torch.Tensor      # [N, T, C] normalised (valid samples only)
    label: torch.Tensor       # [N]
    index: np.ndarray         # store indices of these samples
    mean: np.ndarray          # [C]
    std: np.ndarray           # [C]
    grid: int
    weights_label: str
    ids: np.ndarray           # sample id of each row: what pairs them with another store's rows (zarr_store.rows_of)


def load_latents(path: Path, limit: int | None = None) -> Latents:
    valid = np.flatnonzero(zarr_store.open_array(path, "valid")[:])
    if limit is not None:
        valid = valid[:limit]
    tokens = zarr_store.open_array(path, "tokens")
    raw = zarr_store.read_floats(tokens, valid, orthogonal=True) if len(valid) else \
        zarr_store.read_floats(tokens, slice(0, 0))
    mean, std = zarr_store.open_array(path, "mean")[:], zarr_store.open_array(path, "std")[:]
    grid = raw.shape[1]
    flat = (raw.reshape(len(raw), grid * grid, -1) - mean) / std
    return Latents(torch.from_numpy(flat), torch.from_numpy(zarr_store.open_array(path, "label").oindex[valid]),
                   valid, mean, std, grid, zarr_store.store_attrs(path)["encoder_weights"],
                   zarr_store.sample_ids(path, valid))


def load_regions(path: Path, index: np.ndarray) -> torch.Tensor:
    """[N, levels-1, T] int64 teacher region ids for the given store indices."""
    regions = np.asarray(zarr_store.open_array(path, "regions").oindex[index], dtype=np.int64)
    return torch.from_numpy(regions.reshape(len(index), regions.shape[1], -1))


def regions_of(path: Path, latents: Latents) -> torch.Tensor:
    """The teacher's regions of each of `latents`' samples, its rows found by sample id."""
    return load_regions(path, zarr_store.rows_of(path, latents.ids))


def canvases(tokens: torch.Tensor, regions: torch.Tensor) -> list[torch.Tensor]:
    """Canvases of every level: region means for levels 0..L-2, the latent itself at the last level."""
    return [region_canvas(tokens, regions[:, level]) for level in range(regions.shape[1])] + [tokens]


def level_data(latents: Latents, regions: torch.Tensor, level: int) -> LevelData:
    levels = canvases(latents.tokens, regions)
    cond = levels[level - 1] if level > 0 else torch.zeros_like(latents.tokens)
    ids = regions[:, level] if level < regions.shape[1] else None
    return LevelData(levels[level], cond, latents.label, ids)
