"""Reference statistics of the real image set, stored once per feature extractor.

They live inside the images stage folder (so they share the real set's stage key):

    images-<key>/reference/<safe label>-<sha12 of label>.safetensors   arrays (safetensors, no pickle)
    images-<key>/reference/<safe label>-<sha12 of label>.json          sidecar, written last

The extractor label names the extractor *and its weights* (models.evaluation.fidelity's
inception_extractor_label / dinov2_extractor_label, e.g.
"inception-v3-compat:file:pt_inception-2015-12-05.pth:0123456789ab"), so statistics
from other weights are never reused. A reference counts only when the sidecar exists,
names the same label and carries the sha256 of the arrays file; anything else (a
half-written save, a file from another label) reads as absent.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from storage.files import atomic_write_bytes, atomic_write_json

# 2: references whose real images were decoded on CUDA before 0593437 may hold pixels that queued GPU work
# overwrote (docs/gpu.md, the nvjpeg race); every reference of version 1 reads as absent and is computed again
SCHEMA_VERSION = 2
REFERENCE_DIR = "reference"
_MAX_SAFE_CHARS = 80


def _stem(extractor_label: str) -> str:
    if not isinstance(extractor_label, str) or not extractor_label.strip():
        raise ValueError(f"extractor label must be a non-empty string, got {extractor_label!r}")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", extractor_label).strip("._")[:_MAX_SAFE_CHARS]
    digest = hashlib.sha256(extractor_label.encode()).hexdigest()[:12]
    return f"{safe}-{digest}" if safe else digest


def reference_path(images_store: Path, extractor_label: str) -> Path:
    """The arrays file for `extractor_label` under the images stage folder (the sidecar is .json beside it)."""
    return Path(images_store) / REFERENCE_DIR / f"{_stem(extractor_label)}.safetensors"


def _sidecar_path(images_store: Path, extractor_label: str) -> Path:
    return reference_path(images_store, extractor_label).with_suffix(".json")


def save_reference(images_store: Path, extractor_label: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write `arrays` (safetensors) and then the JSON sidecar holding `meta`; returns the arrays path.

    Both writes are atomic. An existing sidecar is removed first, so an interrupted
    overwrite leaves no sidecar pointing at new arrays (it reads as absent).
    """
    if not arrays:
        raise ValueError("no arrays to save")
    tensors = {}
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; only numeric arrays are stored")
        tensors[str(name)] = np.ascontiguousarray(array)
    weights = reference_path(images_store, extractor_label)
    sidecar = _sidecar_path(images_store, extractor_label)
    payload = save_safetensors_bytes(tensors)
    sidecar.unlink(missing_ok=True)
    atomic_write_bytes(weights, payload)
    atomic_write_json(sidecar, {
        "schema_version": SCHEMA_VERSION,
        "extractor_label": extractor_label,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "arrays": {name: {"dtype": str(t.dtype), "shape": list(t.shape)} for name, t in tensors.items()},
        "meta": meta,
    })
    return weights


def load_reference(images_store: Path, extractor_label: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, meta) saved for `extractor_label`, or None when there is no complete, matching reference."""
    weights = reference_path(images_store, extractor_label)
    sidecar = _sidecar_path(images_store, extractor_label)
    if not (weights.is_file() and sidecar.is_file()):
        return None
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("schema_version") != SCHEMA_VERSION:
        return None
    if info.get("extractor_label") != extractor_label:
        return None
    payload = weights.read_bytes()
    if info.get("sha256") != hashlib.sha256(payload).hexdigest():
        return None
    return load_safetensors_bytes(payload), info.get("meta", {})
