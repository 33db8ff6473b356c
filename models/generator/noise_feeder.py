"""Per-sample noise for batched sampling, drawn one batch ahead in threads into pinned memory.

models.generator.trajectory.level_noises uses one CPU generator per sample, so every sample gets the
same noise in any batch and any thread split.
"""
from __future__ import annotations

import concurrent.futures as cf
import math

import numpy as np
import torch
from torch import Tensor

from models.generator.trajectory import level_noises


class NoiseFeeder:
    def __init__(self, seeds: np.ndarray, batch: int, shape: tuple[int, int, int], device: torch.device,
                 threads: int):
        self.seeds, self.batch, self.shape, self.device = seeds, batch, shape, device
        self.threads = max(1, threads)
        self.pool = cf.ThreadPoolExecutor(self.threads) if threads > 0 else None
        levels, tokens, channels = shape
        pin = device.type == "cuda"
        self.buffers = [torch.empty((levels, batch, tokens, channels), pin_memory=pin)
                        for _ in range(2 if self.pool else 1)]
        self.copied = [None] * len(self.buffers)   # CUDA event: the buffer's last copy to the device is done
        self.pending: dict[int, list] = {}

    def _fill(self, slot: int, seeds: np.ndarray, offset: int) -> None:
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()
        noises = level_noises(self.shape[0], self.shape[1], self.shape[2], seeds.tolist(), "cpu")
        for level, x in enumerate(noises):
            self.buffers[slot][level, offset:offset + len(seeds)].copy_(x)

    def _submit(self, b: int) -> None:
        start = b * self.batch
        seeds = self.seeds[start:start + self.batch]
        slot = b % len(self.buffers)
        step = math.ceil(len(seeds) / self.threads)
        jobs = [(slot, seeds[i:i + step], i) for i in range(0, len(seeds), step)]
        if self.pool is None:
            for job in jobs:
                self._fill(*job)
            self.pending[b] = []
        else:
            self.pending[b] = [self.pool.submit(self._fill, *job) for job in jobs]

    def get(self, b: int) -> Tensor:
        """[L, n, T, C] noise of batch b on the device (the next batch is started right after)."""
        if b not in self.pending:
            self._submit(b)
        for future in self.pending.pop(b):
            future.result()
        slot = b % len(self.buffers)
        n = len(self.seeds[b * self.batch:(b + 1) * self.batch])
        view = self.buffers[slot][:, :n]
        if self.device.type == "cpu":
            out = view.clone()
        else:
            out = view.to(self.device, non_blocking=True)
            self.copied[slot] = torch.cuda.Event()
            self.copied[slot].record()
        if (b + 1) * self.batch < len(self.seeds) and self.pool is not None:
            self._submit(b + 1)
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

