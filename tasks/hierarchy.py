"""Hierarchy: latent store -> teacher store (per-image region ids for levels 0..L-2), on Dask."""
from __future__ import annotations

import time

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import zarr_store
from storage.config import TFConfig
from storage.files import remove_tree
from storage.keys import Layout
from storage.zarr_store import ArraySpec
from tasks.chunk_workers import hierarchy_chunk
from tasks.dask_chunks import run_chunks
from tasks.stage import stage_lock, stage_result


@task(name="hierarchy", cache_policy=NO_CACHE)
def build_teacher(cfg: TFConfig, root: str, force: bool = False) -> dict:
    with stage_lock(cfg, Layout(root, cfg).teacher()):   # a second run on this store waits or fails here
        return _build_teacher(cfg, root, force)


def _build_teacher(cfg: TFConfig, root: str, force: bool) -> dict:
    started = time.monotonic()
    layout = Layout(root, cfg)
    latents, path = layout.latents(), layout.teacher()
    if force:
        remove_tree(path)
    if zarr_store.is_complete(path):
        zarr_store.check_compatible(path, {"stage": "teacher", "key": layout.keys.teacher})
        return stage_result("hierarchy", layout.keys.teacher, path, False, started)
    if not zarr_store.is_complete(latents):
        raise RuntimeError(f"latent store {latents} is incomplete: run `tf encode` first")
    tokens = zarr_store.open_array(latents, "tokens")
    num, grid = tokens.shape[0], tokens.shape[1]
    levels = len(cfg.hierarchy.cuts) + 1
    chunk_size = zarr_store.store_attrs(latents)["chunk_size"]
    attrs = {"stage": "teacher", "key": layout.keys.teacher, "latents_key": layout.keys.latents,
             "hierarchy": cfg.hierarchy.model_dump(), "partition_keys": list(layout.keys.partitions),
             "encoder_weights": zarr_store.store_attrs(latents)["encoder_weights"]}
    arrays = {"sample": ArraySpec((num,), str, ("sample",), fill_value=""),
              "level": ArraySpec((levels,), np.int64, ("level",), per_sample=False),
              "regions": ArraySpec((num, levels, grid, grid), np.int16, ("sample", "level", "gy", "gx"))}
    zarr_store.create_store(path, arrays, chunk_size, attrs)
    zarr_store.write_array(path, "sample", zarr_store.open_array(latents, "sample")[:])
    zarr_store.write_array(path, "level", np.arange(levels))
    bounds = zarr_store.chunk_bounds(num, chunk_size)
    todo = [(cfg.hierarchy.model_dump(), str(latents), str(path), c, *bounds[c])
            for c in zarr_store.pending_chunks(path, len(bounds))]
    run_chunks(hierarchy_chunk, todo, description="hierarchy", address=cfg.ingest.dask_address,
               workers=cfg.ingest.workers)
    zarr_store.mark_complete(path, {"samples": num, "levels": levels})
    return stage_result("hierarchy", layout.keys.teacher, path, True, started)
