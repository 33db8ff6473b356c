"""After the encode pass: a sample of what the latent store holds, encoded again the plain way and compared.

The pass is built for speed: batches decoded ahead on side streams or on the encoder's own stream, the GPU
JPEG decoders sharing batches with CPU threads, the encoder replayed as a CUDA graph, chunks written by other
threads. A mistake in that ordering gives finite, plausible, wrong latents (an H200 run once encoded pixels
that queued work had overwritten: docs/gpu.md), and nothing downstream would notice. So before the store is
marked complete, `encoder.verify_images` stored rows spread over it are encoded again one batch at a time,
in eager mode, from their files (or the image store) decoded by the configured GPU decoder alone, and each
must match what the pass stored within VERIFY_TOLERANCE.

The tolerance: storing in bfloat16 moves a token grid by 0.2 % (relative L2), bfloat16 autocast against float32
by 0.3 %, pixels off by two levels by 2 % (random-init ViT-B, the most sensitive encoder here), another image
by about 140 %. JPEG decoders differ from each other by 1-5 levels, so the check sits well above what
the decoders and storage explain and well below another picture. No Prefect or Dask here.
"""
from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import numpy as np
import torch

from storage import zarr_store
from tasks.encode.files import Preprocess, collect, prepare_batch, read_parts

VERIFY_TOLERANCE = 0.25   # relative L2 error of one image's token grid (see above)


def relative_errors(stored: np.ndarray, recomputed: np.ndarray) -> np.ndarray:
    """Per image ||stored - recomputed|| / ||recomputed|| over its whole token grid (float64)."""
    diff = (stored.astype(np.float64) - recomputed.astype(np.float64)).reshape(len(stored), -1)
    scale = np.linalg.norm(recomputed.astype(np.float64).reshape(len(recomputed), -1), axis=1)
    return np.linalg.norm(diff, axis=1) / np.maximum(scale, 1e-12)


def encode_files_plainly(model, files, preprocess: Preprocess, device: str, batch_size: int,
                         gpu_decoder: str = "torchvision", readers: int = 4) -> np.ndarray:
    """float32 [n, g, g, C] tokens of every file of `files`, decoded and encoded one batch at a time with
    nothing ahead and no CUDA graph; a file that no longer decodes is an error (it was valid in the pass)."""
    tokens, ok, rejects = plain_tokens(model, files, preprocess, device, batch_size, gpu_decoder, readers)
    if not ok.all():
        raise no_longer_decodes(rejects[0])
    return tokens


def no_longer_decodes(reject: dict) -> RuntimeError:
    """The error for a file the pass decoded and the plain way cannot (changed since, or a decoder is wrong)."""
    return RuntimeError(f"{reject['path']} decoded in the encode pass but not now: {reject['reason']}")


def plain_tokens(model, files, preprocess: Preprocess, device: str, batch_size: int,
                 gpu_decoder: str = "torchvision", readers: int = 4) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(float32 tokens of the files that decode, bool [n] which did, their reject rows): the plain way, as
    encode_files_plainly, for a sample taken before the pass knows which files it rejects."""
    from models.encoder import encode_tensor
    from tasks.encode.decode import DecodeSplit

    device = torch.device(device)
    split = DecodeSplit(0.0, gpu_decoder=gpu_decoder, ahead=0) if device.type == "cuda" else None
    out, ok, rejects = [], [], []
    with cf.ThreadPoolExecutor(readers) as pool:
        for start in range(0, len(files), batch_size):
            stop = min(start + batch_size, len(files))
            prepared = prepare_batch(collect(read_parts(files, start, stop, pool, readers), None), files, start,
                                     preprocess, device, pool, "verify", split=split)
            ok.append(prepared.ok)
            rejects += prepared.rejects
            if prepared.images01 is None:
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                tokens = encode_tensor(model, prepared.images01)
            out.append(tokens.float().cpu().numpy())
    ok_all = np.concatenate(ok) if ok else np.zeros(0, bool)
    return (np.concatenate(out) if out else np.zeros((0,), np.float32)), ok_all, rejects   # no processes to close


def check_sample(store: Path, rows: np.ndarray, recomputed: np.ndarray, ids: np.ndarray) -> dict:
    """Compare `recomputed` tokens with the store's `rows`; raise naming the rows that differ."""
    stored = zarr_store.decode_floats(zarr_store.read_stored(store, "tokens", rows),
                                      zarr_store.open_array(store, "tokens").attrs.asdict())
    errors = relative_errors(stored, recomputed.reshape(stored.shape))
    bad = np.flatnonzero(~(errors <= VERIFY_TOLERANCE))   # NaN counts as different
    if len(bad):
        named = ", ".join(f"{ids[i]} ({errors[i]:.3g})" for i in bad[:5])
        raise RuntimeError(f"latent store {store}: {len(bad)} of {len(rows)} images encoded again differ from "
                           f"what the encode pass stored (relative error above {VERIFY_TOLERANCE}): {named}. "
                           f"The pass wrote wrong latents; the store is not marked complete. Run the stage "
                           f"again with --force encode")
    return {"status": "passed", "images": int(len(rows)), "max_relative_error": round(float(errors.max()), 5),
            "tolerance": VERIFY_TOLERANCE}   # the stage calls it with at least one valid row
