"""Image sources: the built-in scenes and an ImageNet-style class-folder tree.

A source is listed once (stable ids, labels) and then read chunk by chunk, so Dask
workers can read disjoint slices. Bad files never vanish: they come back as rejects.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from storage.config import SourceConfig

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
MIN_SIDE = 8   # smaller images carry no content worth a sample (a 1x1 "image" is one colour)
# Above this many pixels a file is refused before decoding (PIL only warns below 2x its own limit).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class BadImage(ValueError):
    """A file that opens but cannot become a sample (too small, too large)."""


@dataclass(frozen=True)
class SourceListing:
    ids: list[str]            # stable per sample: scenes index, or path relative to the root
    labels: np.ndarray        # int64 [N]
    classes: list[str]
    has_masks: bool
    empty_classes: tuple[str, ...] = field(default=())   # class folders without one image file


def list_source(cfg: SourceConfig) -> SourceListing:
    if cfg.kind == "scenes":
        from storage.scenes import SCENE_CLASSES

        ids = [f"scene-s{cfg.seed}-{i:07d}" for i in range(cfg.num_images)]
        # Labels are decided by the renderer; -1 until the chunk is rendered.
        return SourceListing(ids, np.full(cfg.num_images, -1, np.int64), list(SCENE_CLASSES), True)
    if cfg.kind in ("imagenet_val", "imagenet_tar"):   # flat val folder + labels, nested train tar
        from storage.imagenet import list_imagenet

        return list_imagenet(cfg)
    return _list_imagefolder(Path(cfg.path), cfg.num_images)


def _list_imagefolder(root: Path, cap: int) -> SourceListing:
    if not root.is_dir():
        raise FileNotFoundError(f"source.path {root} is not a folder (expected <root>/<synset>/<image>.JPEG)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())  # ImageFolder numbering
    ids, labels = [], []
    for index, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name, followlinks=False)):
            for file in sorted(files):
                if Path(file).suffix.lower() in IMAGE_SUFFIXES:
                    ids.append(str((Path(dirpath) / file).relative_to(root)))
                    labels.append(index)
    if not ids:
        raise FileNotFoundError(f"no images under {root} (suffixes {sorted(IMAGE_SUFFIXES)})")
    present = set(labels)   # before the cap: a class cut off by the cap is not empty
    empty = tuple(name for index, name in enumerate(classes) if index not in present)
    if cap:
        ids, labels = ids[:cap], labels[:cap]
    return SourceListing(ids, np.asarray(labels, np.int64), classes, False, empty)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16/32-bit and float greyscale are scaled, not clipped; palette
    images with transparency go through RGBA; alpha is dropped (as torchvision's ImageFolder does)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and values.max(initial=0) <= 1.0 else (65535.0 if values.max(initial=0) > 255 else 255.0)
        return Image.fromarray(np.clip(np.rint(values * 255.0 / top), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to `size` (bicubic, antialiased), centre-crop to size x size, RGB uint8."""
    image = to_rgb(image)
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def check_size(image: Image.Image) -> None:
    """Refuse decompression bombs and images too small to crop, before decoding the pixels."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise BadImage(f"decompression bomb: {width}x{height} = {width * height} px > {MAX_PIXELS} px limit")
    if min(width, height) < MIN_SIDE:
        raise BadImage(f"image is {width}x{height} px, smaller than the {MIN_SIDE} px minimum side")


def read_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as image:   # PIL itself refuses > 2x MAX_IMAGE_PIXELS (DecompressionBombError)
        check_size(image)
        image.load()
        return center_crop_resize(image, size)


def read_chunk(cfg: SourceConfig, ids: list[str], labels: np.ndarray, start: int) -> dict:
    """The samples `ids` (sample indices start..start+len(ids)): images, labels, masks (scenes), valid flags, rejects."""
    count = len(ids)
    stop = start + count
    if cfg.kind == "scenes":
        from storage.scenes import render_scenes

        batch = render_scenes(range(start, stop), seed=cfg.seed, size=cfg.image_size)
        return {"image": batch["image"], "label": batch["label"].astype(np.int64),
                "masks": batch["masks"], "valid": np.ones(count, bool), "rejects": []}
    from storage import imagenet   # ImageNet kinds, and imagefolder with source.resize_short/interpolation set

    if imagenet.handles(cfg):
        return imagenet.read_imagenet_chunk(cfg, ids, labels, start)
    images = np.zeros((count, cfg.image_size, cfg.image_size, 3), np.uint8)
    valid = np.zeros(count, bool)
    rejects = []
    for offset, sample_id in enumerate(ids):
        path = Path(cfg.path) / sample_id
        try:
            images[offset] = read_image(path, cfg.image_size)
            valid[offset] = True
        except Exception as error:  # any unreadable file is a reject, never a crash
            rejects.append({"stage": "ingest", "path": str(path), "reason": f"{type(error).__name__}: {error}"})
    return {"image": images, "label": np.asarray(labels, np.int64), "valid": valid, "rejects": rejects}
