"""Reading latents and teacher partitions back as tensors, and building level canvases from them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.hierarchy.reference import region_canvas
from models.generator.flat import flat_level_data
from models.generator.train_loop import LevelData
from storage import zarr_store


@dataclass
class Latents:
    """The valid samples of a latent store, held as stored (50k B-sized latents: 20 GB in float16, where
    float32 would be 40): `normalised(rows)` gives float32 (token - mean) / std of any rows, the values
    every consumer sees (the same float32 operations as a whole-store read, so the same bits)."""
    stored: torch.Tensor      # [N, T, C] as stored: float16, bfloat16 or float32
    label: torch.Tensor       # [N]
    index: np.ndarray         # store indices of these samples
    mean: np.ndarray          # [C] float32
    std: np.ndarray           # [C] float32
    grid: int
    weights_label: str
    ids: np.ndarray           # sample id of each row: what pairs them with another store's rows (zarr_store.rows_of)

    def __len__(self) -> int:
        return len(self.stored)

    @property
    def dim(self) -> int:
        return self.stored.shape[-1]

    def normalised(self, rows=slice(None), device: str | torch.device = "cpu") -> torch.Tensor:
        """float32 [n, T, C] normalised latents of `rows` (an index, a slice or a mask), on `device`."""
        x = self.stored[rows].to(device).float()
        return (x - torch.as_tensor(self.mean, device=x.device)) / torch.as_tensor(self.std, device=x.device)

    def level_data(self, regions: torch.Tensor | None, level: int | None) -> LevelData:
        """Level `level`'s training data over these latents and the teacher's `regions` [N, L-1, T]; the flat
        baseline's with level None (the latent itself, no condition)."""
        mean, std = torch.from_numpy(np.asarray(self.mean)), torch.from_numpy(np.asarray(self.std))
        if level is None:
            return flat_level_data(self.stored, mean, std, self.label)
        target = regions[:, level] if level < regions.shape[1] else None   # the last level: the latent itself
        cond = regions[:, level - 1] if level > 0 else None
        return LevelData(self.stored, mean, std, self.label, target, cond)


def valid_rows(path: Path, limit: int | None = None) -> np.ndarray:
    """Store indices of the latent store's valid samples (the first `limit` of them)."""
    valid = np.flatnonzero(zarr_store.open_array(path, "valid")[:])
    return valid if limit is None else valid[:limit]


def load_latents(path: Path, limit: int | None = None) -> Latents:
    from tasks.encode.files import stored_tensor   # the encode stage's modules (timm, ...) only when reading

    valid = valid_rows(path, limit)
    tokens = zarr_store.open_array(path, "tokens")
    raw = zarr_store.read_stored(path, "tokens", valid) if len(valid) else np.asarray(tokens[0:0])
    stored = stored_tensor(raw, zarr_store.is_bfloat16(tokens))
    mean, std = zarr_store.open_array(path, "mean")[:], zarr_store.open_array(path, "std")[:]
    grid = raw.shape[1]
    return Latents(stored.reshape(len(raw), grid * grid, -1),
                   torch.from_numpy(zarr_store.open_array(path, "label").oindex[valid]), valid,
                   np.asarray(mean, np.float32), np.asarray(std, np.float32), grid,
                   zarr_store.store_attrs(path)["encoder_weights"], zarr_store.sample_ids(path, valid))


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
