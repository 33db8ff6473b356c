"""The direct encode path: image files -> latent store chunks, one pass per device.

    reader threads (file bytes, a few batches ahead)
      -> a preparing thread (decode: nvjpeg on CUDA, CPU decoders for the rest; crop + resize;
         on CUDA on a side stream, so it overlaps the encoder's batch before); with encoder.decode_ahead 0
         this thread instead, on its own stream, just before the batch's encoder
      -> on this thread, per batch on the device: the encoder (bf16 autocast on CUDA), channel
         moments in float64, the storage form (float16 / bfloat16 bits), and with a Teacher the
         hierarchy of the stored values (models.hierarchy.batched); one async copy to a pinned buffer
      -> writer threads (latents, reject rows, then the teacher's regions; each marker last)

`encode_file_chunks` is what `tf encode` runs for ImageNet sources (tasks/encode/stage.py, in-process
per GPU or one Dask task per chunk) and what bench/dataplane.py times. It writes the chunks it is
given through storage.latent_store.write_latent_chunk, so a store it makes is the store the
image-store path makes; a file nothing decodes is a reject row and a slot with valid False.
tasks.encode.pixels runs the same reading and preparing pipeline for ingest's pixel sample and the
evaluation's real images. No Prefect, Dask or pydantic here.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.channel_stats import DeviceMoments
from models.encoder import encode_tensor, grid_size, token_dim
from models.hierarchy.batched import build_hierarchies_batched, device_stats
from models.hierarchy.reference import HierarchySpec
from storage import zarr_store
from storage.imagenet import SampleFiles
from storage.latent_store import write_latent_chunk
from storage.sources import reject_reason
from tasks.encode.cuda_graph import EncoderGraphs, HierarchyGraphs
from tasks.encode.decode import DECODE_AHEAD, DecodeSplit, crop_resize, decode_images
from tasks.encode.phase_clock import PhaseClock

READ_AHEAD = 4      # batches whose bytes are being read meanwhile


@contextlib.contextmanager
def gil_switch_interval(ms: float | None) -> Iterator[None]:
    """CPython's GIL time slice set to `ms` for the duration (None: left as it is). The thread driving the GPU
    makes hundreds of short calls a batch, each giving the GIL up and taking it back; when another thread runs
    Python then, taking it back waits until that thread is made to yield, up to the slice (5 ms by default).
    bench/gil_convoy.py measures it; set once per stage (a pass per GPU runs as threads of one process)."""
    if ms is None:
        yield
        return
    before = sys.getswitchinterval()
    sys.setswitchinterval(ms / 1000.0)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@dataclass(frozen=True)
class Preprocess:
    size: int                       # source.image_size
    resize_short: int               # storage.imagenet.resize_short_side
    interpolation: str = "bicubic"  # source.interpolation: the mode of the antialiased resize


@dataclass
class Prepared:
    """One batch ready for the encoder: the decodable files' pixels and what became of the others."""
    images01: torch.Tensor | None   # [n_ok, 3, S, S] in [0, 1] on the device; None when nothing decoded
    ok: np.ndarray                  # bool [batch]: decoded
    rejects: list[dict] = field(default_factory=list)
    ready: torch.cuda.Event | None = None   # on CUDA: recorded on the preparing thread's side stream

    def images(self) -> torch.Tensor | None:
        """images01 for use on the current stream: on CUDA that stream first waits for the side stream's
        decode and resize, and the allocator learns the tensor is used there (no reuse while in flight)."""
        if self.images01 is not None and self.ready is not None:
            stream = torch.cuda.current_stream(self.images01.device)
            stream.wait_event(self.ready)
            self.images01.record_stream(stream)
        return self.images01


