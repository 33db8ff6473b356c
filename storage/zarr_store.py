"""Chunked Zarr v3 stores with completion markers (DESIGN §5).

A stage first writes a template (every array at full size, chunked along the sample
axis), then writers fill disjoint chunk regions. A chunk counts as done only when its
marker exists, and markers are written last, atomically, so a killed run leaves no
chunk that looks finished but is not. The store is complete when `_COMPLETE` exists.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from storage.files import atomic_write_text

SCHEMA_VERSION = 1
ZARR = "store.zarr"       # the Zarr group inside a stage folder; markers sit beside it
COMPLETE = "_COMPLETE"
MARKERS = "_chunks"


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]          # full shape, sample axis first
    dtype: Any
    dims: tuple[str, ...]
    fill_value: Any = 0
    per_sample: bool = True         # chunked along axis 0; False = small array in one chunk
    chunk_rows: int | None = None   # rows per Zarr chunk along axis 0, overriding both of the above


def create_store(path: Path, arrays: dict[str, ArraySpec], chunk_size: int, attrs: dict) -> None:
    """Write the template. Re-creating an existing matching store is a no-op (resume)."""
    path = Path(path)
    if (zarr_path(path) / "zarr.json").exists():
        existing = zarr.open_group(str(zarr_path(path)), mode="r").attrs.asdict()
        if existing.get("stage_attrs") != _jsonable(attrs):
            raise ValueError(
                f"{path} was written by another config:\n  stored {existing.get('stage_attrs')}\n  now    {attrs}")
        return
    group = zarr.open_group(str(zarr_path(path)), mode="w", zarr_format=3)
    for name, spec in arrays.items():
        if spec.chunk_rows:
            chunks = (max(1, min(spec.chunk_rows, spec.shape[0])),) + spec.shape[1:]
        else:
            chunks = (min(chunk_size, spec.shape[0]),) + spec.shape[1:] if spec.per_sample else spec.shape
        group.create_array(name, shape=spec.shape, chunks=chunks, dtype=spec.dtype,
                           dimension_names=list(spec.dims), fill_value=spec.fill_value)
    group.attrs.update({"schema_version": SCHEMA_VERSION, "chunk_size": chunk_size,
                        "stage_attrs": _jsonable(attrs), **_jsonable(attrs)})


def zarr_path(path: Path) -> Path:
    return Path(path) / ZARR


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def chunk_bounds(num_samples: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, num_samples)) for start in range(0, num_samples, chunk_size)]


def _marker(path: Path, chunk: int) -> Path:
    return Path(path) / MARKERS / f"{chunk:06d}.json"


def chunk_done(path: Path, chunk: int) -> bool:
    return _marker(path, chunk).exists()


def pending_chunks(path: Path, num_chunks: int) -> list[int]:
    return [c for c in range(num_chunks) if not chunk_done(path, c)]


def write_chunk(path: Path, chunk: int, start: int, values: dict[str, np.ndarray], info: dict | None = None) -> None:
    """Fill one chunk region of every array in `values`, then write its marker last."""
    group = zarr.open_group(str(zarr_path(path)), mode="r+")
    for name, data in values.items():
        group[name][start:start + len(data)] = data
    atomic_write_text(_marker(path, chunk), json.dumps({"chunk": chunk, "start": start, **(info or {})}))


def chunk_infos(path: Path) -> list[dict]:
    folder = Path(path) / MARKERS
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


def write_rows(path: Path, index: int | slice, values: dict[str, np.ndarray]) -> None:
    """Write `values[name]` at `index` of each named array.

    Concurrent writers are safe only on disjoint Zarr chunks (e.g. one row each of a
    `chunk_rows=1` array); otherwise a single writer only."""
    group = zarr.open_group(str(zarr_path(path)), mode="r+")
    for name, data in values.items():
        group[name][index] = data


def write_array(path: Path, name: str, data: np.ndarray) -> None:
    zarr.open_group(str(zarr_path(path)), mode="r+")[name][...] = data


def mark_complete(path: Path, summary: dict) -> None:
    atomic_write_text(Path(path) / COMPLETE, json.dumps(_jsonable(summary), indent=2))


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).exists()


def completion(path: Path) -> dict:
    return json.loads((Path(path) / COMPLETE).read_text())


def open_array(path: Path, name: str) -> zarr.Array:
    return zarr.open_group(str(zarr_path(path)), mode="r")[name]


def has_array(path: Path, name: str) -> bool:
    return name in zarr.open_group(str(zarr_path(path)), mode="r")


def store_attrs(path: Path) -> dict:
    return zarr.open_group(str(zarr_path(path)), mode="r").attrs.asdict()


def open_dataset(path: Path) -> xr.Dataset:
    """The store as a lazy xarray Dataset (sample ids are the `sample` coordinate)."""
    return xr.open_zarr(str(zarr_path(path)), consolidated=False)
