"""Per-chunk work that runs on Dask workers (kept free of Prefect so workers import fast)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.hierarchy import HierarchySpec, build_hierarchies
from storage import zarr_store
from storage.config import HierarchyConfig, SourceConfig
from storage.sources import read_chunk
from storage.tables import write_rejects


def ingest_chunk(source: dict, store: str, chunk: int, start: int, ids: list[str], labels: list[int]) -> dict:
    cfg = SourceConfig.model_validate(source)
    batch = read_chunk(cfg, ids, np.asarray(labels, np.int64), start)
    values = {"image": batch["image"], "label": batch["label"], "valid": batch["valid"]}
    if "masks" in batch:
        values["masks"] = batch["masks"]
    write_rejects(Path(store), chunk, batch["rejects"])  # before the marker: a done chunk has its rejects
    zarr_store.write_chunk(Path(store), chunk, start, values,
                           {"accepted": int(batch["valid"].sum()), "rejected": len(batch["rejects"])})
    return {"chunk": chunk, "accepted": int(batch["valid"].sum()), "rejected": len(batch["rejects"])}


def hierarchy_spec(cfg: HierarchyConfig) -> HierarchySpec:
    return HierarchySpec(k=cfg.k, alpha=cfg.alpha, lam=cfg.lam, cuts=tuple(cfg.cuts),
                         cut_mode=cfg.cut_mode, linkage=cfg.linkage, seed=cfg.seed)


def hierarchy_chunk(hierarchy: dict, latents: str, store: str, chunk: int, start: int, stop: int) -> int:
    spec = hierarchy_spec(HierarchyConfig.model_validate(hierarchy))
    tokens = np.asarray(zarr_store.open_array(Path(latents), "tokens")[start:stop], dtype=np.float32)
    regions = build_hierarchies(tokens, spec)
    zarr_store.write_chunk(Path(store), chunk, start, {"regions": regions})
    return chunk
