"""The GIL convoy in the encode pass, measured with the pass's own functions on this machine's CPU.

The thread that drives the device makes many short calls per batch; each releases the GIL and takes it back.
Meanwhile the pass's writer threads run Python (zarr's API, the marker, the reject table). With CPython's
default 5 ms switch interval, a call that finds a writer running Python waits until the writer is made to let
go. This bench runs one batch's work of the driving thread, as tasks.encode.files runs
it (channel moments, the storage form, the fused hierarchy with device statistics and the NaN flag), in a
loop, beside one competitor at a time: a writer thread writing latent chunks with
storage.latent_store.write_latent_chunk into a scratch store, or the pass's reading and preparing threads
(tasks.encode.files.prepared_batches) over small JPEG files; under the default interval and under
0.1 ms (tasks.encode.files.gil_switch_interval, the stage's `encoder.gil_switch_ms`). Small batches and one torch
thread, so that calls, not arithmetic, dominate, as on a GPU where the arithmetic runs elsewhere.

    .venv/bin/python bench/gil_convoy.py [--batches 40] [--batch 8]

Figures (bench/results/gil_convoy.json): the driving thread's ms per batch alone, and beside each competitor
(the writer; the reading and preparing threads over JPEG files) at the default interval and with short
slices; the competitor's own rate in each.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.results_io import write_result  # noqa: E402
from models.channel_stats import DeviceMoments  # noqa: E402
from models.hierarchy.batched import build_hierarchies_batched, device_stats  # noqa: E402
from models.hierarchy.reference import HierarchySpec  # noqa: E402
from storage import zarr_store  # noqa: E402
from storage.latent_store import latent_store_arrays, write_latent_chunk  # noqa: E402
from tasks.encode.files import gil_switch_interval, read_back, stored_form  # noqa: E402

SWITCH_INTERVAL_S = 1e-4   # the short slices tried; CPython's default is 5e-3
GRID, DIM, CHUNK = 4, 64, 64   # 16 tokens: the merge loop is calls, not arithmetic


def batch_work(tokens: torch.Tensor, spec: HierarchySpec, stats, flag: torch.Tensor) -> None:
    """What tasks.encode.files.encode_file_chunks does per batch after the encoder, in its order."""
    moments = DeviceMoments()
    moments.add(tokens)
    stored = stored_form(tokens, "float16")
    build_hierarchies_batched(read_back(stored, "float16"), spec, stats=stats, nonfinite=flag)


def writer(store: Path, stop: threading.Event, written: list[int]) -> None:
    tokens = np.random.default_rng(0).standard_normal((CHUNK, GRID, GRID, DIM)).astype(np.float16)
    moments = (CHUNK, np.zeros(DIM), np.ones(DIM))
    chunk = 0
    while not stop.is_set():
        c = chunk % 4
        write_latent_chunk(store, c, c * CHUNK, tokens, np.ones(CHUNK, bool), np.zeros(CHUNK, np.int64), moments,
                           "float16", {"stop": (c + 1) * CHUNK}, [], encoded=True)
        chunk += 1
    written.append(chunk)


def preparer(folder: Path, stop: threading.Event, prepared: list[int]) -> None:
    """The pass's reading and preparing threads (tasks.encode.files.prepared_batches) over JPEG files, again
    and again: file reads, header checks, decodes, crops and resizes, as they run beside the driving thread."""
    from storage.imagenet import SampleFiles
    from tasks.encode.files import Preprocess, prepared_batches
    from tasks.encode.phase_clock import PhaseClock

    files = SampleFiles(paths=tuple(sorted(str(p) for p in folder.glob("*.JPEG"))))
    spans = [(start, min(start + 16, len(files))) for start in range(0, len(files), 16)]
    count = 0
    while not stop.is_set():
        for batch in prepared_batches(files, spans, Preprocess(32, 36), torch.device("cpu"), 4, None,
                                       PhaseClock(False)):
            count += len(batch.ok)
            if stop.is_set():
                break
    prepared.append(count)


def write_jpegs(folder: Path, count: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):   # small files: the per-file Python, not the decoding, is what this thread adds
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(folder / f"{i}.JPEG", quality=90)


def timed(batches: int, tokens, spec, stats, flag) -> list[float]:
    seconds = []
    for _ in range(batches):
        began = time.perf_counter()
        batch_work(tokens, spec, stats, flag)
        seconds.append(time.perf_counter() - began)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = HierarchySpec(k=2, alpha=0.0, lam=0.0, cuts=(0.7, 0.4), cut_mode="height", linkage="average", seed=0)
    tokens = torch.randn(args.batch, GRID, GRID, DIM)
    stats = device_stats((np.zeros(DIM), np.ones(DIM)), DIM, "cpu")
    flag = torch.zeros((), dtype=torch.bool)
    timed(2, tokens, spec, stats, flag)   # warm-up
    per_batch, rates = {"alone": statistics.median(timed(args.batches, tokens, spec, stats, flag))}, {}
    with tempfile.TemporaryDirectory() as scratch:
        store, folder = Path(scratch) / "latents", Path(scratch) / "jpegs"
        zarr_store.create_store(store, latent_store_arrays(4 * CHUNK, 4, GRID, DIM, "float16"), CHUNK, {})
        folder.mkdir()
        write_jpegs(folder, 256)
        competitors = {"writer": lambda stop, out: writer(store, stop, out),
                       "preparer": lambda stop, out: preparer(folder, stop, out)}
        for competitor, target in competitors.items():
            short = gil_switch_interval(SWITCH_INTERVAL_S * 1e3)
            for name, slices in (("default", contextlib.nullcontext()), ("short", short)):
                stop, done = threading.Event(), []
                thread = threading.Thread(target=target, args=(stop, done))
                with slices:
                    thread.start()
                    time.sleep(0.5)
                    began = time.perf_counter()
                    per_batch[f"{competitor}_{name}"] = statistics.median(timed(args.batches, tokens, spec, stats,
                                                                                flag))
                    stop.set()
                    thread.join()
                    rates[f"{competitor}_{name}"] = done[0] / (time.perf_counter() - began + 0.5)
    interval_ms = SWITCH_INTERVAL_S * 1e3
    figures = {"batch_ms_alone": (round(per_batch["alone"] * 1e3, 2), "ms per batch, no other thread")}
    units = {"writer": f"latent chunks of {CHUNK} written per s", "preparer": "images prepared per s"}
    for key, seconds in per_batch.items():
        if key == "alone":
            continue
        competitor, name = key.split("_")
        interval = "5 ms (CPython's default)" if name == "default" else f"{interval_ms:g} ms"
        figures[f"batch_ms_beside_{key}"] = (round(seconds * 1e3, 2), f"ms per batch beside the {competitor} "
                                                                      f"thread, {interval} switch interval")
        figures[f"{competitor}_rate_{name}"] = (round(rates[key], 1), units[competitor])
    for name, (value, unit) in figures.items():
        print(f"{name}: {value} {unit}")
    write_result("gil_convoy", figures, {"batch": args.batch, "grid": GRID, "dim": DIM, "batches": args.batches},
                 folder=args.out)


if __name__ == "__main__":
    main()
