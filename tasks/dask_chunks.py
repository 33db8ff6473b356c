"""Run per-chunk functions on Dask: a local cluster by default, or an existing scheduler.

Chunks are idempotent (each writes its own region, then its marker), so a failed chunk
is simply retried; one that keeps failing is reported by name, never dropped.
"""
from __future__ import annotations

import contextlib
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
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster, Client(cluster) as client:
        yield client


class ChunkFailures(RuntimeError):
    pass


def run_chunks(fn: Callable, chunk_args: Sequence[tuple], *, description: str, address: str | None,
               workers: int, retries: int = 2, resources: dict | None = None) -> list:
    """Call fn(*args) for every chunk on Dask; returns results in input order."""
    from distributed import as_completed

    if not chunk_args:
        return []
    results: list = [None] * len(chunk_args)
    with dask_client(address, workers) as client, Progress(len(chunk_args), description, unit="chunk") as bar:
        futures = {client.submit(fn, *args, retries=retries, pure=False, resources=resources): i
                   for i, args in enumerate(chunk_args)}
        failed = []
        for future in as_completed(futures):
            index = futures[future]
            if future.status == "error":
                failed.append((chunk_args[index], repr(future.exception())))
            else:
                results[index] = future.result()
            bar.advance()
    if failed:
        lines = "\n".join(f"  chunk {args[:3]}: {error}" for args, error in failed)
        raise ChunkFailures(f"{len(failed)} of {len(chunk_args)} chunks failed after {retries} retries:\n{lines}")
    return results
