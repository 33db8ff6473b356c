"""Per-chunk work that runs on Dask workers (kept free of Prefect so workers import fast).

The configs (pydantic) and the tables (which reach them) are imported inside the entries that
validate a config: the GPU bench calls `hierarchy_chunk` where pydantic is not installed."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from storage import zarr_store

if TYPE_CHECKING:   # models.hierarchy.reference imports torch, scipy and scikit-learn: ingest workers need none
    from models.hierarchy.reference import HierarchySpec


def ingest_chunk(source: dict, store: str, chunk: int, start: int, ids: list[str], labels: list[int]) -> dict:
    from storage.config import SourceConfig
    from storage.sources import read_chunk
    from storage.tables import write_rejects

    cfg = SourceConfig.model_validate(source)
    batch = read_chunk(cfg, ids, np.asarray(labels, np.int64), start)
    values = {"image": batch["image"], "label": batch["label"], "valid": batch["valid"]}
    if "masks" in batch:
        values["masks"] = batch["masks"]
    write_rejects(Path(store), chunk, batch["rejects"])  # before the marker: a done chunk has its rejects
    zarr_store.write_chunk(Path(store), chunk, start, values,
                           {"accepted": int(batch["valid"].sum()), "rejected": len(batch["rejects"])})
    return {"chunk": chunk, "accepted": int(batch["valid"].sum()), "rejected": len(batch["rejects"])}


def hierarchy_chunk(spec: HierarchySpec, backend: str, latents: str, store: str, chunk: int, start: int,
                    stop: int) -> int:
    """Cluster latents[start:stop] into the teacher store. The hierarchy sees the standardised latents
    (the dataset mean/std the encode stage stored beside them), what the generators see (DESIGN §3)."""
    tokens = zarr_store.read_floats(zarr_store.open_array(Path(latents), "tokens"), slice(start, stop))
    stats = tuple(zarr_store.open_array(Path(latents), name)[:] for name in ("mean", "std"))
    if backend == "batched":
        import torch

        from models.hierarchy.batched import build_hierarchies_batched

        device = "cuda" if torch.cuda.is_available() else "cpu"
        regions = build_hierarchies_batched(torch.from_numpy(tokens).to(device), spec, stats=stats).cpu().numpy()
    else:
        from models.hierarchy.reference import build_hierarchies

        regions = build_hierarchies(tokens, spec, stats=stats)
    zarr_store.write_chunk(Path(store), chunk, start, {"regions": regions})
    return chunk


def batched_chunks(spec: HierarchySpec, latents: Path, store: Path, chunks: list[tuple[int, int, int]],
                   on_chunk=None) -> None:
    """The batched hierarchy over `chunks` ((chunk, start, stop)) in this process, on the GPU where there is
    one: the next chunk's latents are read (in their storage form, half the bytes of float32) while this one
    is clustered, and each chunk's regions are written behind it, marker last."""
    import concurrent.futures as cf

    import torch

    from models.hierarchy.batched import build_hierarchies_batched
    from tasks.encode.files import stored_tensor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = zarr_store.is_bfloat16(zarr_store.open_array(Path(latents), "tokens"))
    stats = tuple(zarr_store.open_array(Path(latents), name)[:] for name in ("mean", "std"))

    def read(start: int, stop: int) -> torch.Tensor:   # whole shards as files (zarr_store.read_stored)
        return stored_tensor(zarr_store.read_stored(Path(latents), "tokens", np.arange(start, stop)), bf16)

    def write(chunk: int, start: int, regions: np.ndarray) -> None:
        zarr_store.write_chunk(Path(store), chunk, start, {"regions": regions})
        if on_chunk:
            on_chunk()

    with cf.ThreadPoolExecutor(1) as reader, cf.ThreadPoolExecutor(1) as writer:
        ahead = reader.submit(read, *chunks[0][1:]) if chunks else None
        writes = []
        for i, (chunk, start, _) in enumerate(chunks):
            raw = ahead.result()
            ahead = reader.submit(read, *chunks[i + 1][1:]) if i + 1 < len(chunks) else None
            values = raw.to(device, non_blocking=True).float()
            with torch.no_grad():
                regions = build_hierarchies_batched(values, spec, stats=stats).cpu().numpy()
            writes.append(writer.submit(write, chunk, start, regions))
        for done in writes:
            done.result()


def ground_truth_chunk(images: str, store: str, chunk: int, start: int, stop: int, grid: int) -> int:
    """The oracle teacher for samples start:stop: the image store's ground-truth masks voted down
    to the token grid (models.hierarchy.reference.ground_truth_hierarchies), in the clustered teacher's format."""
    from models.hierarchy.reference import ground_truth_hierarchies

    masks = zarr_store.open_array(Path(images), "masks")[start:stop]
    zarr_store.write_chunk(Path(store), chunk, start, {"regions": ground_truth_hierarchies(masks, grid)})
    return chunk


# --- encode -------------------------------------------------------------------------------
# One encoder per worker process, built on first use and kept: (model, img_size, weights,
# allow_random_init) -> (module on its device, weights label). torch and timm are imported
# lazily so ingest/hierarchy workers never pay for them.
_ENCODERS: dict[tuple, tuple] = {}
_ENCODERS_LOCK = threading.Lock()


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):   # not inside a Dask worker (in-process encode)
        return None


