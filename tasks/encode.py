"""Encode: image store -> latent store (DINOv2 patch tokens as float16 + per-channel mean/std).

One chunk = one call of `tasks.chunk_workers.encode_chunk_with` (tokens, its row of moments,
marker last). Without `ingest.dask_address` the chunks run here, one after another, on this
process's device (the fast path for one machine with one GPU). With it, every chunk is a Dask
task annotated `resources={"GPU": 1}`, so it runs only on workers started with
`--resources GPU=1`; each such worker builds the encoder once and keeps it. Only paths, ints
and small dicts cross Dask. Merging the moments into mean/std and marking the store complete
always happen here.
"""
from __future__ import annotations

import time

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.channel_stats import mean_std
from models.encoder import ENCODER_OUTPUT, grid_size, resolve_encoder_name, token_dim
from models.encoder import weights_label as planned_weights_label
from storage import zarr_store
from storage.config import TFConfig
from storage.files import remove_tree
from storage.keys import Layout
from storage.zarr_store import ArraySpec
from tasks.chunk_workers import encode_chunk, encode_chunk_with
from tasks.dask_chunks import run_chunks
from tasks.encoder_load import load_encoder
from tasks.progress import Progress
from tasks.stage import STAGE_RETRIES, pick_device, stage_lock, stage_result

GPU_RESOURCES = {"GPU": 1}


def latent_store_arrays(num: int, num_chunks: int, grid: int, dim: int, dtype) -> dict[str, ArraySpec]:
    stored, float_attrs = zarr_store.float_storage(dtype)   # bfloat16: uint16 bit patterns + attribute
    return {
        "sample": ArraySpec((num,), str, ("sample",), fill_value=""),
        "tokens": ArraySpec((num, grid, grid, dim), stored, ("sample", "gy", "gx", "channel"), compressed=False,
                            attrs=float_attrs),
        "label": ArraySpec((num,), np.int64, ("sample",), fill_value=-1),
        "valid": ArraySpec((num,), bool, ("sample",), fill_value=False),
        # One row per encode chunk, each its own Zarr chunk: parallel chunk tasks never share a file.
        "chunk_count": ArraySpec((num_chunks,), np.int64, ("chunk",), chunk_rows=1),
        "chunk_mean": ArraySpec((num_chunks, dim), np.float64, ("chunk", "channel"), chunk_rows=1),
        "chunk_m2": ArraySpec((num_chunks, dim), np.float64, ("chunk", "channel"), chunk_rows=1),
        "mean": ArraySpec((dim,), np.float32, ("channel",), per_sample=False),
        "std": ArraySpec((dim,), np.float32, ("channel",), per_sample=False),
    }


def plan_encoder(cfg: TFConfig) -> tuple[str, int, int]:
    """(weights label, grid, dim) of the encoder the GPU workers will build, without loading it
    here: the label hashes the weights file; grid and dim come from a weightless meta-device model."""
    import timm
    import torch

    enc = cfg.encoder
    # a file, an HF cache folder or "hf-cache"; raises MissingWeightsError saying how to supply weights
    label = planned_weights_label(enc.model, enc.weights, enc.allow_random_init)
    with torch.device("meta"):
        skeleton = timm.create_model(resolve_encoder_name(enc.model), pretrained=False,
                                     img_size=cfg.source.image_size, num_classes=0)
    return label, grid_size(skeleton), token_dim(skeleton)


@task(name="encode", cache_policy=NO_CACHE, **STAGE_RETRIES)
def encode_latents(cfg: TFConfig, root: str, force: bool = False) -> dict:
    with stage_lock(cfg, Layout(root, cfg).latents()):   # a second run on this store waits or fails here
        return _encode(cfg, root, force)


def _encode(cfg: TFConfig, root: str, force: bool) -> dict:
    started = time.monotonic()
    layout = Layout(root, cfg)
    images, path = layout.images(), layout.latents()
    if force:
        remove_tree(path)
    if zarr_store.is_complete(path):
        zarr_store.check_compatible(path, {"stage": "latents", "key": layout.keys.latents})
        return stage_result("encode", layout.keys.latents, path, False, started,
                            encoder_weights=zarr_store.store_attrs(path)["encoder_weights"])
    if not zarr_store.is_complete(images):
        raise RuntimeError(f"image store {images} is incomplete: run `tf ingest` first")
    address = cfg.ingest.dask_address
    if address:
        model, device = None, None
        weights_label, grid, dim = plan_encoder(cfg)
    else:
        device = pick_device(cfg.device)
        model, weights_label = load_encoder(cfg.encoder.model, cfg.source.image_size, cfg.encoder.weights,
                                             cfg.encoder.allow_random_init)
        model = model.to(device)
        grid, dim = grid_size(model), token_dim(model)
    num = zarr_store.open_array(images, "label").shape[0]
    chunk_size = zarr_store.store_attrs(images)["chunk_size"]
    bounds = zarr_store.chunk_bounds(num, chunk_size)
    attrs = {"stage": "latents", "key": layout.keys.latents, "images_key": layout.keys.images,
             "encoder": cfg.encoder.model, "encoder_weights": weights_label, "image_size": cfg.source.image_size,
             "encoder_output": ENCODER_OUTPUT}
    zarr_store.create_store(path, latent_store_arrays(num, len(bounds), grid, dim, cfg.encoder.dtype), chunk_size, attrs)
    zarr_store.write_array(path, "sample", zarr_store.open_array(images, "sample")[:])
    pending = zarr_store.pending_chunks(path, len(bounds))
    if address:
        todo = [(cfg.encoder.model_dump(), cfg.source.image_size, cfg.device, str(images), str(path), c,
                 *bounds[c], weights_label) for c in pending]
        run_chunks(encode_chunk, todo, description="encode", address=address, workers=cfg.ingest.workers,
                   resources=GPU_RESOURCES, worker_loss_timeout=cfg.ingest.worker_loss_timeout)
    else:
        with Progress(num, "encode", unit="img") as bar:
            bar.advance(num - sum(bounds[c][1] - bounds[c][0] for c in pending))
            for chunk in pending:
                start, stop = bounds[chunk]
                encode_chunk_with(model, weights_label, device, str(images), str(path), chunk, start, stop,
                                  cfg.encoder.batch_size, cfg.encoder.dtype)
                bar.advance(stop - start)
    mean, std = mean_std(*(zarr_store.open_array(path, n)[:] for n in ("chunk_count", "chunk_mean", "chunk_m2")))
    zarr_store.write_array(path, "mean", mean)
    zarr_store.write_array(path, "std", std)
    zarr_store.mark_complete(path, {"samples": num, "encoder_weights": weights_label, "grid": grid, "dim": dim})
    return stage_result("encode", layout.keys.latents, path, True, started, encoder_weights=weights_label)
