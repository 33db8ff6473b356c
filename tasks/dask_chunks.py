"""Run per-chunk functions on Dask: a local cluster by default, or an existing scheduler.

Chunks are idempotent (each writes its own region, then its marker), so a failed chunk
is simply retried; one that keeps failing is reported by name, never dropped.

`resources` (e.g. {"GPU": 1}) is for GPU work only: such chunks run only on workers started
with `--resources GPU=1`. If no connected worker offers them within RESOURCE_WAIT_S, the
run stops with an error instead of waiting forever. Likewise, when every worker is gone for
`worker_loss_timeout` seconds mid-run (the scheduler alone would wait for one to come back), the run
stops with NoWorkers naming the scheduler; the chunks done so far keep their markers, so the next
run resumes from them.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Sequence

from tasks.progress import Progress


@contextlib.contextmanager
def dask_client(address: str | None, workers: int) -> Iterator["distributed.Client"]:
    import logging

    from distributed import Client, LocalCluster

    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core", "distributed.worker"):
        logging.getLogger(name).setLevel(logging.WARNING)  # cluster chatter drowns the progress bar
    if address:
        with Client(address) as client:
            yield client
        return
    # dashboard_address=None still opens the scheduler's HTTP server on :8787 (all interfaces,
    # a warning when taken); a free loopback port keeps the local cluster private and quiet.
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0", silence_logs=40) as cluster, Client(cluster) as client:
        yield client


class ChunkFailures(RuntimeError):
    pass


class NoWorkers(RuntimeError):
    pass


WORKER_LOSS_TIMEOUT_S = 120.0


RESOURCE_WAIT_S = 120.0


def wait_for_resources(client: "distributed.Client", resources: dict, timeout: float = RESOURCE_WAIT_S) -> list[str]:
    """Addresses of workers offering every resource in `resources`; waits up to `timeout` for one."""
    deadline = time.monotonic() + timeout
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        able = [addr for addr, w in workers.items()
                if all(w.get("resources", {}).get(name, 0) >= need for name, need in resources.items())]
        if able or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not able:
        offered = {addr: w.get("resources", {}) for addr, w in workers.items()}
        flags = " ".join(f"{name}={need}" for name, need in resources.items())
        raise RuntimeError(f"no Dask worker offers resources {resources} after {timeout:.0f}s "
                           f"(workers and their resources: {offered}); start one with "
                           f"`dask worker <scheduler> --resources {flags}`")
    return able


RESULT_FETCH_S = 2.0   # a finished chunk's result is a small dict: longer means its worker is gone


def run_chunks(fn: Callable, chunk_args: Sequence[tuple], *, description: str, address: str | None,
               workers: int, retries: int = 2, resources: dict | None = None,
               worker_loss_timeout: float = WORKER_LOSS_TIMEOUT_S) -> list:
    """Call fn(*args) for every chunk on Dask; returns results in input order."""
    from distributed import wait

    if not chunk_args:
        return []
    results: list = [None] * len(chunk_args)
    with dask_client(address, workers) as client, Progress(len(chunk_args), description, unit="chunk") as bar:
        if resources:
            wait_for_resources(client, resources)
        futures = {client.submit(fn, *args, retries=retries, pure=False, resources=resources): i
                   for i, args in enumerate(chunk_args)}
        failed, pending, alone_since = [], set(futures), None
        while pending:
            try:
                done, pending = wait(pending, timeout=1.0, return_when="FIRST_COMPLETED")
            except TimeoutError:   # nothing finished this second: look at the workers
                done = set()
            progressed = False
            for future in done:
                index = futures[future]
                if future.status == "error":
                    failed.append((chunk_args[index], repr(future.exception())))
                else:
                    try:
                        results[index] = future.result(timeout=RESULT_FETCH_S)
                    except TimeoutError:   # finished on a worker that died before we fetched: the scheduler
                        pending.add(future)   # recomputes it when a worker is back (its marker makes that cheap)
                        continue
                bar.advance()
                progressed = True
            if not pending or progressed:
                alone_since = None
                continue
            if client.scheduler_info(n_workers=-1)["workers"]:
                alone_since = None
            elif alone_since is None:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since >= worker_loss_timeout:
                client.cancel(list(pending))
                raise NoWorkers(f"{description}: no Dask worker left on scheduler {client.scheduler.address} for "
                                f"{worker_loss_timeout:.0f}s; {len(chunk_args) - len(pending)} of {len(chunk_args)} "
                                f"chunks finished and keep their markers: start a worker and run again to resume")
    if failed:
        lines = "\n".join(f"  chunk {args[:3]}: {error}" for args, error in failed)
        raise ChunkFailures(f"{len(failed)} of {len(chunk_args)} chunks failed after {retries} retries:\n{lines}")
    return results
