"""The built-in "scenes" dataset: procedural images with exact object/part/subpart masks.

Each image is a textured sky-and-ground background with one main object (class label)
and, half of the time, a small second object further away. Ground truth comes at full
resolution in three nested levels: 0 object vs background, 1 parts, 2 subparts; id 0
is background at every level and object regions are numbered 1..k.

Rendering is a pure function of (seed, index, size): the random generator is seeded
with both numbers, so an image never depends on which others were rendered or in what
order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from storage.scene_objects import OBJECT_SPECS, Frame, LayeredCanvas, ObjectSpec, jitter

SCENE_CLASSES: tuple[str, ...] = tuple(OBJECT_SPECS)
MIN_SIZE = 56
GT_LEVELS = 3   # ground-truth mask levels: 0 object vs background, 1 parts, 2 subparts
SECOND_OBJECT_PROBABILITY = 0.5

# (colour at the top, colour at the horizon)
SKIES = [((70, 130, 210), (175, 208, 236)), ((60, 50, 120), (240, 150, 90)),
         ((128, 138, 152), (200, 204, 210)), ((110, 170, 232), (236, 226, 200))]
# (colour at the horizon, colour at the bottom edge)
GROUNDS = {"grass": ((120, 165, 80), (55, 115, 40)), "field": ((180, 160, 80), (125, 95, 45)),
           "sand": ((226, 208, 155), (196, 170, 118)), "water": ((100, 150, 190), (28, 68, 118))}
LAND_GROUNDS = ("grass", "field", "sand")


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    label: int  # index into SCENE_CLASSES
    masks: np.ndarray  # uint8 [3, H, W]: levels 0 (object), 1 (parts), 2 (subparts)


def render_scene(index: int, seed: int = 0, size: int = 112) -> Scene:
    """Render scene `index` of the dataset `seed` as a size x size image with its masks."""
    if size < MIN_SIZE:
        raise ValueError(f"scene size must be at least {MIN_SIZE} px, got {size}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([int(seed), int(index)])
    label = int(rng.integers(len(SCENE_CLASSES)))
    spec = OBJECT_SPECS[SCENE_CLASSES[label]]
    ground = _choose_ground(rng, spec.habitat)
    main_frame = _main_frame(rng, spec, size)
    horizon = _horizon(rng, main_frame, size)

    second = None
    if rng.random() < SECOND_OBJECT_PROBABILITY:
        fitting = [name for name in SCENE_CLASSES if _fits(OBJECT_SPECS[name].habitat, ground)]
        second_spec = OBJECT_SPECS[fitting[int(rng.integers(len(fitting)))]]
        second = (second_spec, _second_frame(rng, second_spec, main_frame, horizon, size))

    canvas = LayeredCanvas(_background(rng, size, horizon, ground))
    if second is not None:  # drawn first: it stands further away, behind the main object
        second[0].draw(canvas, second[1], rng)
    spec.draw(canvas, main_frame, rng)

    image, masks = canvas.to_arrays()
    grain = rng.integers(-3, 4, size=image.shape)
    image = np.clip(image.astype(np.int16) + grain, 0, 255).astype(np.uint8)
    masks[1], masks[2] = _compact_ids(masks[1]), _compact_ids(masks[2])
    return Scene(image=image, label=label, masks=masks)


def render_scenes(indices: Sequence[int], seed: int = 0, size: int = 112) -> dict[str, np.ndarray]:
    """{'image': uint8 [N,H,W,3], 'label': int64 [N], 'masks': uint8 [N,3,H,W]}"""
    scenes = [render_scene(int(index), seed, size) for index in indices]
    if not scenes:
        return {"image": np.zeros((0, size, size, 3), np.uint8), "label": np.zeros((0,), np.int64),
                "masks": np.zeros((0, 3, size, size), np.uint8)}
    return {"image": np.stack([scene.image for scene in scenes]),
            "label": np.array([scene.label for scene in scenes], dtype=np.int64),
            "masks": np.stack([scene.masks for scene in scenes])}


def masks_to_grid(masks: np.ndarray, grid: int) -> np.ndarray:
    """Majority vote of each (H/grid x W/grid) patch: [..., H, W] -> [..., grid, grid] (same dtype).

    Ties go to the smallest id. H and W must be divisible by grid; ValueError otherwise.
    """
    masks = np.asarray(masks)
    if masks.ndim < 2:
        raise ValueError(f"masks need at least 2 dimensions, got shape {masks.shape}")
    height, width = masks.shape[-2:]
    if grid <= 0 or height % grid or width % grid:
        raise ValueError(f"mask size {height}x{width} is not divisible by grid {grid}")
    lead = masks.shape[:-2]
    patches = masks.reshape(*lead, grid, height // grid, grid, width // grid)
    patches = np.swapaxes(patches, -3, -2).reshape(*lead, grid, grid, -1)
    values = np.unique(patches)
    counts = np.stack([(patches == value).sum(axis=-1) for value in values], axis=-1)
    return values[counts.argmax(axis=-1)].astype(masks.dtype)


def _compact_ids(labels: np.ndarray) -> np.ndarray:
    """Renumber the ids that survived occlusion to 1..k, keeping 0 as background."""
    present = np.unique(labels[labels > 0])
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[present] = np.arange(1, len(present) + 1)
    return lookup[labels]


def _fits(habitat: str, ground: str) -> bool:
    return habitat == "any" or (habitat == "water") == (ground == "water")


def _choose_ground(rng: np.random.Generator, habitat: str) -> str:
    if habitat == "water" or (habitat == "any" and rng.random() < 0.5):
        return "water"
    return LAND_GROUNDS[int(rng.integers(len(LAND_GROUNDS)))]


def _main_frame(rng: np.random.Generator, spec: ObjectSpec, size: int) -> Frame:
    """A roughly centred box; the object's share of the image is set by the spec's height range."""
    height = rng.uniform(*spec.height) * size
    width = min(height * rng.uniform(*spec.aspect), 0.96 * size)
    centre_x = np.clip(size * (0.5 + rng.uniform(-0.08, 0.08)), width / 2, size - width / 2)
    bottom = min(size * (0.5 + rng.uniform(-0.05, 0.07)) + height / 2, 0.98 * size)
    return Frame(centre_x - width / 2, bottom - height, width, height, mirrored=bool(rng.random() < 0.5))


def _horizon(rng: np.random.Generator, main: Frame, size: int) -> float:
    """Horizon row in pixels, kept above the main object's foot so it stands on the ground."""
    highest_foot = main.top + main.height - 0.12 * size
    return float(np.clip(rng.uniform(0.28, 0.62) * size, 0.15 * size, max(0.15 * size, highest_foot)))


