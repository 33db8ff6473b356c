"""The real side of the evaluation: image-feature statistics cached with the real set, level statistics per teacher.

Image features (FD-DINOv2, Inception pool for FID/KID) depend only on the real images and
the extractor's weights, so they are computed once and stored in the images stage folder
(storage.reference_stats), keyed by the extractor label and the set of images used. The
per-level canvas statistics depend on the teacher hierarchy; they are cheap and computed
on every evaluation.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.evaluation.eval_stats import reference_stats
from storage import zarr_store
from storage.reference_stats import load_reference, save_reference
from tasks.progress import Progress


def _set_label(extractor_label: str, index: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(index, dtype=np.int64).tobytes()).hexdigest()[:12]
    return f"{extractor_label}|set:{len(index)}:{digest}"


def _stored_rows(images, parts: list[np.ndarray]):
    """The image store's rows of each part; the next part is read while the caller encodes this one."""
    def read(rows: np.ndarray) -> np.ndarray:
        return np.asarray(images.oindex[rows])

    with cf.ThreadPoolExecutor(1, thread_name_prefix="reference-read") as ahead:
        pending = ahead.submit(read, parts[0]) if parts else None
        for following in [*parts[1:], None]:
            chunk = pending.result()
            pending = None if following is None else ahead.submit(read, following)
            yield chunk


def image_reference(images_store: Path, index: np.ndarray, extractor_label: str, *,
                    dinov2_fn: Callable | None = None, inception_fn: Callable | None = None,
                    feature_fns: dict[str, Callable] | None = None,
                    device: str = "cpu", batch_size: int = 256, kid_reservoir: int = 10_000,
                    force: bool = False, pixel_batches: Callable | None = None) -> tuple[dict[str, np.ndarray], bool]:
    """(statistics, reused) of the real images `index` under one extractor; computed and stored when absent.
    pixel_batches(parts) -> uint8 images per part (tasks.encode.pixels.real_pixel_batches, which decodes what
    the image store does not hold); default: the image store's rows, the next part read while one is encoded."""
    label = _set_label(extractor_label, index)
    found = None if force else load_reference(images_store, label)
    if found is not None:
        return found[0], True
    if pixel_batches is None:
        pixel_batches = functools.partial(_stored_rows, zarr_store.open_array(images_store, "image"))
    parts = [index[start:start + batch_size] for start in range(0, len(index), batch_size)]

    def batches():
        with Progress(len(index), f"reference {extractor_label.split(':')[0]}", unit="img") as bar:
            for chunk in pixel_batches(parts):
                yield chunk, []
                bar.advance(len(chunk))

    arrays = reference_stats(batches(), dinov2_fn, inception_fn=inception_fn, device=device,
                             tokens_per_sample=0, kid_reservoir=kid_reservoir, feature_fns=feature_fns)
    save_reference(images_store, label, arrays, {"extractor_label": extractor_label, "images": int(len(index))})
    return arrays, False


def level_reference(latents, teacher: torch.Tensor, *, device: str = "cpu", batch_size: int = 256,
                    tokens_per_sample: int = 4) -> dict[str, np.ndarray]:
    """Per-level statistics ("level{l}.mean_pooled" / ".tokens") of the teacher canvases of `latents`
    (tasks.train.level_data.Latents) under `teacher` [N, L-1, T], built batch by batch on `device`."""
    from tasks.train.level_data import canvases

    n = len(latents)

    def batches():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            x = latents.normalised(slice(start, stop), device)
            yield np.empty((stop - start, 0), np.uint8), canvases(x, teacher[start:stop].to(device))

    return reference_stats(batches(), None, device=device, tokens_per_sample=tokens_per_sample)
