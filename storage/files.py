"""Atomic small-file writes (temporary file in the same folder, fsync, rename)."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def atomic_write_bytes(path: Path, *parts: bytes | memoryview, fsync: bool = True) -> None:
    """Write `parts` back to back into a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            for part in parts:
                handle.write(part)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
