"""Hierarchy: latent store -> teacher store (per-image region ids for levels 0..L-2).

hierarchy.source "clustered" clusters the standardised latents on Dask; "ground_truth" (the
scenes' oracle teacher) votes the image store's ground-truth masks down to the token grid, in
this process (a vote over uint8 masks costs less than starting a cluster). Both write the same
store, so training, evaluation and the dashboard read either unchanged.
"""
from __future__ import annotations

import numpy as np

from models.encoder import ENCODER_OUTPUT
from storage import zarr_store
from storage.config import TFConfig
from storage.keys import Layout
from storage.zarr_store import ArraySpec
from tasks.chunk_workers import batched_chunks, ground_truth_chunk, hierarchy_chunk
from tasks.dask_chunks import run_chunks
from tasks.progress import Progress
from tasks.plan import hierarchy_spec
from tasks.stage import Done, Stage, run_stage, stage_task

# What the teacher store's attributes say it was built from (DESIGN section 3).
CLUSTERED_INPUT = "standardised latents (per-channel dataset mean/std)"
GROUND_TRUTH_INPUT = "ground-truth masks (majority vote per token, nested)"


@stage_task("hierarchy")
def build_teacher(cfg: TFConfig, root: str, force: bool = False) -> dict:
    layout = Layout(root, cfg)
    return run_stage(cfg, teacher_stage(cfg, layout), force, lambda: _build_teacher(cfg, layout))


def teacher_stage(cfg: TFConfig, layout: Layout) -> Stage:
    """The hierarchy stage: its key, folder and the stores it reads (also what a teacher store filled by the
    encode pass records it was built from)."""
    # the oracle teacher also reads the image store's masks, row by row beside the latents
    needs = [(layout.latents(), "encode")] + ([(layout.images(), "ingest")] if cfg.hierarchy.source == "ground_truth"
                                               else [])
    return Stage("hierarchy", layout.keys.teacher, layout.teacher(), store_stage="teacher", needs=needs)


def teacher_template(cfg: TFConfig, layout: Layout) -> list[tuple[int, int]]:
    """The teacher store's template for this config (or the one already there, checked to be it): attrs,
    sample ids, levels. Returns the chunk bounds. Shared with the encode stage, which fills it in the
    same pass as the latents when it can (tasks.encode.stage: the hierarchy fused into encode)."""
    latents, path = layout.latents(), layout.teacher()
    tokens = zarr_store.open_array(latents, "tokens")
    num, grid = tokens.shape[0], tokens.shape[1]
    levels = cfg.hierarchy.partition_levels
    chunk_size = zarr_store.store_attrs(latents)["chunk_size"]
    ground_truth = cfg.hierarchy.source == "ground_truth"
    attrs = {"stage": "teacher", "key": layout.keys.teacher, "latents_key": layout.keys.latents,
             "hierarchy": cfg.hierarchy.model_dump(), "partition_keys": list(layout.keys.partitions),
             "encoder_weights": zarr_store.store_attrs(latents)["encoder_weights"],
             "hierarchy_input": GROUND_TRUTH_INPUT if ground_truth else CLUSTERED_INPUT,
             "encoder_output": ENCODER_OUTPUT}
    arrays = {"sample": ArraySpec((num,), str, ("sample",), fill_value=""),
              "level": ArraySpec((levels,), np.int64, ("level",), per_sample=False),
              "regions": ArraySpec((num, levels, grid, grid), np.int16, ("sample", "level", "gy", "gx"))}
    zarr_store.create_store(path, arrays, chunk_size, attrs)
    zarr_store.write_array(path, "sample", zarr_store.open_array(latents, "sample")[:])
    zarr_store.write_array(path, "level", np.arange(levels))
    return zarr_store.chunk_bounds(num, chunk_size)


def teacher_marker(cfg: TFConfig, num: int) -> dict:
    """The completion marker of a teacher store of `num` samples (whichever stage filled it)."""
    return {"samples": num, "levels": cfg.hierarchy.partition_levels}


def _build_teacher(cfg: TFConfig, layout: Layout) -> Done:
    latents, path = layout.latents(), layout.teacher()
    tokens = zarr_store.open_array(latents, "tokens")
    num, grid = tokens.shape[0], tokens.shape[1]
    ground_truth = cfg.hierarchy.source == "ground_truth"
    if ground_truth:
        images = layout.images()
        _check_ground_truth(images, latents, cfg.hierarchy.partition_levels, cfg.hierarchy.cuts)
    bounds = teacher_template(cfg, layout)
    pending = zarr_store.pending_chunks(path, len(bounds))
    if ground_truth:
        with Progress(len(pending), "hierarchy (ground truth)", unit="chunk") as bar:
            for chunk in pending:
                ground_truth_chunk(str(images), str(path), chunk, *bounds[chunk], grid)
                bar.advance()
    elif cfg.hierarchy.backend == "batched" and not cfg.ingest.dask_address:
        # one process with the GPU (where there is one): Dask worker processes would each start CUDA
        with Progress(len(pending), "hierarchy", unit="chunk") as bar:
            batched_chunks(hierarchy_spec(cfg.hierarchy), latents, path, [(c, *bounds[c]) for c in pending],
                           on_chunk=bar.advance)
    else:   # the spec itself crosses to the workers: a small frozen dataclass, validated once here
        spec = hierarchy_spec(cfg.hierarchy)
        todo = [(spec, cfg.hierarchy.backend, str(latents), str(path), c, *bounds[c]) for c in pending]
        run_chunks(hierarchy_chunk, todo, description="hierarchy", address=cfg.ingest.dask_address,
                   workers=cfg.ingest.workers, worker_loss_timeout=cfg.ingest.worker_loss_timeout)
    return Done(teacher_marker(cfg, num), {"images": num})


def _check_ground_truth(images, latents, levels: int, cuts: list[float]) -> None:
    """The oracle teacher needs the image store's masks, one ground-truth level per partition level, its
    rows holding the latents' samples in their order (the chunks read both stores by row)."""
    if not zarr_store.is_complete(images):
        raise RuntimeError(f"image store {images} is incomplete: run `tf ingest` first")
    if not zarr_store.has_array(images, "masks"):
        raise ValueError(f"hierarchy.source 'ground_truth': the image store {images} holds no ground-truth "
                         f"masks (only source.kind 'scenes' has them)")
    shape = zarr_store.open_array(images, "masks").shape
    if shape[1] != levels:
        raise ValueError(f"hierarchy.source 'ground_truth': the image store has {shape[1]} ground-truth levels "
                         f"but hierarchy.cuts {cuts} gives len(cuts) + 1 = {levels} partition levels")
    ids = [zarr_store.open_array(store, "sample")[:] for store in (images, latents)]
    if shape[0] != len(ids[1]) or not np.array_equal(*ids):
        raise RuntimeError(f"image store {images} ({shape[0]} masks) does not hold the samples of the latent store "
                           f"{latents} ({len(ids[1])} samples) row by row: run `tf encode` to rebuild the latents")
