"""Atomic small-file writes (temporary file in the same folder, fsync, rename), what a write that the
file system refuses for good is told as, and a cheap look into a weights file (tensor names and
shapes, without loading the tensors)."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image


def _umask() -> int:
    """The process umask. Linux shows it in /proc/self/status; elsewhere the only way to read it is to set
    it and set it straight back (a moment in which another thread's new file could get 0o022)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, *parts: bytes | memoryview, fsync: bool = True) -> None:
    """Write `parts` back to back into a temporary file beside `path`, then rename it into place.
    The file gets the mode a plain open() would give it (0o666 & ~umask), not mkstemp's 0o600."""
    def fill(handle, _name: str) -> None:
        for part in parts:
            handle.write(part)
    _atomic_write(path, fill, fsync)


def atomic_write_by_name(path: Path, write: Callable[[str], None], fsync: bool = True) -> None:
    """As atomic_write_bytes, for a library that writes a file by its name (safetensors' save_file):
    `write(name)` fills the temporary file, so a 1 GB checkpoint is not first built as bytes in memory."""
    def fill(_handle, name: str) -> None:
        write(name)
        # by name: the library may have put a new file there (safetensors 0.8 does, with mode 0o600)
        with open(name, "rb+") as written:
            os.fchmod(written.fileno(), 0o666 & ~_umask())
            if fsync:
                os.fsync(written.fileno())
    _atomic_write(path, fill, fsync=False)


def _atomic_write(path: Path, fill: Callable[[BinaryIO, str], None], fsync: bool) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            fill(handle, tmp)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.filename is None:   # a failed write names no file: name it
            error.filename = str(path)
        raise


class StorageFailure(OSError):
    """A write the file system refuses for good (no space, read-only, no permission), told with the path
    and, for a full disk, the space left: no retry can pass, the user has to act."""


_FOR_GOOD = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


def free_space(path: str | Path) -> str:
    """`<free> free of <size>` on the file system holding `path` (or its nearest existing folder)."""
    where = Path(os.path.abspath(path))
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
        while where != where.parent and os.stat(where.parent).st_dev == os.stat(where).st_dev:
            where = where.parent   # up to the mount point: the file system's name a user knows
    except OSError as error:
        return f"free space unknown ({error.strerror or error})"
    return f"{_size(usage.free)} free of {_size(usage.total)} on {where}"


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def storage_failure(error: OSError, where: str | Path) -> StorageFailure | None:
    """`error` told as a StorageFailure naming the file (else `where`, the folder being written), or None
    when it is no error a second try could never pass."""
    if error.errno not in _FOR_GOOD or isinstance(error, StorageFailure):
        return None
    path = error.filename or where
    text = f"{_FOR_GOOD[error.errno]}: {path}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        text += f" ({free_space(path)}); free some space or point the root elsewhere, then run again"
    elif error.errno == errno.EROFS:
        text += "; the root must be on a writable file system"
    return StorageFailure(error.errno, text)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_png(path: Path, image: np.ndarray) -> None:
    """uint8 [H, W, 3] -> PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def remove_tree(path: Path) -> bool:
    """Remove a stage folder for a forced recompute: rename first, so it vanishes atomically."""
    import shutil
    import uuid

    path = Path(path)
    if not path.exists():
        return False
    doomed = path.with_name(f".{path.name}.removing-{uuid.uuid4().hex[:6]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)
    return True


_STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")   # timm's load_state_dict order
_MAX_SAFETENSORS_HEADER = 100 << 20   # the safetensors library's own limit


def weights_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a weights file, read cheaply and safely, the way timm tells the formats
    apart: `*.safetensors` by its JSON header alone; anything else with torch.load(weights_only=True),
    memory-mapped when it is a zip checkpoint. ValueError with a short reason when it is not readable."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return _safetensors_shapes(path)
    return _torch_shapes(path)


def _safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, too short for a safetensors file")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise ValueError(f"not a safetensors file (header length {length} does not fit the file's {size} bytes)")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except ValueError:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (its header is not a JSON object)")
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shapes[name] = tuple(int(d) for d in entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
            str(entry["dtype"])
        except (TypeError, KeyError, IndexError, ValueError):
            raise ValueError(f"not a safetensors file (header entry {name!r} has no dtype, shape and "
                             f"data_offsets)") from None
    if 8 + length + end > size:
        raise ValueError(f"truncated: its tensors need {8 + length + end} bytes, the file has {size}")
    if not shapes:
        raise ValueError("it holds no tensors")
    return shapes


def _first_sentence(text: str) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line.split(". ")[0].rstrip(".")[:160]


def _torch_shapes(path: str) -> dict[str, tuple[int, ...]]:
    import pickle
    import warnings
    import zipfile

    import torch

    is_zip = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # e.g. "Detected pickle protocol 4": the error below says enough
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        # torch's text advises weights_only=False (arbitrary code execution); keep only what it found.
        found = _first_sentence(str(error).rpartition("WeightsUnpickler error:")[2])
        what = "not a plain state dict" if "global" in found else "not a safetensors file nor a torch checkpoint"
        raise ValueError(f"{what} (torch's safe loader: {found})") from None
    except Exception as error:   # torch raises anything from IndexError to RuntimeError on foreign bytes
        what = "a damaged torch checkpoint" if is_zip else "not a safetensors file nor a torch checkpoint"
        raise ValueError(f"{what} ({type(error).__name__}: {_first_sentence(str(error))})") from None
    if isinstance(checkpoint, dict):
        key = next((k for k in _STATE_DICT_KEYS if isinstance(checkpoint.get(k), dict)), None)
        checkpoint = checkpoint[key] if key else checkpoint
    if not isinstance(checkpoint, dict):
        raise ValueError(f"it holds a {type(checkpoint).__name__}, not a state dict")
    shapes = {str(k): tuple(v.shape) for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not shapes:
        raise ValueError("it holds no tensors")
    return shapes
