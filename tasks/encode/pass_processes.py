"""The direct encode pass split over spawned processes that share a device (encoder.pass_processes).

One pass is host-bound on a GPU: nvjpeg's batched decode holds its thread about 0.23 ms a file, and the thread
that launches the encoder and the fused hierarchy shares one GIL with it, the readers and the writers
(docs/gpu.md: the fused hierarchy took 7.8 s of that thread's time for 1.4 s of device work, and the GPU was
busy half the pass). N processes, each with its own GIL, nvjpeg, encoder and pass over every N-th pending
chunk (tasks.encode.files.encode_file_chunks, unchanged), feed one GPU from N interpreters. Chunks are disjoint
and each is written whole with its marker last, so the stores are the ones a single pass writes; this process
keeps the stage's lock, the templates, the statistics pass and the progress bar.

The processes start first (imports, encoder, CUDA context, kernels warmed) while this process checks the
source, loads its own encoder and runs the statistics pass; each one's work order (its chunks, and the Teacher
whose statistics that pass fixes) goes out once it is ready and has loaded the planned weights. A process that
fails or dies stops the stage, naming it and its error; the others are ended, and the chunks they finished
keep their markers, so a rerun resumes. No Prefect or Dask here.
"""
from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from models.hierarchy.reference import HierarchySpec

POLL_S = 0.5   # how often the parent looks for a process that died without a word


@dataclass(frozen=True)
class PassSetup:
    """What a pass process builds before its work order: the settings as plain dicts (only plain data crosses
    to a spawned process), the stores' paths and its device."""
    encoder: dict
    source: dict
    images: str
    store: str
    device: str
    threads: int                        # torch's CPU threads, as in the parent (the same kernels, the same sums)
    warm_spec: HierarchySpec | None     # the fused hierarchy's, to compile its kernels before the order comes


def _warm(model, graphs, spec: HierarchySpec | None, batch: int, size: int, device) -> None:
    """On CUDA, one encoder batch (captured, with graphs) and one hierarchy over random values of a full
    batch's shape, so the pass's first batch pays no cuBLAS, capture or Triton start."""
    import numpy as np
    import torch

    from models.encoder import grid_size, token_dim
    from models.hierarchy.batched import build_hierarchies_batched
    from tasks.encode.files import encode_batch

    noise = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        encode_batch(model, torch.rand((batch, 3, size, size), device=device, generator=noise), graphs)
        if spec is not None:
            side, dim = grid_size(model), token_dim(model)
            tokens = torch.randn((batch, side, side, dim), device=device, generator=noise)
            build_hierarchies_batched(tokens, spec, stats=(np.zeros(dim), np.ones(dim)))
    torch.cuda.synchronize(device)


def _serve(setup: PassSetup, index: int, orders, events) -> None:
    """A pass process: build, warm, say ready with its weights label, then run the one work order ((chunk, start,
    stop) list, Teacher or None) and say done with its phase clock; any error goes back as a message."""
    split = None
    try:
        import numpy as np
        import torch

        from storage import zarr_store
        from storage.config import EncoderConfig, SourceConfig
        from storage.imagenet import resize_short_side, sample_files
        from tasks.encode.cuda_graph import EncoderGraphs
        from tasks.encode.decode import DecodeSplit
        from tasks.encode.encoder_load import load_encoder
        from tasks.encode.files import Preprocess, encode_file_chunks
        from tasks.encode.phase_clock import PhaseClock

        began = time.perf_counter()
        torch.set_num_threads(setup.threads)
        enc, src = EncoderConfig.model_validate(setup.encoder), SourceConfig.model_validate(setup.source)
        model, label = load_encoder(enc.model, src.image_size, enc.weights, enc.allow_random_init)
        device = torch.device(setup.device)
        cuda = device.type == "cuda"
        if cuda and device.index is not None:
            torch.cuda.set_device(device)
        model = model.to(device)
        ids = zarr_store.open_array(setup.images, "sample")[:].tolist()
        labels = np.asarray(zarr_store.open_array(setup.images, "label")[:], np.int64)
        files = sample_files(src, ids)
        preprocess = Preprocess(src.image_size, resize_short_side(src), src.interpolation)
        graphs = EncoderGraphs(model) if cuda and enc.cuda_graph else None
        split = DecodeSplit(enc.cpu_decode_share, processes=enc.cpu_decode_processes) if cuda else None
        if cuda:
            _warm(model, graphs, setup.warm_spec, enc.batch_size, src.image_size, device)
        events.put(("ready", index, time.perf_counter() - began, label))
        order = orders.get()
        if order is None:   # the stage ended before it had work for this process
            return
        chunks, teacher = order
        clock = PhaseClock(cuda)
        encode_file_chunks(model, files, labels, setup.store, chunks, preprocess, device,
                           batch_size=enc.batch_size, dtype=enc.dtype, weights_label=label, readers=enc.readers,
                           writers=enc.writers, worker=f"pass process {index}", read_timeout=enc.read_timeout_s,
                           on_chunk=lambda rows: events.put(("rows", index, rows)), teacher=teacher, clock=clock,
                           split=split, graphs=graphs, hierarchy_graph=enc.hierarchy_graph)
        events.put(("done", index, clock.summary()))
    except BaseException as error:   # noqa: BLE001 -- every failure goes back to the stage, which raises it
        events.put(("failed", index, f"{type(error).__name__}: {error}", traceback.format_exc()))
    finally:
        if split is not None:
            split.close()