def _second_frame(rng: np.random.Generator, spec: ObjectSpec, main: Frame, horizon: float, size: int) -> Frame:
    """A small box beside the main object, standing near the horizon (far away)."""
    height = main.height * rng.uniform(0.28, 0.4)
    width = height * rng.uniform(*spec.aspect)
    if width > 0.3 * size:  # wide classes (cars) would otherwise hide behind the main object
        height, width = height * 0.3 * size / width, 0.3 * size
    margin = 0.01 * size + width / 2
    main_centre = main.left + main.width / 2
    if main_centre > size / 2:  # place it on the side with more room
        low, high = margin, max(margin, main.left - 0.2 * width)
    else:
        low, high = min(size - margin, main.left + main.width + 0.2 * width), size - margin
    centre_x = rng.uniform(low, high)
    bottom = min(horizon + rng.uniform(0.03, 0.1) * size, 0.98 * size)
    return Frame(centre_x - width / 2, bottom - height, width, height, mirrored=bool(rng.random() < 0.5))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in roughly [-1, 1]: a coarse random grid, upsampled."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def _background(rng: np.random.Generator, size: int, horizon: float, ground: str) -> np.ndarray:
    """Sky gradient with clouds (and sometimes sun and hills) above a textured ground."""
    rows = np.arange(size, dtype=np.float32)[:, None]
    columns = np.arange(size, dtype=np.float32)[None, :]
    sky_top, sky_low = (np.array(jitter(rng, c, 12), np.float32) for c in SKIES[int(rng.integers(len(SKIES)))])
    t = np.clip(rows / horizon, 0, 1)[..., None]
    sky = sky_top * (1 - t) + sky_low * t + 8 * _smooth_noise(rng, size, 4)[..., None]

    far, near = (np.array(jitter(rng, c, 12), np.float32) for c in GROUNDS[ground])
    depth = np.clip((rows - horizon) / (size - horizon), 0, 1)
    land = far * (1 - depth[..., None]) + near * depth[..., None]
    texture = _ground_texture(rng, ground, rows, columns, depth, horizon, size)
    land = land + texture[..., None]

    pixels = np.where((rows < horizon)[..., None], sky, land)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    _draw_sky_features(rng, ImageDraw.Draw(image), size, horizon, sky_low, ground)
    return np.asarray(image)


