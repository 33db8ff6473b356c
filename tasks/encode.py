"""Encode: image source -> latent store (DINOv2 patch tokens as float16 + per-channel mean/std).

Two readers, one store format (storage.latent_store). For the scenes (encoder.read_from
image_store) a chunk is `tasks.chunk_workers.encode_chunk_with` over the pixels ingest stored. For
ImageNet sources (read_from files, the default there) a chunk is `tasks.encode_files`: the files
themselves, decoded on the GPU, cropped, resized and encoded in one pass; the image store only
lends its listing (ids, labels, fingerprint), re-checked against the source before any file is read.

Without `ingest.dask_address` the chunks run here: on this process's device, or for read_from files
on every local GPU (encoder.gpus), each taking every n-th pending chunk. With it, every chunk is a
Dask task annotated `resources={"GPU": 1}`, so it runs only on workers started with
`--resources GPU=1`; each such worker builds the encoder once and keeps it. Only paths, ints, ids
and small dicts cross Dask. Merging the moments into mean/std and marking the store complete
always happen here.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading

from models.channel_stats import mean_std
from models.encoder import ENCODER_OUTPUT, grid_size, resolve_encoder_name, token_dim
from models.encoder import weights_label as planned_weights_label
from storage import zarr_store
from storage.config import TFConfig, encode_reads_files
from storage.imagenet import resize_short_side, sample_files
from storage.keys import Layout
from storage.latent_store import latent_store_arrays  # noqa: F401  (its home before storage.latent_store)
from tasks.chunk_workers import encode_chunk, encode_chunk_with, encode_files_chunk
from tasks.dask_chunks import run_chunks
from tasks.encode_files import Preprocess, encode_file_chunks
from tasks.encoder_load import load_encoder
from tasks.progress import Progress
from tasks.stage import Done, Stage, pick_device, run_stage, stage_task

GPU_RESOURCES = {"GPU": 1}


def plan_encoder(cfg: TFConfig) -> tuple[str, int, int]:
    """(weights label, grid, dim) of the encoder the GPU workers will build, without loading it
    here: the label hashes the weights file; grid and dim come from a weightless meta-device model."""
    import timm
    import torch

    enc = cfg.encoder
    # a file, an HF cache folder or "hf-cache"; raises MissingWeightsError saying how to supply weights
    label = planned_weights_label(enc.model, enc.weights, enc.allow_random_init)
    with torch.device("meta"):
        skeleton = timm.create_model(resolve_encoder_name(enc.model), pretrained=False,
                                     img_size=cfg.source.image_size, num_classes=0)
    return label, grid_size(skeleton), token_dim(skeleton)


@stage_task("encode")
def encode_latents(cfg: TFConfig, root: str, force: bool = False) -> dict:
    layout = Layout(root, cfg)
    stage = Stage("encode", layout.keys.latents, layout.latents(), store_stage="latents",
                  needs=[(layout.images(), "ingest")])
    return run_stage(cfg, stage, force, lambda: _encode(cfg, layout), reused=lambda: {
        "encoder_weights": zarr_store.store_attrs(layout.latents())["encoder_weights"]})


def local_devices(cfg: TFConfig, direct: bool) -> list[str]:
    """The devices this process encodes on: every visible GPU (at most encoder.gpus) for the direct path,
    else the one configured device."""
    import torch

    device = pick_device(cfg.device)
    if not direct or device != "cuda":
        return [device]
    count = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(min(cfg.encoder.gpus or count, count))]


def _encode(cfg: TFConfig, layout: Layout) -> Done:
    images, path = layout.images(), layout.latents()
    direct = encode_reads_files(cfg)
    if direct:   # files are read now: they must still be the ones the listing recorded
        from storage.sources import list_source
        from tasks.ingest import check_listing

        check_listing(images, list_source(cfg.source), cfg.source.path, complete=True)
    address = cfg.ingest.dask_address
    models: dict[str, object] = {}
    if address:
        weights_label, grid, dim = plan_encoder(cfg)
    else:
        for device in local_devices(cfg, direct):
            model, weights_label = load_encoder(cfg.encoder.model, cfg.source.image_size, cfg.encoder.weights,
                                                cfg.encoder.allow_random_init)
            models[device] = model.to(device)
        grid, dim = grid_size(model), token_dim(model)
    num = zarr_store.open_array(images, "label").shape[0]
    chunk_size = zarr_store.store_attrs(images)["chunk_size"]
    bounds = zarr_store.chunk_bounds(num, chunk_size)
    attrs = {"stage": "latents", "key": layout.keys.latents, "images_key": layout.keys.images,
             "encoder": cfg.encoder.model, "encoder_weights": weights_label, "image_size": cfg.source.image_size,
             "encoder_output": ENCODER_OUTPUT, **({"read_from": "files"} if direct else {})}
    zarr_store.create_store(path, latent_store_arrays(num, len(bounds), grid, dim, cfg.encoder.dtype), chunk_size, attrs)
    zarr_store.write_array(path, "sample", zarr_store.open_array(images, "sample")[:])
    pending = zarr_store.pending_chunks(path, len(bounds))
    if address:
        run_chunks(encode_files_chunk if direct else encode_chunk, _dask_chunks(cfg, layout, direct, pending, bounds,
                                                                             weights_label),
                   description="encode", address=address, workers=cfg.ingest.workers, resources=GPU_RESOURCES,
                   worker_loss_timeout=cfg.ingest.worker_loss_timeout)
    else:
        with Progress(num, "encode", unit="img") as bar:
            bar.advance(num - sum(bounds[c][1] - bounds[c][0] for c in pending))
            if direct:
                _encode_files_here(cfg, layout, models, weights_label, pending, bounds, bar)
            else:
                [(device, model)] = models.items()
                for chunk in pending:
                    start, stop = bounds[chunk]
                    encode_chunk_with(model, weights_label, device, str(images), str(path), chunk, start, stop,
                                      cfg.encoder.batch_size, cfg.encoder.dtype)
                    bar.advance(stop - start)
    mean, std = mean_std(*(zarr_store.open_array(path, n)[:] for n in ("chunk_count", "chunk_mean", "chunk_m2")))
    zarr_store.write_array(path, "mean", mean)
    zarr_store.write_array(path, "std", std)
    valid = zarr_store.open_array(path, "valid")[:]
    counts = {"accepted": int(valid.sum()), "rejected": int((~valid).sum())}
    return Done({"samples": num, "encoder_weights": weights_label, "grid": grid, "dim": dim, **counts},
                {"encoder_weights": weights_label, **counts})


def _dask_chunks(cfg: TFConfig, layout: Layout, direct: bool, pending: list[int], bounds, weights_label: str):
    images, path = str(layout.images()), str(layout.latents())
    if not direct:
        return [(cfg.encoder.model_dump(), cfg.source.image_size, cfg.device, images, path, c, *bounds[c],
                 weights_label) for c in pending]
    ids = zarr_store.open_array(layout.images(), "sample")[:].tolist()
    labels = zarr_store.open_array(layout.images(), "label")[:].tolist()
    return [(cfg.encoder.model_dump(), cfg.source.model_dump(), cfg.device, path, c, start, ids[start:stop],
             labels[start:stop], weights_label) for c in pending for start, stop in [bounds[c]]]


def _encode_files_here(cfg: TFConfig, layout: Layout, models: dict, weights_label: str, pending: list[int],
                       bounds, bar: Progress) -> None:
    """The direct path on this machine's devices: one pass per device over every n-th pending chunk."""
    ids = zarr_store.open_array(layout.images(), "sample")[:].tolist()
    labels = zarr_store.open_array(layout.images(), "label")[:]
    files = sample_files(cfg.source, ids)
    preprocess = Preprocess(cfg.source.image_size, resize_short_side(cfg.source), cfg.source.interpolation)
    lock = threading.Lock()

    def advance(rows: int) -> None:
        with lock:
            bar.advance(rows)

    devices = list(models)
    with cf.ThreadPoolExecutor(len(devices)) as pool:
        runs = [pool.submit(encode_file_chunks, models[device], files, labels, layout.latents(),
                            [(c, *bounds[c]) for c in pending[i::len(devices)]], preprocess, device,
                            batch_size=cfg.encoder.batch_size, dtype=cfg.encoder.dtype, weights_label=weights_label,
                            readers=cfg.encoder.readers, read_timeout=cfg.encoder.read_timeout_s,
                            on_chunk=advance)
                for i, device in enumerate(devices)]
        for run in runs:
            run.result()
