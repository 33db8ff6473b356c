"""Structure values in spawned worker processes, fed through memory-mapped batch slots.

The evaluation's per-sample structure values cost ~50 CPU-ms a sample, more than the GPU
pass at 50k samples, so they run in processes next to it. Canvases go through files in
/dev/shm (or the temp folder) rather than pickles; `max_inflight` slots bound the memory.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from models.hierarchy.reference import HierarchySpec
from models.evaluation.structure_stream import InlineStructure, structure_chunk


def _chunk_from_files(canvas_file: str, canvas_shape: tuple, lo: int, hi: int,
                      reencode_file: str | None, reencode_shape: tuple | None, r_lo: int, r_hi: int,
                      threshold: float, spec: HierarchySpec | None, want_regions: int,
                      used_levels: int | None = None, latent_stats: tuple | None = None,
                      judged: np.ndarray | None = None, regions: np.ndarray | None = None,
                      adherence: np.ndarray | None = None, canvas_rows: int | None = None) -> dict:
    """One block's structure values in a worker; canvas_rows: the rows the caller copied (fewer than the
    batch's when the regions and plan adherence came found on the device)."""
    rows = hi if canvas_rows is None else min(hi, max(lo, canvas_rows))
    canvases = np.memmap(canvas_file, dtype=np.float32, mode="r", shape=canvas_shape)[:used_levels, lo:rows]
    reencoded = None
    if reencode_file is not None and r_hi > r_lo:
        reencoded = np.memmap(reencode_file, dtype=np.float32, mode="r", shape=reencode_shape)[r_lo:r_hi]
    return structure_chunk(canvases, reencoded, threshold, spec, want_regions, latent_stats, judged, regions,
                           adherence)


def _worker_init() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    torch.set_num_threads(1)


def _shared_dir(needed_bytes: int) -> str:
    base = "/dev/shm"
    if os.path.isdir(base) and os.access(base, os.W_OK) and shutil.disk_usage(base).free > 2 * needed_bytes:
        return tempfile.mkdtemp(prefix="tf-eval-", dir=base)
    return tempfile.mkdtemp(prefix="tf-eval-")



class ProcessStructure(InlineStructure):
    """InlineStructure whose chunks run in `workers` spawned processes over shared batch slots."""

    def __init__(self, num_samples: int, reencode: int, levels: int, batch: int, tokens: int, channels: int,
                 reencode_shape: tuple | None, threshold: float, spec: HierarchySpec | None, want_regions: int,
                 latent_stats: tuple | None = None, *, workers: int, inflight: int):
        super().__init__(num_samples, reencode, levels, batch, tokens, channels, reencode_shape, threshold,
                         spec, want_regions, latent_stats)
        self.workers = max(1, workers)
        slot_bytes = levels * batch * tokens * channels * 4
        r_bytes = int(np.prod(reencode_shape)) * 4 if reencode_shape else 0
        self.dir = _shared_dir(inflight * slot_bytes + r_bytes)
        self.slot_shape = (levels, batch, tokens, channels)
        inflight = max(1, min(inflight, math.ceil(max(num_samples, 1) / batch)))
        self.slots = [os.path.join(self.dir, f"slot{i}.f32") for i in range(inflight)]
        self.slot_maps = [np.memmap(p, dtype=np.float32, mode="w+", shape=self.slot_shape) for p in self.slots]
        self.slot_futures: list[list] = [[] for _ in self.slots]
        self.reencode_file, self.reencode_map = None, None
        if reencode_shape and reencode_shape[0] > 0:
            self.reencode_file = os.path.join(self.dir, "reencode.f32")
            self.reencode_map = np.memmap(self.reencode_file, dtype=np.float32, mode="w+", shape=reencode_shape)
        self.reencode_shape = reencode_shape
        self.pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_worker_init)

    def submit(self, batch_index: int, start: int, canvases: Sequence[Tensor], reencoded: np.ndarray | None,
               judged: np.ndarray | None = None, regions: np.ndarray | None = None,
               adherence: np.ndarray | None = None) -> None:
        copied = canvases[0].shape[0]
        s = copied if regions is None else len(regions)
        want = max(0, min(self.want - start, s))
        slot = batch_index % len(self.slots)
        self._drain(slot)
        copy_started = time.perf_counter()
        target = torch.from_numpy(self.slot_maps[slot])
        for level, c in enumerate(canvases):
            target[level, :copied].copy_(c)
        r = 0 if reencoded is None else len(reencoded)
        if r:
            self.reencode_map[start:start + r] = reencoded
        self.copy_s += time.perf_counter() - copy_started
        step = max(1, math.ceil(s / (2 * self.workers)))
        for lo in range(0, s, step):
            hi = min(lo + step, s)
            r_lo, r_hi = start + lo, start + min(hi, r)
            future = self.pool.submit(_chunk_from_files, self.slots[slot], self.slot_shape, lo, hi,
                                      self.reencode_file if r_hi > r_lo else None, self.reencode_shape,
                                      r_lo, r_hi, self.threshold, self.spec, max(0, min(want - lo, hi - lo)),
                                      len(canvases), self.latent_stats,   # small ints below: pickled
                                      None if judged is None else judged[lo:hi],
                                      None if regions is None else regions[lo:hi],
                                      None if adherence is None else adherence[lo:hi], copied)
            self.slot_futures[slot].append((start + lo, future))

    def _drain(self, slot: int) -> None:
        for start, future in self.slot_futures[slot]:
            self.store(start, future.result())
        self.slot_futures[slot] = []

    def finish(self) -> None:
        for slot in range(len(self.slots)):
            self._drain(slot)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.dir is not None:
            self.slot_maps, self.reencode_map = [], None
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def process_structure(workers: int, inflight: int = 3):
    """A structure runner factory for models.evaluation.streaming_eval.evaluate_streaming(structure_runner=...):
    `workers` processes (0: inline in the calling thread), at most `inflight` batches handed out."""
    if workers <= 0:
        return InlineStructure
    return functools.partial(ProcessStructure, workers=workers, inflight=max(1, inflight))
