"""What a stage did with its GPU, as the stage itself records it: peak memory and busy share.

`watch(device)` wraps a stage's work: on CUDA it resets the peak-memory counter and samples the
GPU's utilisation (NVML, through torch.cuda.utilization) every `every_s` seconds on a side thread;
the figures land in the stage's result and so in the runs table. Elsewhere it records nothing.
The busy share is NVML's: the fraction of sample periods in which a kernel was running.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def watch(device: str, every_s: float = 0.2) -> Iterator[dict]:
    """Yields a dict that holds, after the block, gpu_peak_mem_gib and gpu_busy_share (CUDA only)."""
    import torch

    figures: dict = {}
    device = "cuda" if device == "auto" else str(device)
    if not device.startswith("cuda") or not torch.cuda.is_available():
        yield figures
        return
    index = torch.device(device).index or 0
    if torch.cuda.is_initialized():   # else CUDA starts (or not) inside the stage: its peak counts from there
        torch.cuda.reset_peak_memory_stats(index)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            try:
                samples.append(torch.cuda.utilization(index))
            except Exception:   # no NVML here: no busy share, the rest still recorded
                return

    thread = threading.Thread(target=sample, name="gpu-watch", daemon=True)
    thread.start()
    try:
        yield figures
    finally:
        stop.set()
        thread.join()
        if torch.cuda.is_initialized():   # a stage that never touched CUDA has no figures
            figures["gpu_peak_mem_gib"] = round(torch.cuda.max_memory_allocated(index) / 2**30, 3)
        if samples and torch.cuda.is_initialized():
            figures["gpu_busy_share"] = round(sum(samples) / (100.0 * len(samples)), 4)
            figures["gpu_busy_samples"] = len(samples)
