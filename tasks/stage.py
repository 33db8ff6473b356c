"""The skeleton every stage runs (`run_stage`: locks, force, lineage and reuse, upstream check, work,
completion marker, result), what a stage returns, and the settings every stage task shares (device, threads,
retries). A new stage is its work function plus its key (storage.keys)."""
from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def stage_result(stage: str, key: str, path: Path, computed: bool, started: float, **extra) -> dict:
    return {"stage": stage, "key": key, "path": str(path), "status": "computed" if computed else "reused",
            "duration_s": round(time.monotonic() - started, 3), **extra}


@dataclass(frozen=True)
class Output:
    """How a stage's output says it is done: a Zarr store (its attrs record stage and key, checked on
    reuse) or a folder of checkpoints. Both finish with a `_COMPLETE` marker written last."""
    is_complete: Callable[[Path], bool]
    mark_complete: Callable[[Path, dict], None]
    check_reuse: Callable[[Path, str, str], None] | None = None   # (path, stage attr, key): raise if stale


def _zarr_output() -> Output:
    from storage import zarr_store

    def check(path: Path, stage: str, key: str) -> None:
        zarr_store.check_compatible(path, {"stage": stage, "key": key})

    return Output(zarr_store.is_complete, zarr_store.mark_complete, check)


def _folder_output() -> Output:
    from storage import checkpoints

    return Output(checkpoints.is_complete, checkpoints.mark_complete)


@dataclass(frozen=True)
class Stage:
    """One stage run: its name in results, its key and folder, what it needs upstream, what it writes."""
    name: str                       # as results and the report show it: ingest, train-L0, ...
    key: str
    path: Path
    output: str = "store"           # "store" (Zarr) or "folder" (checkpoints)
    store_stage: str = ""           # the Zarr attrs' `stage` (images, latents, ...): checked on reuse
    needs: Sequence[tuple[Path, str]] = field(default=())   # (upstream store, the command that makes it)


@dataclass
class Done:
    """What a stage's work hands back: the completion marker's content (None: the work wrote the marker
    itself, as a generator's finish shared with torchrun does) and extra result fields."""
    marker: dict | None
    result: dict = field(default_factory=dict)


class StaleUpstream(RuntimeError):
    """A store the stage reads no longer fits what that store was built from (storage.lineage)."""


def run_stage(cfg, stage: Stage, force: bool, work: Callable[[], Done],
              reused: Callable[[], dict] = dict) -> dict:
    """Run `stage` once. Every upstream store is held with a shared lock while the stage runs (a forced
    rebuild of one waits for it) and must itself still fit what it was built from. A complete output is
    reused when it was built from the upstream stores as they are now (a Zarr store also only if its attrs
    still name this stage and key; `reused()` may check more and gives the result's extra fields), under
    a shared lock of its own. Otherwise, under its exclusive lock: `force` removes the output first, an
    output built from other upstream stores (complete, or a part to resume) is removed and rebuilt, every
    upstream store must be complete, the lineage record (storage.lineage) is written, `work()` computes,
    and the completion marker is written last. A write the file system refuses for good (full, read-only,
    no permission) fails naming the path (storage.files.storage_failure)."""
    from storage.files import storage_failure

    output = _zarr_output() if stage.output == "store" else _folder_output()
    try:
        with contextlib.ExitStack() as reading:
            for upstream, _ in stage.needs:
                reading.enter_context(stage_lock(cfg, upstream, shared=True))
            _check_upstreams(stage)
            if not force:   # a run that reuses the output never waits for that output's readers
                with stage_lock(cfg, stage.path, shared=True):
                    result = _reuse(stage, output, reused, time.monotonic())
                if result is not None:
                    return result
            with stage_lock(cfg, stage.path):   # a second run on this output waits or fails here
                return _compute(stage, output, force, work, reused, cfg.device)
    except OSError as error:
        failure = storage_failure(error, stage.path)
        if failure is None:
            raise
        raise failure from error


def _check_upstreams(stage: Stage) -> None:
    from storage import lineage

    for upstream, command in stage.needs:
        reason = lineage.stale(upstream) if Path(upstream).exists() else None
        if reason:
            raise StaleUpstream(f"{lineage.kind(upstream)} no longer fits what it was built from: {reason}. "
                                f"Run `tf {command}` to rebuild it first (its readers are stale with it)")


def _reuse(stage: Stage, output: Output, reused: Callable[[], dict], started: float) -> dict | None:
    """The reused result of a complete output that fits its upstream stores as they are now, else None."""
    import warnings

    from storage import lineage

    if not output.is_complete(stage.path) or lineage.mismatch(stage.path, [u for u, _ in stage.needs]):
        return None
    if lineage.read(stage.path) is None:
        warnings.warn(f"{lineage.kind(stage.path)} predates lineage records: reused without checking which "
                      f"upstream stores it was built from (--force {stage.name.split('-')[0]} rebuilds it)",
                      stacklevel=3)
    if output.check_reuse and stage.store_stage:
        output.check_reuse(stage.path, stage.store_stage, stage.key)
    return stage_result(stage.name, stage.key, stage.path, False, started, **reused())


