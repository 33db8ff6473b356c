"""Evaluation outputs on disk: kept trajectories (Zarr), edit objects (Parquet) and the PNG grid."""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from storage import zarr_store
from storage.files import write_png
from storage.tables import atomic_write_parquet
from storage.zarr_store import ArraySpec


def write_trajectories(path: Path, ids: list[str], seeds: np.ndarray, labels: np.ndarray, canvases: np.ndarray,
                       images: np.ndarray, regions: np.ndarray, attrs: dict, parents: list[str] | None = None,
                       level_ids: np.ndarray | None = None) -> None:
    """canvases [K, L, g, g, C], images [K, L, H, W, 3] (decoded per level), regions [K, L-1, g, g].
    level_ids: the level of each stored canvas (default 0..L-1; the flat baseline stores the last alone)."""
    k, levels = canvases.shape[:2]
    arrays = {
        "trajectory": ArraySpec((k,), str, ("trajectory",), fill_value=""),
        "parent": ArraySpec((k,), str, ("trajectory",), fill_value=""),
        "seed": ArraySpec((k,), np.int64, ("trajectory",)),
        "label": ArraySpec((k,), np.int64, ("trajectory",)),
        "level": ArraySpec((levels,), np.int64, ("level",), per_sample=False),
        "canvas": ArraySpec(canvases.shape, np.float16, ("trajectory", "level", "gy", "gx", "channel")),
        "image": ArraySpec(images.shape, np.uint8, ("trajectory", "level", "y", "x", "rgb")),
        "regions": ArraySpec(regions.shape, np.int16, ("trajectory", "partition_level", "gy", "gx")),
    }
    zarr_store.create_store(path, arrays, max(k, 1), attrs)
    zarr_store.write_rows(path, slice(None), {
        "trajectory": np.asarray(ids, dtype=str), "parent": np.asarray(parents or [""] * k, dtype=str),
        "seed": seeds, "label": labels, "level": np.arange(levels) if level_ids is None else np.asarray(level_ids, np.int64), "canvas": canvases.astype(np.float16),
        "image": images, "regions": regions.astype(np.int16)})
    zarr_store.mark_complete(path, {"trajectories": k})


def new_edit_id() -> str:
    return "edit-" + uuid.uuid4().hex[:10]


def write_edits(path: Path, records: list[dict]) -> None:
    """Edit objects: id, parent trajectory, level, region, source kind/donor, result trajectory id."""
    atomic_write_parquet(pd.DataFrame(records), path)


def load_edits(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def image_grid(rows: np.ndarray, pad: int = 2) -> np.ndarray:
    """rows [R, Cols, H, W, 3] uint8 -> one image with a white gutter."""
    r, c, h, w, _ = rows.shape
    canvas = np.full((r * (h + pad) + pad, c * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top:top + h, left:left + w] = rows[i, j]
    return canvas


def write_grid(path: Path, rows: np.ndarray) -> None:
    write_png(path, image_grid(rows))
