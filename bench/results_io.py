"""Bench results in the DESIGN §7 shape: {"figures": {name: {"value", "unit"}}, machine, commit, command}."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from storage.files import atomic_write_text

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, {os.cpu_count()} CPU cores"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, no GPU"


def commit() -> str:
    """BENCH_COMMIT if set (a copied working tree on another machine may carry a stale .git), else git's HEAD."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def command_line() -> str:
    return " ".join([Path(sys.executable).name] + sys.argv)


def _open(name: str, folder: str | Path | None) -> tuple[Path, dict]:
    """`<folder or bench/results>/<name>.json` and what it holds now ({} when absent)."""
    folder = Path(folder) if folder else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    return path, json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, body: dict) -> Path:
    atomic_write_text(path, json.dumps(body, indent=2) + "\n")
    return path


def write_result(name: str, figures: dict[str, tuple[float, str]], extra: dict | None = None,
                 folder: str | Path | None = None) -> Path:
    """Writes `<folder or bench/results>/<name>.json`; what merge_result added there (figures that name
    their own commit, and the keys it listed) is kept, the rest is this run's."""
    path, old = _open(name, folder)
    merged_keys = old.get("merged_keys", [])
    body = {"figures": {k: {"value": v, "unit": u} for k, (v, u) in figures.items()},
            "machine": machine(), "commit": commit(), "command": command_line(), **(extra or {})}
    for key, figure in old.get("figures", {}).items():
        if "commit" in figure and key not in body["figures"]:
            body["figures"][key] = figure
    body.update({key: old[key] for key in merged_keys if key in old and key not in body})
    if merged_keys:
        body["merged_keys"] = merged_keys
    return _save(path, body)


def merge_result(name: str, figures: dict[str, tuple[float, str]], extra: dict | None = None,
                 folder: str | Path | None = None) -> Path:
    """Adds figures (and top-level keys) to `<folder>/<name>.json`, keeping what another bench wrote
    there; each merged figure names the commit and machine it was measured on, and the keys are
    listed in "merged_keys" so that the other bench's next write_result keeps them."""
    path, body = _open(name, folder)
    body.setdefault("figures", {})
    for key, (value, unit) in figures.items():
        body["figures"][key] = {"value": value, "unit": unit, "machine": machine(), "commit": commit(),
                                "command": command_line()}
    if extra:
        body.update(extra)
        body["merged_keys"] = sorted(set(body.get("merged_keys", [])) | set(extra))
    return _save(path, body)
