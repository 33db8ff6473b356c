"""Encode: image store -> latent store (DINOv2 patch tokens as float16 + per-channel mean/std)."""
from __future__ import annotations

import time

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.channel_stats import chunk_moments, mean_std
from models.encoder import build_encoder, encode_images, grid_size, token_dim
from storage import zarr_store
from storage.config import TFConfig
from storage.keys import Layout
from storage.zarr_store import ArraySpec
from tasks.progress import Progress
from tasks.stage import pick_device, stage_result


def latent_store_arrays(num: int, num_chunks: int, grid: int, dim: int, dtype) -> dict[str, ArraySpec]:
    return {
        "sample": ArraySpec((num,), str, ("sample",), fill_value=""),
        "tokens": ArraySpec((num, grid, grid, dim), dtype, ("sample", "gy", "gx", "channel")),
        "label": ArraySpec((num,), np.int64, ("sample",), fill_value=-1),
        "valid": ArraySpec((num,), bool, ("sample",), fill_value=False),
        "chunk_count": ArraySpec((num_chunks,), np.int64, ("chunk",), per_sample=False),
        "chunk_mean": ArraySpec((num_chunks, dim), np.float64, ("chunk", "channel"), per_sample=False),
        "chunk_m2": ArraySpec((num_chunks, dim), np.float64, ("chunk", "channel"), per_sample=False),
        "mean": ArraySpec((dim,), np.float32, ("channel",), per_sample=False),
        "std": ArraySpec((dim,), np.float32, ("channel",), per_sample=False),
    }


@task(name="encode", cache_policy=NO_CACHE)
def encode_latents(cfg: TFConfig, root: str) -> dict:
    started = time.monotonic()
    layout = Layout(root, cfg)
    images, path = layout.images(), layout.latents()
    if zarr_store.is_complete(path):
        return stage_result("encode", layout.keys.latents, path, False, started,
                            encoder_weights=zarr_store.store_attrs(path)["encoder_weights"])
    if not zarr_store.is_complete(images):
        raise RuntimeError(f"image store {images} is incomplete: run `tf ingest` first")
    device = pick_device(cfg.device)
    model, weights_label = build_encoder(cfg.encoder.model, cfg.source.image_size, cfg.encoder.weights,
                                         cfg.encoder.allow_random_init)
    model = model.to(device)
    num = zarr_store.open_array(images, "label").shape[0]
    chunk_size = zarr_store.store_attrs(images)["chunk_size"]
    bounds = zarr_store.chunk_bounds(num, chunk_size)
    attrs = {"stage": "latents", "key": layout.keys.latents, "images_key": layout.keys.images,
             "encoder": cfg.encoder.model, "encoder_weights": weights_label, "image_size": cfg.source.image_size}
    grid, dim = grid_size(model), token_dim(model)
    zarr_store.create_store(path, latent_store_arrays(num, len(bounds), grid, dim, cfg.encoder.dtype), chunk_size, attrs)
    zarr_store.write_array(path, "sample", zarr_store.open_array(images, "sample")[:])
    autocast = {"cuda": __import__("torch").bfloat16}.get(device)
    with Progress(num, "encode", unit="img") as bar:
        for chunk, (start, stop) in enumerate(bounds):
            if zarr_store.chunk_done(path, chunk):
                bar.advance(stop - start)
                continue
            pixels = zarr_store.open_array(images, "image")[start:stop]
            valid = zarr_store.open_array(images, "valid")[start:stop]
            tokens = encode_images(model, pixels, device=device, batch_size=cfg.encoder.batch_size, dtype=autocast)
            tokens[~valid] = 0.0   # rejected slots hold no image; keep them out of every statistic
            count, mean, m2 = chunk_moments(tokens[valid])
            zarr_store.write_rows(path, chunk, {"chunk_count": count, "chunk_mean": mean, "chunk_m2": m2})
            zarr_store.write_chunk(path, chunk, start, {
                "tokens": tokens.astype(cfg.encoder.dtype), "valid": valid,
                "label": zarr_store.open_array(images, "label")[start:stop]})
            bar.advance(stop - start)
    mean, std = mean_std(*(zarr_store.open_array(path, n)[:] for n in ("chunk_count", "chunk_mean", "chunk_m2")))
    zarr_store.write_array(path, "mean", mean)
    zarr_store.write_array(path, "std", std)
    zarr_store.mark_complete(path, {"samples": num, "encoder_weights": weights_label, "grid": grid, "dim": dim})
    return stage_result("encode", layout.keys.latents, path, True, started, encoder_weights=weights_label)