def cached_encoder(model: str, img_size: int, weights: str | None, allow_random_init: bool, device: str):
    from models.encoder import fold_layer_scale
    from tasks.encode.encoder_load import load_encoder

    key = (model, img_size, weights, allow_random_init)
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            encoder, label = load_encoder(model, img_size, weights, allow_random_init)
            _ENCODERS[key] = (fold_layer_scale(encoder).to(device), label)   # models.encoder: same tokens
        return _ENCODERS[key]


def encode_chunk_with(model, weights_label: str, device: str, images: str, store: str, chunk: int,
                      start: int, stop: int, batch_size: int, dtype: str) -> dict:
    """Encode images[start:stop] of the image store into the latent store (storage.latent_store's
    chunk: tokens, labels, valid flags, moments, marker last). The one implementation of "encode one
    stored chunk", called in-process and by `encode_chunk` on Dask workers."""
    import torch

    from models.channel_stats import chunk_moments
    from models.encoder import encode_images
    from storage.latent_store import write_latent_chunk

    images, store = Path(images), Path(store)
    pixels = zarr_store.open_array(images, "image")[start:stop]
    valid = zarr_store.open_array(images, "valid")[start:stop]
    labels = zarr_store.open_array(images, "label")[start:stop]
    cuda = torch.device(device).type == "cuda"
    tokens = encode_images(model, pixels, device=device, batch_size=batch_size,
                           dtype=torch.bfloat16 if cuda else None)
    tokens[~valid] = 0.0   # rejected slots hold no image; keep them out of every statistic
    info = {"stop": stop, "images": int(valid.sum()), "worker": _worker_address(), "device": str(device),
            "cuda": cuda, "encoder_weights": weights_label}
    write_latent_chunk(store, chunk, start, tokens, valid, labels, chunk_moments(tokens[valid]), dtype, info)
    return {"chunk": chunk, **info}


def _planned_encoder(encoder: dict, image_size: int, device: str, expect_weights: str):
    """(config, device, model) of this worker: the encoder built once per worker, checked to be the planned one."""
    from storage.config import EncoderConfig
    from tasks.stage import pick_device

    cfg = EncoderConfig.model_validate(encoder)
    device = pick_device(device)
    model, label = cached_encoder(cfg.model, image_size, cfg.weights, cfg.allow_random_init, device)
    if label != expect_weights:
        raise RuntimeError(f"worker {_worker_address()} loaded encoder weights {label!r} but the latent store "
                           f"was planned with {expect_weights!r}: encoder.weights must name the same file "
                           f"on every GPU worker")
    return cfg, device, model


def encode_chunk(encoder: dict, image_size: int, device: str, images: str, store: str, chunk: int,
                 start: int, stop: int, expect_weights: str) -> dict:
    """Dask entry: build (once per worker) the encoder, check it is the planned one, encode a chunk."""
    cfg, device, model = _planned_encoder(encoder, image_size, device, expect_weights)
    return encode_chunk_with(model, expect_weights, device, images, store, chunk, start, stop, cfg.batch_size,
                             cfg.dtype)


def encode_files_chunk(encoder: dict, source: dict, device: str, store: str, chunk: int, start: int,
                       ids: list[str], labels: list[int], expect_weights: str) -> dict:
    """Dask entry of the direct path: this chunk's files -> latents (tasks.encode.files), on this
    worker's GPU. Only the chunk's ids and labels cross Dask; the files are read here."""
    from storage.config import SourceConfig
    from storage.imagenet import resize_short_side, sample_files
    from tasks.encode.decode import DecodeSplit
    from tasks.encode.files import Preprocess, encode_file_chunks

    src = SourceConfig.model_validate(source)
    cfg, device, model = _planned_encoder(encoder, src.image_size, device, expect_weights)
    stop = start + len(ids)
    [info] = encode_file_chunks(model, sample_files(src, ids, start), np.asarray(labels, np.int64), store,
                                [(chunk, start, stop)], Preprocess(src.image_size, resize_short_side(src),
                                                                   src.interpolation),
                                device, batch_size=cfg.batch_size, dtype=cfg.dtype, weights_label=expect_weights,
                                base=start, readers=cfg.readers, read_timeout=cfg.read_timeout_s,
                                worker=_worker_address(),
                                split=DecodeSplit.for_encoder(cfg))
    return info


def stats_chunk(encoder: dict, source: dict, device: str, ids: list[str], expect_weights: str) -> tuple:
    """Dask entry: (count, mean, M2) of the encoder's tokens over the files of `ids` (encoder.stats_images),
    on this worker's GPU. tasks.encode.stage fixes the latent store's mean/std from it before the pass."""
    from storage.config import SourceConfig
    from storage.imagenet import resize_short_side, sample_files
    from tasks.encode.decode import DecodeSplit
    from tasks.encode.files import Preprocess, sample_moments

    src = SourceConfig.model_validate(source)
    cfg, device, model = _planned_encoder(encoder, src.image_size, device, expect_weights)
    count, mean, m2 = sample_moments(model, sample_files(src, ids), Preprocess(src.image_size, resize_short_side(src),
                                                                           src.interpolation),
                                     device, batch_size=cfg.batch_size, readers=cfg.readers,
                                     read_timeout=cfg.read_timeout_s,
                                     split=DecodeSplit.for_encoder(cfg))
    return count, mean.tolist(), m2.tolist()
