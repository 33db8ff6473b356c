"""The official ILSVRC2012 train archive read in place: a Parquet index of the nested tar.

ILSVRC2012_img_train.tar is one outer tar of 1,000 per-class tars (n01440764.tar, ...), each
holding that class's JPEGs (n01440764_10026.JPEG, ...). Nothing is extracted: the index holds,
per image, the data offset of its class tar inside the outer tar, the data offset of the image
inside the class tar, and its size. Reading a sample is then one seek and one read on the outer
file, so Dask workers read disjoint chunks of the same archive in parallel.

Index rows are sorted by (synset, file name), the order torchvision's ImageFolder gives the
extracted tree, so sample i of the tar is sample i of the folder. The index records the tar's
size and mtime and is rebuilt when they change.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from storage.files import atomic_write_bytes

INDEX_VERSION = 1
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
COLUMNS = ["id", "label", "class_offset", "member_offset", "size"]


def sample_id(synset: str, member_name: str) -> str:
    """'<synset>/<file name>', the id the extracted class-folder tree gives the same image."""
    return f"{synset}/{PurePosixPath(member_name).name}"


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _synset(class_tar_name: str) -> str | None:
    path = PurePosixPath(class_tar_name)
    return path.stem if path.suffix == ".tar" else None


def scan_nested_tar(path: str | Path) -> tuple[list[str], list[tuple]]:
    """(sorted synsets, rows (synset, name, class_offset, member_offset, size)) by reading only the
    tar headers: tarfile in seekable mode seeks over member data, in the outer and inner tars."""
    synsets, rows = [], []
    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as outer:
        for member in outer:
            synset = _synset(member.name) if member.isfile() else None
            if synset is None:
                continue
            synsets.append(synset)
            with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                for image in inner:
                    if image.isfile() and _is_image(image.name):
                        rows.append((synset, image.name, member.offset_data, image.offset_data, image.size))
    return sorted(synsets), rows


def stream_nested_tar(fileobj: BinaryIO) -> Iterator[tuple[str, str, int, int, bytes]]:
    """(synset, member name, class_offset, member_offset, bytes) for every image, in archive order,
    from a non-seekable stream (a pipe, an object-store body): tarfile in streaming mode ('r|')."""
    with tarfile.open(fileobj=fileobj, mode="r|") as outer:
        for member in outer:
            synset = _synset(member.name) if member.isfile() else None
            if synset is None:
                continue
            with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as inner:
                for image in inner:
                    if image.isfile() and _is_image(image.name):
                        data = inner.extractfile(image).read()
                        yield synset, image.name, member.offset_data, image.offset_data, data


def _stamp(tar: Path) -> dict:
    stat = tar.stat()
    return {"version": INDEX_VERSION, "tar_size": stat.st_size, "tar_mtime_ns": stat.st_mtime_ns}


def default_index_path(tar: str | Path) -> Path:
    """<tar>.index.parquet beside the archive when that folder is writable, else in the user cache
    (named by the archive's absolute path, so two archives never share an index)."""
    tar = Path(tar).resolve()
    if os.access(tar.parent, os.W_OK):
        return tar.with_name(tar.name + ".index.parquet")
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "trajectory_forcing" / "tar-index"
    digest = hashlib.sha256(str(tar).encode()).hexdigest()[:12]
    return cache / f"{tar.stem}-{digest}.index.parquet"


def build_index(tar: str | Path, index_path: str | Path) -> Path:
    """Scan `tar` and write its Parquet index to `index_path` (temporary name, then rename)."""
    tar, index_path = Path(tar), Path(index_path)
    stamp = _stamp(tar)
    synsets, rows = scan_nested_tar(tar)
    if not rows:
        raise FileNotFoundError(f"source.path {tar}: no <synset>.tar members holding images "
                                f"(expected the nested ILSVRC2012_img_train.tar layout)")
    label_of = {synset: i for i, synset in enumerate(synsets)}
    rows.sort(key=lambda row: (row[0], PurePosixPath(row[1]).name))
    table = pa.table({
        "id": [sample_id(r[0], r[1]) for r in rows],
        "label": pa.array([label_of[r[0]] for r in rows], pa.int32()),
        "class_offset": pa.array([r[2] for r in rows], pa.int64()),
        "member_offset": pa.array([r[3] for r in rows], pa.int64()),
        "size": pa.array([r[4] for r in rows], pa.int64()),
    })
    meta = {**stamp, "classes": synsets, "tar": str(tar.resolve())}
    table = table.replace_schema_metadata({"tf_tar_index": json.dumps(meta)})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=65536)
    atomic_write_bytes(index_path, memoryview(buffer.getvalue()))   # temporary name, rename; umask mode
    return index_path


def _index_meta(index_path: Path) -> dict | None:
    try:
        raw = pq.read_schema(index_path).metadata or {}
        return json.loads(raw[b"tf_tar_index"])
    except (OSError, KeyError, ValueError, pa.ArrowInvalid):
        return None


def ensure_index(tar: str | Path, index_path: str | Path | None = None) -> Path:
    """The index of `tar`, built first if it is missing or stale (the tar changed since)."""
    tar = Path(tar)
    if not tar.is_file():
        raise FileNotFoundError(f"source.path {tar} is not a file (expected ILSVRC2012_img_train.tar)")
    index_path = Path(index_path) if index_path else default_index_path(tar)
    meta = _index_meta(index_path) if index_path.exists() else None
    stamp = _stamp(tar)
    if meta is None or any(meta.get(k) != v for k, v in stamp.items()):
        build_index(tar, index_path)
    return index_path


@functools.lru_cache(maxsize=4)
def _load(index_path: str, mtime_ns: int) -> tuple[pd.DataFrame, list[str]]:
    table = pq.read_table(index_path, columns=COLUMNS)
    meta = json.loads(table.schema.metadata[b"tf_tar_index"])
    return table.to_pandas(), list(meta["classes"])


def load_index(index_path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """(rows in sample order, classes); cached per process, so each Dask worker reads it once."""
    index_path = Path(index_path)
    return _load(str(index_path), index_path.stat().st_mtime_ns)


def read_member(handle: BinaryIO, class_offset: int, member_offset: int, size: int) -> bytes:
    """One image's bytes: a plain seek + read on the outer archive."""
    handle.seek(class_offset + member_offset)
    data = handle.read(size)
    if len(data) != size:
        raise EOFError(f"archive ended after {len(data)} of {size} bytes at offset {class_offset + member_offset}")
    return data
