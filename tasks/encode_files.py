"""The direct encode path: image files -> latent store chunks, one pass per device.

    reader threads (file bytes, a few batches ahead)
      -> a preparing thread (decode: nvjpeg on CUDA, CPU decoders for the rest; crop + resize;
         on CUDA on a side stream, so it overlaps the encoder's batch before)
      -> the encoder on this thread (models.encoder, bf16 autocast on CUDA)
      -> writer threads (moments, float storage, reject rows, tokens, the chunk marker last)

`encode_file_chunks` is what `tf encode` runs for ImageNet sources (tasks/encode.py, in-process
per GPU or one Dask task per chunk) and what bench/dataplane.py times. It writes the chunks it is
given through storage.latent_store.write_latent_chunk, so a store it makes is the store the
image-store path makes; a file nothing decodes is a reject row and a slot with valid False.
No Prefect, Dask or pydantic here.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.channel_stats import chunk_moments
from models.encoder import encode_tensor, grid_size, token_dim
from storage.imagenet import SampleFiles
from storage.latent_store import write_latent_chunk
from storage.sources import reject_reason
from tasks.file_decode import crop_resize, decode_images, to_uint8

READ_AHEAD = 3   # batches whose bytes are being read while one is prepared and one encoded


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
    ready: torch.cuda.Event | None = None


def read_parts(files: SampleFiles, start: int, stop: int, pool: cf.Executor, parts: int) -> list[tuple[cf.Future, int]]:
    """(future of files.read, file count) over slices of start..stop, so reader threads share a batch: one
    file each in a folder (a hung file costs only itself), `parts` slices of a tar (one forward pass each)."""
    step = max(1, -(-(stop - start) // parts)) if files.archive else 1
    return [(pool.submit(files.read, s, min(s + step, stop)), min(s + step, stop) - s) for s in range(start, stop, step)]


def collect(parts: list[tuple[cf.Future, int]], timeout: float | None) -> list[bytes | Exception]:
    """The bytes (or read errors) of read_parts' slices, in order. A slice still unread `timeout` seconds
    after collecting began (a hung network file system) becomes one error per file: reject rows, and the
    run goes on. Its thread cannot be interrupted and stays behind, holding one reader."""
    deadline = None if timeout is None else time.monotonic() + timeout
    out: list[bytes | Exception] = []
    for future, count in parts:
        try:
            out += future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except cf.TimeoutError:
            out += [TimeoutError(f"not read within encoder.read_timeout_s = {timeout:g} s")] * count
    return out


def prepare_batch(datas: list, files: SampleFiles, first_slot: int, preprocess: Preprocess, device: torch.device,
                  pool: cf.Executor, stage: str) -> Prepared:
    """File bytes (or read errors) of slots first_slot.. -> the encoder's input and reject rows."""
    decoded = decode_images(datas, device, cpu_map=pool.map)
    ok = np.array([not isinstance(d, Exception) for d in decoded], bool)
    rejects = [{"stage": stage, "path": files.where(first_slot + i), "reason": reject_reason(d)}
               for i, d in enumerate(decoded) if isinstance(d, Exception)]
    good = [d for d in decoded if not isinstance(d, Exception)]
    images01 = crop_resize(good, preprocess.size, preprocess.resize_short, preprocess.interpolation) if good else None
    return Prepared(images01, ok, rejects)


def decode_pixels(files: SampleFiles, start: int, stop: int, preprocess: Preprocess, readers: int = 4,
                  stage: str = "ingest", read_timeout: float | None = None) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(uint8 [n, S, S, 3], valid, reject rows) of slots start..stop on the CPU: the pixels the encoder
    sees from these files, for the image store's sample subset (dashboards, the decoder)."""
    pixels = np.zeros((stop - start, preprocess.size, preprocess.size, 3), np.uint8)
    pool = cf.ThreadPoolExecutor(readers)
    try:
        datas = collect(read_parts(files, start, stop, pool, readers), read_timeout)
        batch = prepare_batch(datas, files, start, preprocess, torch.device("cpu"), pool, stage)
    finally:   # not waiting: a reader hung past the timeout would hold this call forever
        pool.shutdown(wait=False, cancel_futures=True)
    if batch.images01 is not None:
        pixels[batch.ok] = to_uint8(batch.images01)
    return pixels, batch.ok, batch.rejects