class PassProcesses:
    """Spawned pass processes, one per PassSetup, started now. `run` hands out the work orders and waits for
    every process, advancing the bar by each chunk's rows; `close` ends whatever is still running."""

    def __init__(self, setups: list[PassSetup]):
        context = multiprocessing.get_context("spawn")
        self.setups = setups
        self.events = context.Queue()
        self.orders = [context.Queue() for _ in setups]
        self.ready_s: dict[int, float] = {}
        self.processes = [context.Process(target=_serve, args=(setup, i, self.orders[i], self.events),
                                          name=f"tf-encode-pass-{i}", daemon=True)
                          for i, setup in enumerate(setups)]
        for process in self.processes:
            process.start()

    def name(self, index: int) -> str:
        return f"encode pass process {index} ({self.setups[index].device})"

    def run(self, orders: list[tuple[list[tuple[int, int, int]], object]], advance: Callable[[int], None],
            weights_label: str) -> dict[str, dict[str, float]]:
        """Each process's order ((chunk, start, stop) list, Teacher or None), sent once it is ready with the
        weights the latent store was planned with; returns each one's phase clock summary by name. Raises,
        naming the process, when one loaded other weights, fails or exits without finishing."""
        if len(orders) != len(self.processes):
            raise ValueError(f"{len(orders)} orders for {len(self.processes)} pass processes")
        summaries: dict[int, dict] = {}
        silent: dict[int, int] = {}   # polls since a process was seen to have exited without its "done"
        while len(summaries) < len(self.processes):
            try:
                event = self.events.get(timeout=POLL_S)
            except queue.Empty:
                for i, process in enumerate(self.processes):
                    if i not in summaries and process.exitcode is not None:
                        silent[i] = silent.get(i, 0) + 1
                        if silent[i] > 2:   # its queue has had time to flush: it died without a word
                            raise RuntimeError(f"{self.name(i)} exited with code {process.exitcode} before "
                                               f"finishing its chunks")
                continue
            kind, index = event[0], event[1]
            if kind == "rows":
                advance(event[2])
            elif kind == "ready":
                if event[3] != weights_label:
                    raise RuntimeError(f"{self.name(index)} loaded encoder weights {event[3]!r}, but the latent "
                                       f"store was planned with {weights_label!r}")
                self.ready_s[index] = round(event[2], 3)
                self.orders[index].put(orders[index])
            elif kind == "done":
                summaries[index] = event[2]
            else:
                raise RuntimeError(f"{self.name(index)} failed: {event[2]}\n{event[3]}")
        return {self.name(i): {"ready_s": self.ready_s.get(i), **summaries[i]} for i in sorted(summaries)}

    def close(self, at_once: bool = False) -> None:
        """Processes still waiting for their order leave; with `at_once` (the stage failed) or after 5 s, the
        rest are terminated: a chunk they were writing has no marker, so a rerun redoes it."""
        for inbox in self.orders:
            inbox.put(None)
        deadline = time.monotonic() + (0.0 if at_once else 5.0)
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(5.0)

    def __enter__(self) -> PassProcesses:
        return self

    def __exit__(self, failed, *exc) -> None:
        self.close(at_once=failed is not None)
