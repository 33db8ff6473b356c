"""What every stage task returns: a small dict saying what it wrote and whether it was reused."""
from __future__ import annotations

import time
from pathlib import Path


def stage_result(stage: str, key: str, path: Path, computed: bool, started: float, **extra) -> dict:
    return {"stage": stage, "key": key, "path": str(path), "status": "computed" if computed else "reused",
            "duration_s": round(time.monotonic() - started, 3), **extra}


def pick_device(preference: str) -> str:
    import torch

    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but torch sees no GPU")
    return preference


def stage_lock(cfg, stage_dir: Path):
    """The stage folder's lock (storage.locks), waiting or failing as `concurrency.on_locked` says."""
    from storage.locks import stage_lock as lock

    return lock(stage_dir, cfg.concurrency.on_locked, cfg.concurrency.wait_timeout_s)
