"""Pictures for the pages: partitions in colours, overlays, PCA of a latent canvas, the hierarchy browser's rows.

All numpy (and PIL for titles), no Streamlit: each function returns uint8 RGB arrays that `st.image` shows as they are.
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


# st.image re-samples (bilinear, blurring token edges) and re-encodes any picture wider than this on every run.
STREAMLIT_MAX_IMAGE_PX = 2 * 730
TITLE_INK = (49, 51, 63)   # Streamlit's text colour
STRIP_GAP = 12             # px between the panels of a strip


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """An image [h, h, 3] at size x size: nearest neighbour for a whole factor (crisp pixels), else Lanczos."""
    from PIL import Image

    if size % image.shape[0] == 0:
        return upscale(image, size)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def titled_strip(panels: list[tuple[np.ndarray, str]], gap: int = STRIP_GAP, title_px: int = 18) -> np.ndarray:
    """Panels [h, w, 3] side by side on white, each with its title drawn above it: one picture instead of one
    `st.image` per panel (every image element costs the browser main-thread time when a page opens)."""
    from PIL import Image, ImageDraw, ImageFont

    height = max(image.shape[0] for image, _ in panels)
    top = title_px + 10
    width = sum(image.shape[1] for image, _ in panels) + gap * (len(panels) - 1)
    canvas = np.full((top + height, width, 3), 255, np.uint8)
    lefts = np.cumsum([0] + [image.shape[1] + gap for image, _ in panels[:-1]])
    for left, (image, _) in zip(lefts, panels):
        canvas[top:top + image.shape[0], left:left + image.shape[1]] = image[..., :3]
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for left, (image, title) in zip(lefts, panels):
        size = title_px
        while size > 8 and ImageFont.load_default(size=size).getlength(title) > image.shape[1]:
            size -= 1   # a long image id: smaller letters rather than over the next title
        font = ImageFont.load_default(size=size)
        draw.text((int(left) + image.shape[1] / 2, top - 5), title, fill=TITLE_INK, font=font, anchor="md")
    return np.asarray(picture)


def strip_panel_px(grid: int, count: int, wanted: int, gap: int = STRIP_GAP) -> int:
    """Panel size for a strip of `count` square panels: about `wanted` px, a multiple of the token grid (whole
    tokens stay crisp), smaller when the strip would be wider than what st.image shows unchanged."""
    fitting = min(wanted, (STREAMLIT_MAX_IMAGE_PX - gap * (count - 1)) // count)
    return grid * max(1, fitting // grid)


def hierarchy_strip(row: dict, wanted_px: int, gap: int = STRIP_GAP) -> np.ndarray:
    """One hierarchy-browser row (from `hierarchy_rows`) as one picture: the image, the teacher partition per
    level, then the ground truth per level with the per-image ARI in its title."""
    truth = row["truth"] if row["truth"] is not None else []
    size = strip_panel_px(row["teacher"].shape[-1], 1 + len(row["teacher"]) + len(truth), wanted_px, gap)
    panels = [(fit_square(row["image"], size), f"#{row['index']} {row['id']}")]
    panels += [(colour_partition(ids, size), f"teacher L{level}") for level, ids in enumerate(row["teacher"])]
    panels += [(colour_partition(ids, size), f"truth L{level}, ARI {ari:.2f}")
               for level, (ids, ari) in enumerate(zip(truth, row["ari"]))]
    return titled_strip(panels, gap)


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
    from models.evaluation.metrics import adjusted_rand   # sklearn: imported only when this page draws, not at start-up

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
