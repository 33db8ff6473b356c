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
from concurrent.futures import ThreadPoolExecutor
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


# --- raw chunk writes, decided from the array's zarr.json (the Zarr v3 spec's document) ---------
# zarr funnels every writer thread through one event loop, which capped parallel chunk writes near
# 0.8 GB/s on the H200 host. A region that is exactly one raw chunk (or one raw shard of inner
# chunks split along axis 0) is written here as that chunk's file. Whether an array qualifies is
# read from its zarr.json, whose codec names and configurations the Zarr v3 spec fixes, never from
# zarr's Python objects (their attributes changed between zarr 3.1 and 3.4). Anything else, or any
# document this does not recognise, goes through zarr's public API.
_DTYPES = {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
           "float16", "float32", "float64"}


def _little_bytes(codec: dict, itemsize: int) -> bool:
    """A `bytes` codec storing little-endian values (endian may be absent for one-byte types)."""
    endian = (codec.get("configuration") or {}).get("endian")
    return codec.get("name") == "bytes" and (endian == "little" or endian is None and itemsize == 1)


def _raw_layout(meta: dict) -> tuple[tuple[int, ...], tuple[int, ...] | None] | None:
    """(rows-chunk shape on disk, inner chunks per shard or None) when the array in `meta` (its zarr.json)
    stores raw little-endian bytes under the default "/" key encoding; else None."""
    dtype = meta.get("data_type")
    if meta.get("zarr_format") != 3 or not isinstance(dtype, str) or dtype not in _DTYPES:
        return None
    itemsize = np.dtype(dtype).itemsize
    keys, grid = meta.get("chunk_key_encoding") or {}, meta.get("chunk_grid") or {}
    if keys.get("name") != "default" or (keys.get("configuration") or {}).get("separator") != "/" \
            or grid.get("name") != "regular" or meta.get("storage_transformers"):
        return None
    shape = tuple(grid["configuration"]["chunk_shape"])
    codecs = meta.get("codecs") or []
    if len(codecs) == 1 and _little_bytes(codecs[0], itemsize):
        return shape, None
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    config = codecs[0].get("configuration") or {}
    inner, inner_codecs, index = tuple(config.get("chunk_shape", ())), config.get("codecs") or [], \
        config.get("index_codecs") or []
    if not (len(inner_codecs) == 1 and _little_bytes(inner_codecs[0], itemsize)
            and len(index) == 2 and _little_bytes(index[0], 8) and index[1].get("name") == "crc32c"
            and config.get("index_location", "end") == "end"):
        return None
    if len(inner) != len(shape) or shape[0] % inner[0] or inner[1:] != shape[1:]:
        return None
    return shape, (shape[0] // inner[0],) + (1,) * (len(shape) - 1)


def _shard_index(per_shard: tuple[int, ...], data: np.ndarray) -> bytes:
    """The shard index the spec's sharding codec reads for a shard holding `data` as its inner chunks
    back to back in C order: (offset, nbytes) little-endian uint64 per inner chunk, then the crc32c of
    those bytes (little-endian uint32)."""
    import google_crc32c

    count = per_shard[0]
    nbytes = data.nbytes // count
    index = np.empty(per_shard + (2,), dtype="<u8")
    index[..., 0] = (np.arange(count, dtype=np.uint64) * nbytes).reshape(per_shard)
    index[..., 1] = nbytes
    raw = index.tobytes()
    return raw + np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()


def _chunk_file(folder: Path, index: int, ndim: int) -> Path:
    """The file of chunk (or shard) `index` along axis 0 under the default "/" key encoding."""
    return Path(folder).joinpath("c", str(index), *("0" for _ in range(ndim - 1)))


def _array_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / "zarr.json").read_text())