def encode_batch(model, images01: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] in [0, 1] -> float32 [B, g, g, C], as models.encoder.encode_images encodes (bf16 on CUDA)."""
    cuda = images01.device.type == "cuda"
    with torch.autocast(images01.device.type, dtype=torch.bfloat16, enabled=cuda):
        tokens = encode_tensor(model, images01)
    side = grid_size(model)
    return tokens.float().reshape(len(tokens), side, side, token_dim(model))


@dataclass
class _Chunk:
    chunk: int
    start: int
    tokens: np.ndarray
    valid: np.ndarray
    rejects: list[dict] = field(default_factory=list)


def encode_file_chunks(model, files: SampleFiles, labels: np.ndarray, store: str | Path,
                       chunks: list[tuple[int, int, int]], preprocess: Preprocess, device: str | torch.device, *,
                       batch_size: int, dtype: str, weights_label: str, base: int = 0, readers: int = 8,
                       writers: int = 2, worker: str | None = None, read_timeout: float | None = None,
                       on_chunk: Callable[[int], None] | None = None) -> list[dict]:
    """Encode the samples of `chunks` ((chunk, start, stop), disjoint) into the latent store's template.

    `files` and `labels` hold slots base.. (a Dask task passes only its chunk's files); the model is on
    `device`. Returns each written chunk's marker info; `on_chunk(rows)` after each chunk is on disk."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    side, dim = grid_size(model), token_dim(model)
    batches = [(c, b, min(b + batch_size, stop)) for c, start, stop in chunks for b in range(start, stop, batch_size)]
    bounds = {c: (start, stop) for c, start, stop in chunks}
    reader_pool, preparer, writer_pool = (cf.ThreadPoolExecutor(readers), cf.ThreadPoolExecutor(1),
                                          cf.ThreadPoolExecutor(writers))
    side_stream = torch.cuda.Stream(device) if cuda else None
    reading: dict[int, list[tuple[cf.Future, int]]] = {}

    def read(i: int) -> None:
        if i < len(batches) and i not in reading:
            _, b0, b1 = batches[i]
            reading[i] = read_parts(files, b0 - base, b1 - base, reader_pool, readers)

    def prepare(i: int) -> Prepared:
        _, b0, _ = batches[i]
        datas = collect(reading.pop(i), read_timeout)
        with torch.cuda.stream(side_stream) if cuda else contextlib.nullcontext():
            prepared = prepare_batch(datas, files, b0 - base, preprocess, device, reader_pool, "encode")
            if cuda:
                prepared.ready = torch.cuda.Event()
                prepared.ready.record(side_stream)
        return prepared

    def write(open_chunk: _Chunk) -> dict:
        start = open_chunk.start
        stop = start + len(open_chunk.valid)
        tokens, valid = open_chunk.tokens, open_chunk.valid
        tokens[~valid] = 0.0   # rejected slots hold no image; keep them out of every statistic
        info = {"stop": stop, "images": int(valid.sum()), "rejected": len(open_chunk.rejects), "worker": worker,
                "device": str(device), "cuda": cuda, "encoder_weights": weights_label, "read_from": "files"}
        write_latent_chunk(Path(store), open_chunk.chunk, start, tokens, valid,
                           np.asarray(labels[start - base:stop - base], np.int64), chunk_moments(tokens[valid]),
                           dtype, info, open_chunk.rejects)
        if on_chunk:
            on_chunk(stop - start)
        return {"chunk": open_chunk.chunk, **info}

    in_flight: list[cf.Future] = []
    infos: list[dict] = []
    current: _Chunk | None = None
    try:
        for i in range(READ_AHEAD):
            read(i)
        next_batch = preparer.submit(prepare, 0) if batches else None
        for i, (c, b0, b1) in enumerate(batches):
            prepared = next_batch.result()
            read(i + READ_AHEAD)
            next_batch = preparer.submit(prepare, i + 1) if i + 1 < len(batches) else None
            if current is None or current.chunk != c:
                start, stop = bounds[c]
                current = _Chunk(c, start, np.zeros((stop - start, side, side, dim), np.float32),
                                 np.zeros(stop - start, bool))
            rows = slice(b0 - current.start, b1 - current.start)
            current.valid[rows] = prepared.ok
            current.rejects += prepared.rejects
            if prepared.images01 is not None:
                if cuda:
                    torch.cuda.current_stream(device).wait_event(prepared.ready)
                    prepared.images01.record_stream(torch.cuda.current_stream(device))
                with torch.no_grad():
                    current.tokens[rows][prepared.ok] = encode_batch(model, prepared.images01).cpu().numpy()
            if b1 == bounds[c][1]:   # the chunk's last batch: its write overlaps the next chunk's work
                while len(in_flight) >= writers:   # bounded host memory: at most `writers` chunks waiting
                    infos.append(in_flight.pop(0).result())
                in_flight.append(writer_pool.submit(write, current))
                current = None
        return infos + [f.result() for f in in_flight]
    finally:
        for pool in (preparer, writer_pool):
            pool.shutdown(wait=True, cancel_futures=True)
        reader_pool.shutdown(wait=False, cancel_futures=True)   # a reader hung past the timeout stays behind


def real_pixels(source, images_store: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 [n, S, S, 3] of any valid samples by store index: the image store's rows where it holds
    them (every scene; the first ingest.sample_pixels of a direct-path source), else decoded from their
    files exactly as the encoder saw them. What the real side of the evaluation reads."""
    from storage import zarr_store
    from storage.imagenet import resize_short_side, sample_files

    image = zarr_store.open_array(Path(images_store), "image")
    stored = image.shape[0]
    ids = zarr_store.open_array(Path(images_store), "sample")
    preprocess = None if source.kind == "scenes" else Preprocess(source.image_size, resize_short_side(source),
                                                                 source.interpolation)

    def read(index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, np.int64)
        out = np.zeros((len(index), *image.shape[1:]), np.uint8)
        held = index < stored
        if held.any():
            out[held] = np.asarray(image.oindex[index[held]])
        if not held.all():
            if preprocess is None:
                raise ValueError(f"image store {images_store} holds {stored} images, samples up to "
                                 f"{int(index.max())} were asked for")
            missing = index[~held]
            files = sample_files(source, [str(i) for i in np.asarray(ids.oindex[missing])])
            pixels, ok, rejects = decode_pixels(files, 0, len(missing), preprocess, stage="evaluate")
            if not ok.all():   # valid at encode time, unreadable now: the real set would silently shrink
                raise RuntimeError(f"real images changed since encode: {rejects[0]['path']}: {rejects[0]['reason']}")
            out[~held] = pixels
        return out

    return read
