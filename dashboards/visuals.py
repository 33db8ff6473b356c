"""Pictures for the pages: partitions in colours, overlays, PCA of a latent canvas, the hierarchy browser's rows.

All numpy, no Streamlit: each function returns uint8 RGB arrays that `st.image` shows as they are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from storage import zarr_store
from storage.scenes import masks_to_grid

# Background (id 0) is dark grey; object regions get distinct, saturated colours.
PALETTE = np.array([
    (60, 60, 60), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
], dtype=np.uint8)


def upscale(grid_image: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour [g, g, ...] -> [size, size, ...] (size a multiple of g)."""
    factor = max(1, size // grid_image.shape[0])
    return np.repeat(np.repeat(grid_image, factor, axis=0), factor, axis=1)


def colour_partition(ids: np.ndarray, size: int) -> np.ndarray:
    """Region ids [g, g] -> RGB [size, size, 3], one colour per id."""
    return upscale(PALETTE[np.asarray(ids, np.int64) % len(PALETTE)], size)


def overlay(image: np.ndarray, ids: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with its partition blended on top."""
    colours = colour_partition(ids, image.shape[0]).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def pca_rgb(canvases: np.ndarray, size: int) -> np.ndarray:
    """Canvases [L, g, g, C] -> [L, size, size, 3]: the first 3 principal components as colours.

    One PCA over all levels of the trajectory, so the same colour means the same direction at every level.
    """
    levels, grid = canvases.shape[:2]
    flat = canvases.reshape(-1, canvases.shape[-1]).astype(np.float64)
    centred = flat - flat.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:3].T
    if projected.shape[1] < 3:  # fewer than 3 directions (e.g. one token): pad with zeros
        projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
    low, high = projected.min(axis=0), projected.max(axis=0)
    scaled = (projected - low) / np.where(high > low, high - low, 1.0)
    rgb = (scaled * 255).round().astype(np.uint8).reshape(levels, grid, grid, 3)
    return np.stack([upscale(level, size) for level in rgb])


def hierarchy_rows(images_store: Path, teacher_store: Path, start: int, count: int) -> list[dict]:
    """Real images start..start+count with their teacher partition per level, and when the store
    has ground-truth masks (the built-in scenes) the ground truth on the token grid and the per-image ARI."""
    ids = zarr_store.open_array(images_store, "sample")[:] if zarr_store.has_array(images_store, "sample") else None
    total = zarr_store.open_array(teacher_store, "regions").shape[0]
    stop = min(total, max(0, start) + count)
    index = np.arange(max(0, start), stop)
    if len(index) == 0:
        return []
    images = np.asarray(zarr_store.open_array(images_store, "image").oindex[index])
    teacher = np.asarray(zarr_store.open_array(teacher_store, "regions").oindex[index])   # [n, L-1, g, g]
    grid = teacher.shape[-1]
    truth = None
    if zarr_store.has_array(images_store, "masks"):
        masks = np.asarray(zarr_store.open_array(images_store, "masks").oindex[index])
        truth = masks_to_grid(masks, grid)   # [n, 3, g, g]
    from models.metrics import adjusted_rand   # sklearn: imported only when this page draws, not at start-up

    rows = []
    for k, i in enumerate(index):
        row = {"index": int(i), "id": str(ids[i]) if ids is not None else str(i), "image": images[k],
               "teacher": teacher[k], "truth": None, "ari": []}
        if truth is not None:
            levels = min(len(teacher[k]), len(truth[k]))
            row["truth"] = truth[k][:levels]
            row["ari"] = [adjusted_rand(teacher[k][l].ravel(), truth[k][l].ravel()) for l in range(levels)]
        rows.append(row)
    return rows
