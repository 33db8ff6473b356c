"""What every stage task returns: a small dict saying what it wrote and whether it was reused."""
from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def cpu_threads(device: str):
    """On CPU, torch's threads leave one core to the rest of the run (the Prefect server, Dask workers):
    with as many OpenMP threads as cores, every small op waits at a barrier for a thread whose core
    another process holds. Measured on 2 cores beside a busy process: an elementwise op on a
    [32, 64, 96] tensor took 8 ms with 2 threads and 0.05 ms with 1; a tiny generator's step 1.9 s
    against 0.67 s."""
    import torch

    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(previous, (os.cpu_count() or 2) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def stage_lock(cfg, stage_dir: Path):
    """The stage folder's lock (storage.locks), waiting or failing as `concurrency.on_locked` says."""
    from storage.locks import stage_lock as lock

    return lock(stage_dir, cfg.concurrency.on_locked, cfg.concurrency.wait_timeout_s)


# Errors a second attempt can fix: an I/O hiccup on a network file system, a dropped connection.
# Bad input, a missing file or a bug fails at once: retrying it only delays the message.
TRANSIENT_ERRORS = (TimeoutError, ConnectionError, BlockingIOError, InterruptedError)
PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(error: BaseException) -> bool:
    """Whether a stage that failed with `error` is worth running again (its chunks resume from markers)."""
    from tasks.dask_chunks import NoWorkers

    if isinstance(error, NoWorkers):   # it already waited worker_loss_timeout for a worker
        return False
    if isinstance(error, TRANSIENT_ERRORS):
        return True
    return isinstance(error, OSError) and not isinstance(error, PERMANENT_OS_ERRORS)


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry the stage only for a transient error."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as error:   # the state's own exception, re-raised by result()
        return is_transient(error)
    return False


# Every stage task: two more attempts for transient errors, 10 s then 60 s apart. Stages are
# idempotent (markers, atomic writes), so an attempt continues where the last one stopped.
STAGE_RETRIES = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_condition_fn": retry_transient}