def _raw_chunk_file(meta: dict, folder: Path, start: int, data: np.ndarray) -> tuple[Path, list[bytes]] | None:
    """(file, index parts to append) of the one raw chunk or shard that `data` fills exactly, for the
    array described by `meta` in `folder`; None where zarr must write it (also for data of another dtype)."""
    layout = _raw_layout(meta)
    shape = tuple(meta["shape"])
    if layout is None or sys.byteorder != "little" or np.dtype(meta["data_type"]) != data.dtype:
        return None
    chunks, per_shard = layout
    if start % chunks[0] or len(data) != chunks[0] or chunks[1:] != shape[1:] or data.shape[1:] != shape[1:]:
        return None
    index = [_shard_index(per_shard, data)] if per_shard else []
    return _chunk_file(folder, start // chunks[0], len(shape)), index


def _region_files(meta: dict, folder: Path, start: int, stop: int) -> list[Path]:
    """The files of the chunks (or shards) holding rows start..stop, for arrays split along axis 0 only."""
    grid = (meta.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
    separator = ((meta.get("chunk_key_encoding") or {}).get("configuration") or {}).get("separator", "/")
    if not grid or tuple(grid[1:]) != tuple(meta["shape"][1:]):
        return []
    rest = ["0"] * (len(grid) - 1)
    keys = [separator.join(["c", str(c), *rest]) for c in range(start // grid[0], -(-stop // grid[0]))]
    return [Path(folder) / key for key in keys]


def _fsync(paths: list[Path]) -> None:
    """Flush each existing file, then each folder holding one, to the disk (a marker may vouch for them next)."""
    for path in paths:
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for folder in {path.parent for path in paths if path.parent.is_dir()}:   # renames and removals too
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_chunk(path: Path, chunk: int, start: int, values: dict[str, np.ndarray], info: dict | None = None) -> None:
    """Fill one chunk region of every array in `values`, then write its marker last.

    A region that is exactly one raw Zarr chunk, or one raw shard, is written as that file directly
    (temporary file, then rename; see _raw_layout); the rest through zarr. Every file of the region is
    fsynced, and so are their folders, before the marker is written: a marker never vouches for data
    that a crash could still lose."""
    group = zarr.open_group(str(zarr_path(path)), mode="r+")
    written: list[Path] = []
    for name, data in values.items():
        folder = zarr_path(path) / name
        meta = _array_meta(folder)
        data = np.asarray(data)
        raw = _raw_chunk_file(meta, folder, start, data)
        if raw is None:
            group[name][start:start + len(data)] = data
        else:
            file, index = raw
            atomic_write_bytes(file, memoryview(np.ascontiguousarray(data)).cast("B"), *index, fsync=False)
        written += _region_files(meta, folder, start, start + len(data))
    _fsync(written)
    atomic_write_text(_marker(path, chunk), json.dumps({"chunk": chunk, "start": start, **(info or {})}))


SPARSE_READ_SHARE = 8   # read_stored reads rows one by one when they are under 1/8 of their raw chunk


def read_stored(path: Path, name: str, rows: np.ndarray) -> np.ndarray:
    """`array.oindex[rows]` of a per-sample array, as stored (no float decoding). Whole raw chunks or shards
    (the layout write_chunk writes directly) are read as files, several GB/s from the page cache, where
    zarr's single event loop reads a few hundred MB/s, and a few rows of one only as their own bytes (a
    sample spread over the store read 64 inner chunks, 1.6 GB for 64 latents); anything else through zarr.
    A chunk whose rows are wanted whole and in order is read straight into the result (no second copy of
    20 GB for 50,000 B-sized latents), and the files are read by threads (reads release the GIL)."""
    folder = zarr_path(path) / name
    meta = _array_meta(folder)
    array = open_array(path, name)
    layout = _raw_layout(meta)
    rows = np.asarray(rows, dtype=np.int64)
    if layout is None or sys.byteorder != "little" or not len(rows):
        return np.asarray(array.oindex[rows])
    chunk_rows, shape = layout[0][0], tuple(meta["shape"])
    dtype, per_row = np.dtype(meta["data_type"]), int(np.prod(shape[1:]))
    out = np.empty((len(rows), *shape[1:]), dtype)
    reads = []
    for chunk in np.unique(rows // chunk_rows):
        start = int(chunk) * chunk_rows
        count = min(chunk_rows, shape[0] - start)
        file = _chunk_file(folder, int(chunk), len(shape))
        mine = np.flatnonzero(rows // chunk_rows == chunk)
        if count != chunk_rows or not file.is_file():   # a partial last chunk, or one zarr holds as fill
            out[mine] = np.asarray(array.oindex[rows[mine]])
        else:
            reads.append((file, start, count, mine))
    row_bytes = per_row * dtype.itemsize

    def read(job: tuple[Path, int, int, np.ndarray]) -> None:
        file, start, count, mine = job
        if len(mine) * SPARSE_READ_SHARE < count:   # a few rows (a spread sample): only their bytes
            with open(file, "rb") as handle:
                for i in mine:
                    handle.seek(int(rows[i] - start) * row_bytes)
                    out[i] = np.fromfile(handle, dtype=dtype, count=per_row).reshape(shape[1:])
        elif len(mine) == count and np.array_equal(rows[mine], np.arange(start, start + count)) \
                and np.array_equal(mine, np.arange(mine[0], mine[0] + count)):   # the chunk whole, in order
            _read_into(file, out[mine[0]:mine[0] + count])
        else:
            data = np.fromfile(file, dtype=dtype, count=count * per_row).reshape(count, *shape[1:])
            out[mine] = data[rows[mine] - start]

    with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(reads)))) as pool:
        list(pool.map(read, reads))   # list(): a failed read raises here
    return out


READ_THREADS = min(8, os.cpu_count() or 1)


def _read_into(file: Path, target: np.ndarray) -> None:
    """The file's first target.nbytes bytes into the C-contiguous `target`."""
    view = memoryview(target.reshape(-1).view(np.uint8))
    with open(file, "rb", buffering=0) as handle:
        done = 0
        while done < len(view):
            got = handle.readinto(view[done:])
            if not got:
                raise OSError(f"{file}: {done} of {len(view)} bytes (the chunk file is short)")
            done += got


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


def is_bfloat16(array: zarr.Array) -> bool:
    """Whether `array` holds bfloat16 bit patterns (read them through decode_floats or as torch.bfloat16)."""
    return _is_bf16(array.attrs.asdict())


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