class BatchRead:
    """Slots start..stop of `files`, being read by at most `readers` tasks of `pool` that each take the next
    unread unit in turn: one file of a folder (a hung file costs only itself), or one of `readers` slices of a
    tar (one forward pass each). A task a reader, not a future a file: 512 submissions a batch were a visible
    share of the GIL held by the thread that launches the encoder (py-spy on an H100, docs/gpu.md)."""

    def __init__(self, files: SampleFiles, start: int, stop: int, pool: cf.Executor, readers: int):
        step = max(1, -(-(stop - start) // max(1, readers))) if files.archive else 1
        self.files, self.start = files, start
        self.units = [(s, min(s + step, stop)) for s in range(start, stop, step)]
        self.out: list = [None] * (stop - start)   # None: not read yet
        self._taken, self._left = 0, len(self.units)
        self._lock = threading.Lock()
        self.done = threading.Event()
        if not self.units:
            self.done.set()
        for _ in range(min(max(1, readers), len(self.units))):
            pool.submit(self._work)

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._taken == len(self.units):
                    return
                first, last = self.units[self._taken]
                self._taken += 1
            try:
                values = self.files.read(first, last)
            except Exception as error:   # read() gives each file's error; this is anything else, per file
                values = [error] * (last - first)
            self.out[first - self.start:last - self.start] = values
            with self._lock:
                self._left -= 1
                if not self._left:
                    self.done.set()


def read_parts(files: SampleFiles, start: int, stop: int, pool: cf.Executor, readers: int) -> BatchRead:
    """Slots start..stop of `files`, read ahead by the reader pool (collect waits for them)."""
    return BatchRead(files, start, stop, pool, readers)


def collect(read: BatchRead, timeout: float | None) -> list[bytes | bytearray | Exception]:
    """The bytes (or read errors) of a BatchRead, in order. A file still unread `timeout` seconds after
    collecting began (a hung network file system) becomes an error: a reject row, and the run goes on. Its
    thread cannot be interrupted and stays behind, holding one reader."""
    read.done.wait(timeout)
    error = TimeoutError(f"not read within encoder.read_timeout_s = {timeout:g} s") if timeout is not None else None
    return [error if value is None else value for value in list(read.out)]


def prepare_batch(datas: list, files: SampleFiles, first_slot: int, preprocess: Preprocess, device: torch.device,
                  pool: cf.Executor, stage: str, clock: PhaseClock | None = None,
                  split: DecodeSplit | None = None) -> Prepared:
    """File bytes (or read errors) of slots first_slot.. -> the encoder's input and reject rows."""
    clock = clock or PhaseClock(False)
    with clock.device("decode"):
        decoded = decode_images(datas, device, cpu_map=pool.map, split=split)
    ok = np.array([not isinstance(d, Exception) for d in decoded], bool)
    rejects = [{"stage": stage, "path": files.where(first_slot + i), "reason": reject_reason(d)}
               for i, d in enumerate(decoded) if isinstance(d, Exception)]
    good = [d for d in decoded if not isinstance(d, Exception)]
    with clock.device("resize"):
        images01 = crop_resize(good, preprocess.size, preprocess.resize_short, preprocess.interpolation) if good else None
    return Prepared(images01, ok, rejects)


def encode_batch(model, images01: torch.Tensor, graphs: EncoderGraphs | None = None) -> torch.Tensor:
    """[B, 3, S, S] in [0, 1] -> float32 [B, g, g, C], as models.encoder.encode_images encodes (bf16 on CUDA);
    with `graphs` (CUDA), replayed as one CUDA graph per batch shape."""
    cuda = images01.device.type == "cuda"
    if graphs is not None and cuda:
        tokens = graphs(images01)
    else:
        with torch.autocast(images01.device.type, dtype=torch.bfloat16, enabled=cuda):
            tokens = encode_tensor(model, images01)
    side = grid_size(model)
    return tokens.float().reshape(len(tokens), side, side, token_dim(model))


# --- storage form on the device: what zarr_store.encode_floats / decode_floats do on the host ----------
_HOST = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.int16}   # bf16: its bit patterns


def stored_form(tokens: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 tokens -> the latent store's values on their own device (half the bytes to move for 16-bit
    storage): float16/float32 by a cast, bfloat16 as its bit patterns, rounded to nearest even with NaN as
    0x7FC0, exactly as zarr_store.encode_floats."""
    if dtype == "bfloat16":
        return tokens.to(torch.bfloat16).view(torch.int16)
    return tokens.to(_HOST[dtype])


def read_back(stored: torch.Tensor, dtype: str) -> torch.Tensor:
    """What a reader of the store gets for `stored` (zarr_store.decode_floats): float32."""
    return (stored.view(torch.bfloat16) if dtype == "bfloat16" else stored).float()


def stored_tensor(raw: np.ndarray, bf16: bool) -> torch.Tensor:
    """A store's raw values (zarr_store.read_stored) as a tensor of the stored form: bfloat16 bit patterns
    as torch.bfloat16 (the inverse of _host_numpy), other dtypes as they are."""
    if bf16:
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw)


def _host_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    array = tensor.numpy()
    return array.view(np.uint16) if dtype == "bfloat16" else array


@dataclass(frozen=True)
class Teacher:
    """The hierarchy computed in the same pass as the latents (DESIGN §1: decode -> resize -> encode ->
    hierarchy): its spec, the channel statistics it standardises with (the latent store's mean/std, fixed
    before the pass) and its store's template. It clusters the tokens as stored, so its regions are the
    ones `tf hierarchy` computes from the latent store."""
    spec: HierarchySpec
    stats: tuple[np.ndarray, np.ndarray]
    store: Path


def prepared_batches(files: SampleFiles, spans: list[tuple[int, int]], preprocess: Preprocess,
                      device: torch.device, readers: int, read_timeout: float | None,
                      clock: PhaseClock, split: DecodeSplit | None = None) -> Iterator[Prepared]:
    """Each (start, stop) of `spans` (slots of `files`) as a Prepared batch, in order. Reader threads fetch
    bytes READ_AHEAD batches ahead; one preparing thread decodes and resizes the next `split.ahead` batches
    (DECODE_AHEAD without a split; on CUDA on a side stream, so it overlaps the encoder's work on this one, and
    it never waits for this thread), the reader threads decoding `split`'s share on the CPU meanwhile. Wait on
    `.ready` before using the images. With ahead 0 this thread decodes each batch when it is asked for, on its
    current stream: the GPU decoders then never run beside the encoder, where they starve (docs/gpu.md)."""
    cuda = device.type == "cuda"
    ahead = DECODE_AHEAD if split is None else split.ahead
    reader_pool, preparer = cf.ThreadPoolExecutor(readers), cf.ThreadPoolExecutor(1)
    # CUDA schedules lower numbers first; priority_range() is (lowest, highest)
    priority = torch.cuda.Stream.priority_range()[1] if cuda and split is not None and split.priority == "high" else 0
    side_stream = torch.cuda.Stream(device, priority=priority) if cuda and ahead else None
    reading: dict[int, BatchRead] = {}

    def read(i: int) -> None:
        if i < len(spans) and i not in reading:
            reading[i] = read_parts(files, *spans[i], reader_pool, readers)

    def prepare(i: int) -> Prepared:
        with clock.host("wait_for_files"):   # the readers are behind: file reads bound the pass
            datas = collect(reading.pop(i), read_timeout)
        with torch.cuda.stream(side_stream) if side_stream else contextlib.nullcontext():
            prepared = prepare_batch(datas, files, spans[i][0], preprocess, device, reader_pool, "encode", clock,
                                     split)
            if side_stream:
                prepared.ready = torch.cuda.Event()
                prepared.ready.record(side_stream)
        return prepared

    try:
        for i in range(READ_AHEAD):
            read(i)
        upcoming = collections.deque(preparer.submit(prepare, i) for i in range(min(ahead, len(spans))))
        for i in range(len(spans)):
            if not ahead:
                read(i + READ_AHEAD)
                yield prepare(i)   # on this thread and stream, after the batch before was queued
                continue
            with clock.host("wait_for_decode"):   # the preparing thread is behind the encoder
                prepared = upcoming.popleft().result()
            read(i + READ_AHEAD)
            if i + ahead < len(spans):
                upcoming.append(preparer.submit(prepare, i + ahead))
            yield prepared
    finally:
        preparer.shutdown(wait=True, cancel_futures=True)
        reader_pool.shutdown(wait=False, cancel_futures=True)   # a reader hung past the timeout stays behind


def _encode_prepared(model, prepared: Prepared, device: torch.device, clock: PhaseClock,
                     graphs: EncoderGraphs | None = None) -> torch.Tensor | None:
    """float32 [n_ok, g, g, C] tokens of a prepared batch's decodable images, on the device; None if none."""
    images01 = prepared.images()
    if images01 is None:
        return None
    with torch.no_grad(), clock.device("encoder"):
        return encode_batch(model, images01, graphs)


def sample_moments(model, files: SampleFiles, preprocess: Preprocess, device: str | torch.device, *,
                   batch_size: int, readers: int = 8, read_timeout: float | None = None,
                   split: DecodeSplit | None = None, graphs: EncoderGraphs | None = None,
                   clock: PhaseClock | None = None) -> tuple:
    """(count, mean [C], M2 [C]) of the encoder's tokens over every decodable file of `files`, accumulated on
    the device: the channel statistics of a sample (tasks.encode.stage spreads it over the source) that a fused
    pass standardises with before it has seen the rest. Nothing is written; `clock` collects where the time
    went."""
    device = torch.device(device)
    moments = DeviceMoments()
    clock = clock or PhaseClock(device.type == "cuda")
    spans = [(b, min(b + batch_size, len(files))) for b in range(0, len(files), batch_size)]
    for prepared in prepared_batches(files, spans, preprocess, device, readers, read_timeout, clock, split):
        tokens = _encode_prepared(model, prepared, device, clock, graphs)
        if tokens is not None:
            moments.add(tokens)
    return moments.result(token_dim(model))


class _HostBuffers:
    """Whole-chunk host buffers (latents in their storage form, regions), pinned on CUDA so the device's
    copies into them run asynchronously; `count` sets, reused in turn. `take` blocks while every set is
    still being written: that bounds host memory and holds the GPU back when the disk falls behind."""

    def __init__(self, count: int, rows: int, token_shape: tuple, dtype: str, region_shape: tuple | None, pin: bool):
        self.free: queue.Queue = queue.Queue()
        for _ in range(count):
            tokens = torch.empty((rows, *token_shape), dtype=_HOST[dtype], pin_memory=pin)
            regions = torch.empty((rows, *region_shape), dtype=torch.int16, pin_memory=pin) if region_shape else None
            self.free.put((tokens, regions))

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.free.get()

    def give(self, pair: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        self.free.put(pair)


@dataclass
class _Chunk:
    chunk: int
    start: int
    stop: int
    buffers: tuple[torch.Tensor, torch.Tensor | None]
    valid: np.ndarray
    moments: DeviceMoments = field(default_factory=DeviceMoments)
    rejects: list[dict] = field(default_factory=list)
    nonfinite: torch.Tensor | None = None   # bool device scalar: a token of the chunk was NaN or inf


def encode_file_chunks(model, files: SampleFiles, labels: np.ndarray, store: str | Path,
                       chunks: list[tuple[int, int, int]], preprocess: Preprocess, device: str | torch.device, *,
                       batch_size: int, dtype: str, weights_label: str, base: int = 0, readers: int = 8,
                       writers: int = 2, worker: str | None = None, read_timeout: float | None = None,
                       on_chunk: Callable[[int], None] | None = None, teacher: Teacher | None = None,
                       clock: PhaseClock | None = None, split: DecodeSplit | None = None,
                       graphs: EncoderGraphs | None = None, hierarchy_graph: bool = False) -> list[dict]:
    """Encode the samples of `chunks` ((chunk, start, stop), disjoint) into the latent store's template and,
    with `teacher`, their regions into the teacher store's template in the same pass.

    `files` and `labels` hold slots base.. (a Dask task passes only its chunk's files); the model is on
    `device`. Per batch, on the device: encode, channel moments (float64), the storage form, the hierarchy
    of the stored values; then one asynchronous copy into a pinned chunk buffer. Writer threads put each
    finished chunk on disk, latents then teacher, each marker last. Returns each chunk's marker info;
    `on_chunk(rows)` after each chunk is on disk; `clock` collects where the time went (PhaseClock); `split`
    (on CUDA) hands a share of nvjpeg's files to the reader threads' CPU decoders; `graphs` (on CUDA) replays the
    encoder as CUDA graphs (tasks.encode.cuda_graph), `hierarchy_graph` (on CUDA, with `teacher`) the hierarchy."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    clock = clock or PhaseClock(cuda)
    side, dim = grid_size(model), token_dim(model)
    spans = [(c, b, min(b + batch_size, stop)) for c, start, stop in chunks for b in range(start, stop, batch_size)]
    bounds = {c: (start, stop) for c, start, stop in chunks}
    rows = max((stop - start for _, start, stop in chunks), default=0)
    levels = teacher.spec.partition_levels if teacher else 0
    buffers = _HostBuffers(writers + 1, rows, (side, side, dim), dtype,
                           (levels, side, side) if teacher else None, pin=cuda) if chunks else None
    writer_pool = cf.ThreadPoolExecutor(writers)
    # made once: per batch, a copy from the host (or a check of their values) would wait for the device
    stats = device_stats(teacher.stats, dim, device) if teacher else None
    hierarchy = HierarchyGraphs(teacher.spec, stats) if teacher and cuda and hierarchy_graph else None

    def write(done: _Chunk, ready: torch.cuda.Event | None, moments: tuple, nonfinite: torch.Tensor) -> dict:
        try:
            if ready is not None:
                with clock.host("writer_wait_for_device"):
                    ready.synchronize()   # this chunk's copies into the host buffers have landed
            if bool(nonfinite):   # read here, not per batch on the pass's thread: no wait for the device
                raise ValueError(f"chunk {done.chunk}: the encoder's tokens contain NaN or inf")
            write_started = time.perf_counter()
            tokens, regions = done.buffers
            count = len(done.valid)
            info = {"stop": done.stop, "images": int(done.valid.sum()), "rejected": len(done.rejects),
                    "worker": worker, "device": str(device), "cuda": cuda, "encoder_weights": weights_label,
                    "read_from": "files"}
            write_latent_chunk(Path(store), done.chunk, done.start, _host_numpy(tokens[:count], dtype), done.valid,
                               np.asarray(labels[done.start - base:done.stop - base], np.int64),
                               (moments[0], moments[1].numpy(), moments[2].numpy()), dtype, info, done.rejects,
                               encoded=True)
            if teacher is not None:   # after the latents' marker: a chunk with regions always has latents
                zarr_store.write_chunk(teacher.store, done.chunk, done.start, {"regions": regions[:count].numpy()})
            clock.add("store_write", time.perf_counter() - write_started)
        finally:
            buffers.give(done.buffers)   # also after a failed write: the pass must not wait for it forever
        if on_chunk:
            on_chunk(count)
        return {"chunk": done.chunk, **info}

    def finish(done: _Chunk) -> cf.Future:
        count, mean, m2 = done.moments.count, done.moments.mean, done.moments.m2
        host = [torch.zeros(dim, dtype=torch.float64, pin_memory=cuda) for _ in range(2)]
        for target, value in zip(host, (mean, m2)):
            if value is not None:
                target.copy_(value, non_blocking=cuda)
        nonfinite = torch.zeros((), dtype=torch.bool, pin_memory=cuda)
        if done.nonfinite is not None:
            nonfinite.copy_(done.nonfinite, non_blocking=cuda)
        ready = torch.cuda.Event() if cuda else None
        if ready is not None:
            ready.record(torch.cuda.current_stream(device))
        return writer_pool.submit(write, done, ready, (count, *host), nonfinite)

    in_flight: list[cf.Future] = []
    current: _Chunk | None = None
    try:
        batches = prepared_batches(files, [(b0 - base, b1 - base) for _, b0, b1 in spans], preprocess, device,
                                    readers, read_timeout, clock, split)
        for (c, b0, b1), prepared in zip(spans, batches):
            if current is None:
                start, stop = bounds[c]
                with clock.host("wait_for_buffer"):   # every buffer still being written: the disk is behind
                    taken = buffers.take()
                current = _Chunk(c, start, stop, taken, np.zeros(stop - start, bool),
                                 nonfinite=torch.zeros((), dtype=torch.bool, device=device) if teacher else None)
            at = slice(b0 - current.start, b1 - current.start)
            current.valid[at] = prepared.ok
            current.rejects += prepared.rejects
            tokens = _encode_prepared(model, prepared, device, clock, graphs)
            with clock.device("moments_and_store_form"):
                if tokens is None:
                    stored = torch.zeros((b1 - b0, side, side, dim), dtype=_HOST[dtype], device=device)
                else:
                    current.moments.add(tokens)
                    stored = stored_form(tokens, dtype)
                    if not prepared.ok.all():   # rejected slots hold zeros: no image, out of every statistic
                        full = torch.zeros((b1 - b0, *stored.shape[1:]), dtype=stored.dtype, device=device)
                        full[torch.from_numpy(np.flatnonzero(prepared.ok)).to(device)] = stored
                        stored = full
            host_tokens, host_regions = current.buffers
            with clock.device("device_to_host"):
                host_tokens[at].copy_(stored, non_blocking=cuda)
            if teacher is not None:
                with torch.no_grad(), clock.device("hierarchy"):
                    if hierarchy is not None:
                        regions = hierarchy(read_back(stored, dtype), current.nonfinite)
                    else:
                        regions = build_hierarchies_batched(read_back(stored, dtype), teacher.spec, stats=stats,
                                                            nonfinite=current.nonfinite)
                    host_regions[at].copy_(regions, non_blocking=cuda)
            if b1 == current.stop:   # the chunk's last batch: its writes overlap the next chunk's work
                in_flight.append(finish(current))
                current = None
                while in_flight and in_flight[0].done():
                    in_flight[0].result()   # a failed write stops the pass now, not at the end
                    in_flight.pop(0)
        infos = []
        for future in in_flight:
            infos.append(future.result())
        return sorted(infos, key=lambda info: info["chunk"])
    finally:
        writer_pool.shutdown(wait=True, cancel_futures=True)