def _ground_texture(rng: np.random.Generator, ground: str, rows: np.ndarray, columns: np.ndarray,
                    depth: np.ndarray, horizon: float, size: int) -> np.ndarray:
    """Brightness offsets [H, W] that give each ground kind its look."""
    fine = rng.standard_normal((size, size)).astype(np.float32)
    blotches = _smooth_noise(rng, size, 8)
    if ground == "grass":
        mowing = np.sign(np.sin(2 * np.pi * (columns / size * rng.uniform(2, 4) + depth * rng.uniform(1, 3))))
        return 12 * blotches + 6 * fine + rng.uniform(0, 8) * mowing
    if ground == "field":  # furrows converging on a vanishing point on the horizon
        spread = (columns - size * rng.uniform(0.3, 0.7)) / (np.maximum(rows - horizon, 0) + 0.05 * size)
        return 22 * np.sin(rng.uniform(10, 16) * spread) + 6 * blotches + 5 * fine
    if ground == "sand":
        ripples = np.sin(2 * np.pi * (rows / size * rng.uniform(8, 14) + 0.6 * blotches))
        return 10 * ripples + 8 * fine
    waves = np.sin(2 * np.pi * rng.uniform(1.5, 2.5) / (depth + 0.08) + 2.0 * blotches)
    return 22 * np.clip(waves, 0.4, 1.0) - 9 + 4 * fine


def _draw_sky_features(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int, horizon: float,
                       sky_low: np.ndarray, ground: str) -> None:
    if rng.random() < 0.4:
        x, y, r = rng.uniform(0.1, 0.9) * size, rng.uniform(0.05, 0.6) * horizon, rng.uniform(0.04, 0.07) * size
        draw.ellipse((x - r, y - r, x + r, y + r), fill=jitter(rng, (252, 232, 150), 6))
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, 1) * size, rng.uniform(0.1, 0.7) * horizon
        colour = jitter(rng, (245, 245, 248), 8)
        for _ in range(int(rng.integers(3, 6))):
            dx, dy = rng.uniform(-0.08, 0.08) * size, rng.uniform(-0.02, 0.02) * size
            rx, ry = rng.uniform(0.04, 0.08) * size, rng.uniform(0.02, 0.04) * size
            draw.ellipse((x + dx - rx, y + dy - ry, x + dx + rx, y + dy + ry), fill=colour)
    if ground != "water" and rng.random() < 0.6:  # distant hills along the horizon
        xs = np.linspace(-0.05, 1.05, 9) * size
        peaks = horizon - rng.uniform(0.02, 0.1, size=9) * size
        tone = tuple(int(c) for c in np.clip(0.6 * sky_low + np.array([10, 40, 10]), 0, 255))
        ridge = [(float(x), float(y)) for x, y in zip(xs, peaks)]
        draw.polygon(ridge + [(size, horizon + 1), (0, horizon + 1)], fill=tone)
