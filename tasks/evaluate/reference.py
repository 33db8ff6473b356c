"""The real side of the evaluation: image-feature statistics cached with the real set, level statistics per teacher.

Image features (FD-DINOv2, Inception pool for FID/KID) depend only on the real images and
the extractor's weights, so they are computed once and stored in the images stage folder
(storage.reference_stats), keyed by the extractor label and the set of images used. The
per-level canvas statistics depend on the teacher hierarchy; they are cheap and computed
on every evaluation.
"""
from __future__ import annotations

import concurrent.futures as cf
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


def image_reference(images_store: Path, index: np.ndarray, extractor_label: str, *,
                    dinov2_fn: Callable | None = None, inception_fn: Callable | None = None,
                    feature_fns: dict[str, Callable] | None = None,
                    device: str = "cpu", batch_size: int = 256, kid_reservoir: int = 10_000,
                    force: bool = False, read_pixels: Callable | None = None) -> tuple[dict[str, np.ndarray], bool]:
    """(statistics, reused) of the real images `index` under one extractor; computed and stored when absent.
    read_pixels(index) -> uint8 images (tasks.encode.files.real_pixels); default: the image store's rows."""
    label = _set_label(extractor_label, index)
    found = None if force else load_reference(images_store, label)
    if found is not None:
        return found[0], True
    if read_pixels is None:
        images = zarr_store.open_array(images_store, "image")

        def read_pixels(rows: np.ndarray) -> np.ndarray:
            return np.asarray(images.oindex[rows])
    parts = [index[start:start + batch_size] for start in range(0, len(index), batch_size)]

    def batches():
        # the next batch is read (decoded from its files, on a GPU machine) while this one is encoded
        with Progress(len(index), f"reference {extractor_label.split(':')[0]}", unit="img") as bar, \
                cf.ThreadPoolExecutor(1, thread_name_prefix="reference-read") as ahead:
            pending = ahead.submit(read_pixels, parts[0]) if parts else None
            for following in [*parts[1:], None]:
                chunk = pending.result()
                pending = None if following is None else ahead.submit(read_pixels, following)
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
