"""Ingest: image source -> image store (Zarr: uint8 images, labels, ids, GT masks, rejects)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import zarr_store
from storage.config import TFConfig
from storage.files import remove_tree
from storage.keys import Layout
from storage.sources import list_source
from storage.tables import REJECT_COLUMNS, atomic_write_parquet, load_rejects, now_iso
from storage.zarr_store import ArraySpec
from tasks.chunk_workers import ingest_chunk
from tasks.dask_chunks import run_chunks
from tasks.stage import stage_lock, stage_result


def image_store_arrays(num: int, size: int, with_masks: bool) -> dict[str, ArraySpec]:
    arrays = {
        "sample": ArraySpec((num,), str, ("sample",), fill_value=""),
        "image": ArraySpec((num, size, size, 3), np.uint8, ("sample", "y", "x", "rgb")),
        "label": ArraySpec((num,), np.int64, ("sample",), fill_value=-1),
        "valid": ArraySpec((num,), bool, ("sample",), fill_value=False),
    }
    if with_masks:
        arrays["masks"] = ArraySpec((num, 3, size, size), np.uint8, ("sample", "gt_level", "y", "x"))
    return arrays


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_images(cfg: TFConfig, root: str, force: bool = False) -> dict:
    with stage_lock(cfg, Layout(root, cfg).images()):   # a second run on this store waits or fails here
        return _ingest(cfg, root, force)


def _ingest(cfg: TFConfig, root: str, force: bool) -> dict:
    started = time.monotonic()
    layout = Layout(root, cfg)
    path = layout.images()
    if force:
        remove_tree(path)
    if zarr_store.is_complete(path):
        zarr_store.check_compatible(path, {"stage": "images", "key": layout.keys.images})
        return stage_result("ingest", layout.keys.images, path, False, started)
    listing = list_source(cfg.source)
    num, chunk_size = len(listing.ids), cfg.ingest.chunk_size
    attrs = {"stage": "images", "key": layout.keys.images, "source": cfg.source.model_dump(),
             "classes": listing.classes}
    zarr_store.create_store(path, image_store_arrays(num, cfg.source.image_size, listing.has_masks), chunk_size, attrs)
    zarr_store.write_array(path, "sample", np.asarray(listing.ids, dtype=str))
    write_listing_rejects(path, listing.empty_classes, cfg.source.path)
    bounds = zarr_store.chunk_bounds(num, chunk_size)
    todo = [(cfg.source.model_dump(), str(path), c, start, listing.ids[start:stop], listing.labels[start:stop].tolist())
            for c in zarr_store.pending_chunks(path, len(bounds)) for start, stop in [bounds[c]]]
    run_chunks(ingest_chunk, todo, description="ingest", address=cfg.ingest.dask_address, workers=cfg.ingest.workers)
    infos = zarr_store.chunk_infos(path)
    accepted = sum(i["accepted"] for i in infos)
    rejected = len(load_rejects(path))
    seen = num + len(listing.empty_classes)   # every listed file, and every class folder without one
    if accepted + rejected != seen:   # a sample neither stored nor rejected would be lost silently
        raise RuntimeError(f"ingest of {path}: accepted {accepted} + rejected {rejected} != seen {seen}")
    zarr_store.mark_complete(path, {"samples": num, "seen": seen, "accepted": accepted, "rejected": rejected})
    return stage_result("ingest", layout.keys.images, path, True, started, seen=seen, accepted=accepted,
                        rejected=rejected)


def write_listing_rejects(path, empty_classes: tuple[str, ...], source_root: str | None) -> None:
    """Class folders with no image: a reject row each (the class keeps its number, as in ImageFolder)."""
    rows = [{"stage": "ingest", "path": str(Path(source_root or "") / name), "reason": "empty class folder: no image files",
             "chunk": -1, "timestamp": now_iso()} for name in empty_classes]
    if rows:
        atomic_write_parquet(pd.DataFrame(rows, columns=REJECT_COLUMNS), Path(path) / "_rejects" / "listing.parquet")