def _compute(stage: Stage, output: Output, force: bool, work: Callable[[], Done],
             reused: Callable[[], dict], device: str = "cpu") -> dict:
    import sys

    from storage import lineage
    from storage.files import remove_tree

    started = time.monotonic()
    upstreams = [u for u, _ in stage.needs]
    rebuilt = None
    if force:
        remove_tree(stage.path)
    elif stage.path.exists():
        rebuilt = lineage.mismatch(stage.path, upstreams)
        if rebuilt is None and output.is_complete(stage.path):   # made by another run while this one waited
            return _reuse(stage, output, reused, started)
        if rebuilt is None and lineage.read(stage.path) is None:
            rebuilt = "a part without a record of the upstream stores it was built from cannot be resumed"
        if rebuilt:   # never resumed nor reused over another upstream: its rows would be mixed
            print(f"{lineage.kind(stage.path)} does not fit its upstream stores: {rebuilt}; rebuilding it",
                  file=sys.stderr, flush=True)
            remove_tree(stage.path)
    for upstream, command in stage.needs:
        if not _upstream_complete(upstream):
            raise RuntimeError(f"{lineage.kind(upstream)} ({upstream}) is incomplete: run `tf {command}` first")
    if lineage.read(stage.path) is None:   # its rows are its first upstream's (ingest records the listing's)
        lineage.start(stage.path, stage.key, None, [lineage.identity(u) for u in upstreams])
    from tasks.device_watch import watch

    with watch(device) as gpu:   # the stage's own GPU figures: peak memory, busy share
        done = work()
    if done.marker is not None:
        output.mark_complete(stage.path, done.marker)
    if not output.is_complete(stage.path):   # a work function that forgot its marker would recompute forever
        raise RuntimeError(f"stage {stage.name} finished without marking {stage.path} complete")
    result = stage_result(stage.name, stage.key, stage.path, True, started,
                          **({"rebuilt": rebuilt} if rebuilt else {}), **done.result, **gpu)
    if "images" in done.result:   # throughput as the stage itself timed it
        result["images_per_s"] = round(done.result["images"] / max(result["duration_s"], 1e-9), 1)
    return result


def _upstream_complete(path: Path) -> bool:
    from storage import zarr_store

    return zarr_store.is_complete(path)   # both kinds write the same `_COMPLETE` marker


@contextlib.contextmanager
def divergence_named(stage: str, folder: Path | None = None, name: str = "generator"):
    """A NonFiniteTraining from the training loop inside comes out naming the stage and what was kept:
    the latest snapshot of `name` in `folder` (written only after the loop read its flag clean) and no
    `_COMPLETE` marker."""
    from models.nonfinite import NonFiniteTraining
    from storage.checkpoints import train_state_step

    try:
        yield
    except NonFiniteTraining as error:
        step = train_state_step(folder, name) if folder is not None else None
        kept = (f"the last finite snapshot (step {step}) is kept in {folder}" if step is not None
                else "no snapshot was written")
        raise NonFiniteTraining(f"stage {stage} diverged: {error}; {kept}; nothing was marked complete "
                                f"(lower its learning rate)", step=error.step) from error


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


def stage_lock(cfg, stage_dir: Path, shared: bool = False):
    """The stage folder's lock (storage.locks), exclusive to write it, `shared` to read it, waiting or
    failing as `concurrency.on_locked` says."""
    from storage.locks import stage_lock as lock

    return lock(stage_dir, cfg.concurrency.on_locked, cfg.concurrency.wait_timeout_s, shared=shared)


# Errors a second attempt can fix: an I/O hiccup on a network file system, a dropped connection.
# Bad input, a missing file or a bug fails at once: retrying it only delays the message.
TRANSIENT_ERRORS = (TimeoutError, ConnectionError, BlockingIOError, InterruptedError)
PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# The same by error number (a plain OSError carries only that): a full disk or quota, a read-only file
# system, no permission. They stay until someone acts, so a retry 10 s and 60 s later only hides them.
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                              errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG})


def is_transient(error: BaseException) -> bool:
    """Whether a stage that failed with `error` is worth running again (its chunks resume from markers)."""
    from tasks.dask_chunks import NoWorkers

    if isinstance(error, NoWorkers):   # it already waited worker_loss_timeout for a worker
        return False
    if isinstance(error, TRANSIENT_ERRORS):
        return True
    return isinstance(error, OSError) and not isinstance(error, PERMANENT_OS_ERRORS) \
        and error.errno not in PERMANENT_ERRNOS


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


def stage_task(name: str, **options):
    """A stage's Prefect task: STAGE_RETRIES, no result cache (the stage's output folder is its cache).
    Where Prefect is not installed (a GPU box that runs a bench: bench/trajectory_proof.py), the plain
    function, with `.fn` as a Prefect task has, so the bench calls the same stage work either way.
    Only Prefect itself missing does that: a Prefect that is there but fails to import (a broken or
    mismatched install, a missing dependency of it) raises, rather than run stages without retries."""
    try:
        from prefect import task
        from prefect.cache_policies import NO_CACHE
    except ModuleNotFoundError as error:
        if error.name != "prefect":
            raise
        def plain(fn):
            fn.fn = fn
            return fn
        return plain
    return task(name=name, cache_policy=NO_CACHE, **STAGE_RETRIES, **options)
