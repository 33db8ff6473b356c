"""Chunked Zarr v3 stores with completion markers (DESIGN §5).

A stage first writes a template (every array at full size, chunked along the sample
axis), then writers fill disjoint chunk regions. A chunk counts as done only when its
marker exists, and markers are written last, atomically, so a killed run leaves no
chunk that looks finished but is not. The store is complete when `_COMPLETE` exists.

Per-sample block arrays (images, latents, regions, masks) are sharded: one stage chunk is one
shard, stored as inner chunks of up to INNER_ROWS rows, so a random read fetches 64 rows, not a
whole stage chunk; `open_dataset` chunks dask by the shards. Latents may be stored as bfloat16
(uint16 bit patterns + attribute); `read_floats` / `open_dataset` give float32 back.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from storage.files import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import xarray as xr

SCHEMA_VERSION = 1
ZARR = "store.zarr"       # the Zarr group inside a stage folder; markers sit beside it
COMPLETE = "_COMPLETE"
MARKERS = "_chunks"
INNER_ROWS = 64           # rows per inner chunk of a sharded array: what one random read fetches
MIN_INNER_ROWS = 8        # a shard whose rows no divisor in [MIN_INNER_ROWS, INNER_ROWS] splits stays one chunk


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]          # full shape, sample axis first
    dtype: Any
    dims: tuple[str, ...]
    fill_value: Any = 0
    per_sample: bool = True         # chunked along axis 0; False = small array in one chunk
    chunk_rows: int | None = None   # rows per Zarr chunk along axis 0, overriding both of the above
    compressed: bool = True         # False: raw bytes (float latents barely compress and zstd caps write speed)
    attrs: dict | None = None       # the Zarr array's attributes (e.g. FLOAT_ENCODING for bfloat16)
    inner_rows: int | None = None   # rows per inner chunk when sharded (default INNER_ROWS)


def create_store(path: Path, arrays: dict[str, ArraySpec], chunk_size: int, attrs: dict) -> None:
    """Write the template. Re-creating an existing matching store is a no-op (resume)."""
    path = Path(path)
    final = zarr_path(path)
    if (final / "zarr.json").exists():
        check_compatible(path, attrs, exact=True)
        return
    # Built beside its place and renamed in: a kill mid-template leaves no half-described store
    # (a group without its attrs would be refused on resume), only a temp folder cleared here.
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob(f".{ZARR}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path / f".{ZARR}.tmp-{uuid.uuid4().hex[:8]}"
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for name, spec in arrays.items():
        if spec.chunk_rows:
            chunks = (max(1, min(spec.chunk_rows, spec.shape[0])),) + spec.shape[1:]
        else:
            chunks = (min(chunk_size, spec.shape[0]),) + spec.shape[1:] if spec.per_sample else spec.shape
        codec: dict[str, Any] = {} if spec.compressed else {"compressors": None}
        inner = _inner_rows(spec, chunks[0])
        if inner:   # one stage chunk = one shard, read in inner chunks of `inner` rows
            codec["shards"], chunks = chunks, (inner,) + tuple(chunks[1:])
        group.create_array(name, shape=spec.shape, chunks=chunks, dtype=spec.dtype,
                           dimension_names=list(spec.dims), fill_value=spec.fill_value,
                           attributes=dict(spec.attrs or {}), **codec)
    group.attrs.update({"schema_version": SCHEMA_VERSION, "chunk_size": chunk_size,
                        "stage_attrs": _jsonable(attrs), **_jsonable(attrs)})
    if final.exists():   # a template without zarr.json, left by a kill before templates were atomic
        shutil.rmtree(final)
    os.replace(tmp, final)


class IncompatibleStore(ValueError):
    """A store on disk was written by another config or another schema version."""


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def differences(stored: dict, now: dict) -> list[str]:
    """`a.b: stored X, now Y` for every dotted key whose value differs (missing keys show as <absent>)."""
    old, new = _flatten(_jsonable(stored)), _flatten(_jsonable(now))
    return [f"{key}: stored {old.get(key, '<absent>')!r}, now {new.get(key, '<absent>')!r}"
            for key in sorted(set(old) | set(new)) if old.get(key, "<absent>") != new.get(key, "<absent>")]


def check_compatible(path: Path, attrs: dict, exact: bool = False) -> None:
    """Refuse a store of another schema version, or whose recorded config differs from `attrs`
    (every key of `attrs`; with `exact`, the stored record must have no other keys either)."""
    meta = zarr.open_group(str(zarr_path(path)), mode="r").attrs.asdict()
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise IncompatibleStore(f"{path} has store schema version {version!r}, this code reads version "
                                f"{SCHEMA_VERSION}; remove it or recompute with --force")
    stored = meta.get("stage_attrs", {})
    compared = stored if exact else {k: stored.get(k, "<absent>") for k in attrs}
    diff = differences(compared, attrs)
    if diff:
        raise IncompatibleStore(f"{path} was written by another config; what differs:\n  " + "\n  ".join(diff))


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


def _inner_rows(spec: ArraySpec, rows: int) -> int | None:
    """Rows per inner chunk when a chunk of `rows` rows of this array is stored as a shard: only
    per-sample blocks (2+ dimensions, fixed-size dtype) of more than one inner chunk; else None."""
    if spec.chunk_rows or not spec.per_sample or len(spec.shape) < 2 or np.dtype(spec.dtype).kind in "OUST":
        return None
    target = spec.inner_rows or INNER_ROWS
    if rows <= target:
        return None
    return next((d for d in range(target, MIN_INNER_ROWS - 1, -1) if rows % d == 0), None)


def _shard_layout(array: zarr.Array) -> tuple[int, ...] | None:
    """For a sharded array whose shards are raw little-endian inner chunks split along axis 0 only,
    with the default index (at the end, [BytesCodec little, Crc32cCodec]): chunks per shard; else None."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation

    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    codec = codecs[0]
    inner_ok = len(codec.codecs) == 1 and isinstance(codec.codecs[0], BytesCodec) \
        and (codec.codecs[0].endian is None or codec.codecs[0].endian.value == "little")
    index_ok = len(codec.index_codecs) == 2 and isinstance(codec.index_codecs[0], BytesCodec) \
        and codec.index_codecs[0].endian is not None and codec.index_codecs[0].endian.value == "little" \
        and isinstance(codec.index_codecs[1], Crc32cCodec) and codec.index_location == ShardingCodecIndexLocation.end
    shards, inner = array.shards, tuple(codec.chunk_shape)
    if not (inner_ok and index_ok) or shards[0] % inner[0] or tuple(inner[1:]) != tuple(shards[1:]):
        return None
    return (shards[0] // inner[0],) + (1,) * (len(shards) - 1)


def _shard_index(per_shard: tuple[int, ...], data: np.ndarray) -> bytes:
    """The shard index zarr's ShardingCodec reads for a shard holding `data` as its inner chunks
    back to back in C order: (offset, nbytes) little-endian uint64 per inner chunk, then the
    crc32c of those bytes (little-endian uint32)."""
    import google_crc32c

    count = per_shard[0]
    nbytes = data.nbytes // count
    index = np.empty(per_shard + (2,), dtype="<u8")
    index[..., 0] = (np.arange(count, dtype=np.uint64) * nbytes).reshape(per_shard)
    index[..., 1] = nbytes
    raw = index.tobytes()
    return raw + np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()


def _raw_chunk_file(array: zarr.Array, folder: Path, start: int, data: np.ndarray) -> Path | None:
    """The file of the one Zarr chunk (or shard) that `data` fills exactly, when the array stores
    raw little-endian bytes under the default "/" key encoding; else None (zarr writes it).
    A shard's file is the inner chunks back to back (they split axis 0 only, so that is `data`'s
    bytes) followed by its index (`_shard_index`)."""
    chunks, shape = array.chunks, array.shape
    if array.shards is not None:
        if _shard_layout(array) is None:
            return None
        chunks = array.shards
    elif array.compressors or array.filters or \
            getattr(array.serializer, "endian", None) is None and data.itemsize > 1:
        return None
    encoding = array.metadata.chunk_key_encoding
    if getattr(encoding, "separator", None) != "/" or type(encoding).__name__ != "DefaultChunkKeyEncoding":
        return None
    if start % chunks[0] or len(data) != chunks[0] or tuple(chunks[1:]) != tuple(shape[1:]) \
            or data.shape[1:] != tuple(shape[1:]) or sys.byteorder != "little":
        return None
    return folder.joinpath("c", str(start // chunks[0]), *("0" for _ in shape[1:]))


def write_chunk(path: Path, chunk: int, start: int, values: dict[str, np.ndarray], info: dict | None = None) -> None:
    """Fill one chunk region of every array in `values`, then write its marker last.

    A region that is exactly one raw (uncompressed) Zarr chunk is written as that chunk's file
    directly (temporary file, then rename), and so is a whole raw shard (inner chunks + index):
    zarr funnels every writer thread through one event loop, which capped parallel chunk writes
    near 0.8 GB/s on the H200 host. Like zarr's own writes these are not fsynced."""
    group = zarr.open_group(str(zarr_path(path)), mode="r+")
    for name, data in values.items():
        array = group[name]
        raw = _raw_chunk_file(array, zarr_path(path) / name, start, data)
        if raw is None:
            array[start:start + len(data)] = data
            continue
        data = np.ascontiguousarray(data, dtype=array.dtype)
        index = [_shard_index(_shard_layout(array), data)] if array.shards is not None else []
        atomic_write_bytes(raw, memoryview(data).cast("B"), *index, fsync=False)
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


def sample_ids(path: Path, rows: Any = slice(None)) -> np.ndarray:
    """The sample ids of the store's `rows` as an object array of str (Zarr hands back numpy's variable-width
    StringDType, which neither pandas nor a cast to a fixed width takes)."""
    array = open_array(path, "sample")
    values = array[rows] if isinstance(rows, slice) else array.oindex[rows]
    return np.asarray(values.tolist(), dtype=object)


def rows_of(path: Path, ids) -> np.ndarray:
    """The row of each of `ids` in the store's `sample` array: how rows of two stores are paired (by id,
    never by position). KeyError naming the ids the store holds no row for."""
    import pandas as pd

    wanted = np.asarray(list(ids), dtype=object)
    rows = pd.Index(sample_ids(path)).get_indexer(wanted)
    if (rows < 0).any():
        missing = wanted[rows < 0]
        raise KeyError(f"{path} holds no row for {len(missing)} of the {len(wanted)} samples asked for (first: "
                       f"{', '.join(missing[:3])}): it was built from other samples")
    return rows.astype(np.int64)


def store_attrs(path: Path) -> dict:
    return zarr.open_group(str(zarr_path(path)), mode="r").attrs.asdict()


# --- float arrays stored as float16 / float32 / bfloat16 ------------------------------------
# Zarr has no bfloat16, so a bfloat16 array is stored as its raw 16-bit patterns (uint16) with
# the array attribute {FLOAT_ENCODING: "bfloat16"}. Every reader goes through `read_floats`
# (or `open_dataset`, which decodes lazily) and gets float32.
FLOAT_ENCODING = "float_encoding"
BFLOAT16 = "bfloat16"


def float_storage(dtype: str) -> tuple[str, dict | None]:
    """(Zarr dtype, array attrs) that store floats of the configured `dtype`."""
    return ("uint16", {FLOAT_ENCODING: BFLOAT16}) if str(dtype) == BFLOAT16 else (str(dtype), None)


def encode_floats(values: np.ndarray, dtype: str) -> np.ndarray:
    """`values` as stored for `dtype`: bfloat16 as its bit patterns, rounded to nearest even as
    torch rounds (NaN -> the quiet NaN 0x7FC0); other dtypes by a plain cast."""
    if str(dtype) != BFLOAT16:
        return np.asarray(values).astype(dtype, copy=False)
    x = np.ascontiguousarray(values, dtype=np.float32)
    bits = x.view(np.uint32)
    out = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _is_bf16(attrs: Any) -> bool:
    return dict(attrs or {}).get(FLOAT_ENCODING) == BFLOAT16


def decode_floats(raw: np.ndarray, attrs: Any) -> np.ndarray:
    """Stored values (of an array with attributes `attrs`) as float32."""
    if _is_bf16(attrs):
        return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(raw, dtype=np.float32)


def read_floats(array: zarr.Array, selection: Any = slice(None), orthogonal: bool = False) -> np.ndarray:
    """`array[selection]` (or `.oindex[selection]`) as float32, whatever float encoding it has."""
    raw = array.oindex[selection] if orthogonal else array[selection]
    return decode_floats(raw, array.attrs.asdict())


def open_dataset(path: Path) -> xr.Dataset:
    """The store as a lazy xarray Dataset with coordinates (nothing is read but metadata):

    - `sample`: the stable sample ids (the store's `sample` id array, copied from the image
      store), or the integer row index where the store has no id array;
    - `label` and its alias `class` (integer class per sample) where the store has labels;
      the class names, where the stage recorded them, are in `attrs["classes"]`;
    - `level`: the store's `level` array (e.g. the teacher's levels), or the integer index for
      any array with a `level` axis but no such array."""
    import xarray as xr   # here, not at module level: about 0.3 s that readers of arrays alone do not need

    chunk_size = zarr.open_group(str(zarr_path(path)), mode="r").attrs.get("chunk_size")
    # dask chunks = the stage chunks (= the shards), not the small inner chunks
    ds = xr.open_zarr(str(zarr_path(path)), consolidated=False, chunks={"sample": chunk_size} if chunk_size else {})
    for name in [n for n in ds.data_vars if _is_bf16(ds[n].attrs)]:   # bfloat16 -> float32, lazily
        var = ds[name].variable
        decoded = var.copy(data=var.data.map_blocks(partial(decode_floats, attrs=dict(var.attrs)), dtype=np.float32))
        decoded.attrs = {k: v for k, v in var.attrs.items() if k != FLOAT_ENCODING} | {"stored_as": BFLOAT16}
        ds[name] = decoded
    index = {dim: np.arange(size) for dim, size in ds.sizes.items()
             if dim in ("sample", "level") and dim not in ds.variables}
    ds = ds.assign_coords(index)
    if "label" in ds.variables and ds["label"].dims == ("sample",):
        ds = ds.set_coords("label")
        ds = ds.assign_coords({"class": ds["label"].variable})
    return ds
