"""The encoder's pixels for the stages beside the encode pass: the image store's sample (ingest) and the real
images of the evaluation, decoded from their files exactly as the encode pass decodes them (tasks.encode.files:
the same reading and preparing pipeline, nvjpeg on CUDA). No Prefect, Dask or pydantic here.
"""
from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from storage import zarr_store
from storage.imagenet import SampleFiles
from tasks.encode.decode import DecodeSplit, to_uint8, uint8_pixels
from tasks.encode.files import Prepared, Preprocess, collect, prepare_batch, prepared_batches, read_parts
from tasks.encode.phase_clock import PhaseClock


def decode_pixels(files: SampleFiles, start: int, stop: int, preprocess: Preprocess, readers: int = 4,
                  stage: str = "ingest", read_timeout: float | None = None,
                  device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(uint8 [n, S, S, 3], valid, reject rows) of slots start..stop: the pixels the encoder sees from these
    files, for the image store's sample subset (dashboards, the decoder) and the evaluation's real side.
    Decoded and resized on `device` (on CUDA nvjpeg, as the encode pass does), delivered on the host."""
    pixels = np.zeros((stop - start, preprocess.size, preprocess.size, 3), np.uint8)
    pool = cf.ThreadPoolExecutor(readers)
    try:
        datas = collect(read_parts(files, start, stop, pool, readers), read_timeout)
        batch = prepare_batch(datas, files, start, preprocess, torch.device(device), pool, stage)
    finally:   # not waiting: a reader hung past the timeout would hold this call forever
        pool.shutdown(wait=False, cancel_futures=True)
    if batch.images01 is not None:
        pixels[batch.ok] = to_uint8(batch.images01)
    return pixels, batch.ok, batch.rejects


def real_pixel_batches(source, images_store: str | Path, parts: list[np.ndarray], device: str | torch.device = "cpu",
                       readers: int = 4, split: DecodeSplit | None = None) -> Iterator[np.ndarray | torch.Tensor]:
    """uint8 [n, S, S, 3] of the valid samples of each part (store indices), in order: the image store's rows
    where it holds them (every scene; the first ingest.sample_pixels of a direct-path source), else decoded
    from their files exactly as the encoder saw them, through the encode pass's own pipeline (readers ahead,
    the preparing thread's nvjpeg on a side stream). What the real side of the evaluation reads. On CUDA a part
    with decoded rows comes as a CUDA tensor, never copied to the host and back; otherwise a numpy array.
    `split`: how the encode pass decodes (DecodeSplit.for_encoder: the GPU decoder, decode_ahead), else the
    defaults."""
    from storage.imagenet import resize_short_side, sample_files

    image = zarr_store.open_array(Path(images_store), "image")
    held_rows = image.shape[0]
    parts = [np.asarray(part, np.int64) for part in parts]
    missing = [part[part >= held_rows] for part in parts]
    device = torch.device(device)
    decoded: Iterator[Prepared] = iter(())
    if any(len(m) for m in missing):
        if source.kind == "scenes":
            raise ValueError(f"image store {images_store} holds {held_rows} images, samples up to "
                             f"{int(max(m.max() for m in missing if len(m)))} were asked for")
        ids = zarr_store.open_array(Path(images_store), "sample")
        files = sample_files(source, [str(i) for i in np.asarray(ids.oindex[np.concatenate(missing)])])
        bounds = np.cumsum([0, *(len(m) for m in missing)])
        spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        preprocess = Preprocess(source.image_size, resize_short_side(source), source.interpolation)
        decoded = prepared_batches(files, spans, preprocess, device, readers, None, PhaseClock(False), split)
    for part, absent in zip(parts, missing):
        held = part < held_rows
        stored = np.asarray(image.oindex[part[held]]) if held.any() else None
        if not len(absent):
            yield stored
            continue
        prepared = next(decoded)
        if not prepared.ok.all():   # valid at encode time, unreadable now: the real set would silently shrink
            raise RuntimeError(f"real images changed since encode: {prepared.rejects[0]['path']}: "
                               f"{prepared.rejects[0]['reason']}")
        pixels = uint8_pixels(prepared.images())
        if stored is not None:   # held and decoded rows of one part, back in the part's order
            out = torch.empty((len(part), *pixels.shape[1:]), dtype=torch.uint8, device=device)
            out[torch.from_numpy(np.flatnonzero(held)).to(device)] = torch.from_numpy(stored).to(device)
            out[torch.from_numpy(np.flatnonzero(~held)).to(device)] = pixels
            pixels = out
        yield pixels if device.type == "cuda" else pixels.numpy()
