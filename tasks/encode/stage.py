"""Encode: image source -> latent store (DINOv2 patch tokens as float16 + per-channel mean/std).

Two readers, one store format (storage.latent_store). For the scenes (encoder.read_from
image_store) a chunk is `tasks.chunk_workers.encode_chunk_with` over the pixels ingest stored. For
ImageNet sources (read_from files, the default there) a chunk is `tasks.encode.files`: the files
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
import contextlib
import threading
import time
import warnings

import numpy as np
import torch

from models.channel_stats import mean_std
from models.encoder import ENCODER_OUTPUT, fold_layer_scale, grid_size, resolve_encoder_name, token_dim
from models.encoder import weights_label as planned_weights_label
from storage import latent_store, zarr_store
from storage.config import TFConfig, encode_reads_files
from storage.imagenet import resize_short_side, sample_files
from storage.keys import Layout
from storage.latent_store import latent_store_arrays  # noqa: F401  (its home before storage.latent_store)
from tasks.chunk_workers import encode_chunk, encode_chunk_with, encode_files_chunk, stats_chunk
from tasks.dask_chunks import run_chunks
from tasks.encode.files import Preprocess, Teacher, encode_file_chunks, gil_switch_interval, sample_moments
from tasks.encode.encoder_load import load_encoder
from tasks.hierarchy.stage import teacher_marker, teacher_stage, teacher_template
from tasks.encode.cuda_graph import CAPTURE_LOCK, EncoderGraphs
from tasks.encode.decode import DecodeSplit
from tasks.encode.phase_clock import Laps, PhaseClock
from tasks.plan import hierarchy_spec
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
def encode_latents(cfg: TFConfig, root: str, force: bool = False, with_teacher: bool = False) -> dict:
    """`with_teacher` (the run goes on to the hierarchy stage): where the hierarchy can run in the same pass
    (fusable), the teacher store is filled beside the latents, and the hierarchy stage then reuses it."""
    layout = Layout(root, cfg)
    stage = Stage("encode", layout.keys.latents, layout.latents(), store_stage="latents",
                  needs=[(layout.images(), "ingest")])
    def encode() -> Done:
        with gil_switch_interval(cfg.encoder.gil_switch_ms):
            return _encode(cfg, layout, with_teacher)

    return run_stage(cfg, stage, force, encode, reused=lambda: {
        "encoder_weights": zarr_store.store_attrs(layout.latents())["encoder_weights"]})


def fusable(cfg: TFConfig) -> bool:
    """Whether the hierarchy can run inside the encode pass: the direct path in this process, the batched
    backend on clustered latents, and channel statistics fixed before the pass (encoder.stats_images)."""
    return (encode_reads_files(cfg) and not cfg.ingest.dask_address and cfg.encoder.stats_images > 0
            and cfg.hierarchy.source == "clustered" and cfg.hierarchy.backend == "batched")


def local_devices(cfg: TFConfig, direct: bool) -> list[str]:
    """The devices this process encodes on: every visible GPU (at most encoder.gpus) for the direct path,
    else the one configured device."""
    import torch

    device = pick_device(cfg.device)
    if not direct or device != "cuda":
        return [device]
    count = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(min(cfg.encoder.gpus or count, count))]


def _encode(cfg: TFConfig, layout: Layout, with_teacher: bool = False) -> Done:
    images, path = layout.images(), layout.latents()
    direct = encode_reads_files(cfg)
    laps = Laps()
    # files are read now: they must still be the ones the listing recorded. The source is listed again in a
    # thread while the encoder loads (both take about a second on ImageNet-sized sources); no file is read
    # before the check has passed
    checked = _check_source_beside(cfg, images) if direct else None
    address = cfg.ingest.dask_address
    devices = [] if address else local_devices(cfg, direct)
    # the CPU decode processes start before the encoder loads: their imports overlap it
    splits = {device: DecodeSplit.for_encoder(cfg.encoder, processes=cfg.encoder.cpu_decode_processes)
              for device in devices if device.startswith("cuda")}
    models: dict[str, object] = {}
    if address:
        weights_label, grid, dim = plan_encoder(cfg)
    else:
        for device in devices:
            model, weights_label = load_encoder(cfg.encoder.model, cfg.source.image_size, cfg.encoder.weights,
                                                cfg.encoder.allow_random_init)
            models[device] = fold_layer_scale(model).to(device)   # same tokens, less memory traffic
        grid, dim = grid_size(model), token_dim(model)
    laps.lap("load_encoder")
    if checked is not None:
        checked.result()
        laps.lap("check_source")   # what the check took beyond the load
    graphs = {device: EncoderGraphs(model) for device, model in models.items()
              if device.startswith("cuda") and cfg.encoder.cuda_graph}
    num = zarr_store.open_array(images, "label").shape[0]
    chunk_size = zarr_store.store_attrs(images)["chunk_size"]
    bounds = zarr_store.chunk_bounds(num, chunk_size)
    attrs = {"stage": "latents", "key": layout.keys.latents, "images_key": layout.keys.images,
             "encoder": cfg.encoder.model, "encoder_weights": weights_label, "image_size": cfg.source.image_size,
             "encoder_output": ENCODER_OUTPUT, **({"read_from": "files"} if direct else {}),
             **({"channel_stats": sampled_stats_label(cfg.encoder.stats_images)} if cfg.encoder.stats_images else {})}
    zarr_store.create_store(path, latent_store_arrays(num, len(bounds), grid, dim, cfg.encoder.dtype), chunk_size, attrs)
    zarr_store.write_array(path, "sample", zarr_store.open_array(images, "sample")[:])
    pending = zarr_store.pending_chunks(path, len(bounds))
    laps.lap("latent_template")
    fuse = with_teacher and fusable(cfg)
    if fuse and pending:   # the full batch's encoder graph first: a capture fails beside the warm-up below
        for device, encoder_graphs in graphs.items():
            encoder_graphs.capture(cfg.encoder.batch_size, cfg.source.image_size, device)
        laps.lap("capture_encoder_graph")
    # the hierarchy's Triton kernels compile while the statistics pass runs, not at the pass's first batch
    warm = _warm_hierarchy(cfg, next(iter(models), None), grid, dim) if fuse and pending else None
    stats_clock = PhaseClock(any(device.startswith("cuda") for device in models))
    stats = _sampled_stats(cfg, layout, models, weights_label, splits, graphs, stats_clock) \
        if cfg.encoder.stats_images else None
    laps.lap("stats_pass")
    extra: dict = {"stats_pass_s": laps.seconds["stats_pass"], "stats_phases_s": stats_clock.summary()} \
        if stats is not None else {}
    if warm is not None:
        warm.result()
        laps.lap("wait_for_kernel_compile")
    plain = _plain_sample_beside(cfg, layout, models, num) if pending else None
    teacher = _fused_teacher(cfg, layout, stats) if fuse else contextlib.nullcontext()
    with teacher as fused:
        laps.lap("teacher_template")
        if fused is not None:   # a chunk is to do while either of its two markers is missing
            pending = sorted(set(pending) | set(zarr_store.pending_chunks(fused.store, len(bounds))))
        if address:
            run_chunks(encode_files_chunk if direct else encode_chunk, _dask_chunks(cfg, layout, direct, pending,
                                                                                 bounds, weights_label),
                       description="encode", address=address, workers=cfg.ingest.workers, resources=GPU_RESOURCES,
                       worker_loss_timeout=cfg.ingest.worker_loss_timeout)
        else:
            with Progress(num, "encode" + (" + hierarchy" if fused else ""), unit="img") as bar:
                bar.advance(num - sum(bounds[c][1] - bounds[c][0] for c in pending))
                if direct:
                    extra["phases_s"] = _encode_files_here(cfg, layout, models, weights_label, pending, bounds, bar,
                                                           fused, splits, graphs)
                else:
                    [(device, model)] = models.items()
                    for chunk in pending:
                        start, stop = bounds[chunk]
                        encode_chunk_with(model, weights_label, device, str(images), str(path), chunk, start, stop,
                                          cfg.encoder.batch_size, cfg.encoder.dtype)
                        bar.advance(stop - start)
        extra["verified"] = _verify_sample(cfg, layout, models, plain)   # before any store is marked complete
        if fused is not None:
            zarr_store.mark_complete(fused.store, teacher_marker(cfg, num))
            extra["teacher"] = str(fused.store)
    laps.lap("pass")
    for split in splits.values():
        split.close()
    if splits:
        extra["decoded_by"] = {device: split.summary() for device, split in splits.items()}
    full = mean_std(*(zarr_store.open_array(path, n)[:] for n in ("chunk_count", "chunk_mean", "chunk_m2")))
    if stats is None:
        zarr_store.write_array(path, "mean", full[0])
        zarr_store.write_array(path, "std", full[1])
    else:   # the sample's statistics stay the store's; how far the whole set's are from them is on record
        extra["channel_stats"] = stats_deviation(stats, full)
    valid = zarr_store.open_array(path, "valid")[:]
    counts = {"accepted": int(valid.sum()), "rejected": int((~valid).sum())}
    laps.lap("statistics_and_count")
    extra["wall_s"] = laps.seconds
    return Done({"samples": num, "encoder_weights": weights_label, "grid": grid, "dim": dim, **counts, **extra},
                {"encoder_weights": weights_label, "images": num, **counts, **extra})


def _check_source_beside(cfg: TFConfig, images) -> cf.Future:
    """tasks.ingest.stage.check_listing of the source listed anew, in a thread: its result() raises what
    the check found."""
    from storage.sources import list_source
    from tasks.ingest.stage import check_listing

    pool = cf.ThreadPoolExecutor(1, thread_name_prefix="check-source")
    try:
        return pool.submit(lambda: check_listing(images, list_source(cfg.source), cfg.source.path, complete=True))
    finally:
        pool.shutdown(wait=False)


def sampled_stats_label(images: int) -> str:
    return f"mean/std of {images} images spread evenly over the source, fixed before the pass"


def stats_deviation(sampled: tuple[np.ndarray, np.ndarray], full: tuple[np.ndarray, np.ndarray]) -> dict:
    """How the sample's channel statistics differ from the whole set's, in units of the whole set's std."""
    mean_shift = np.abs(sampled[0] - full[0]) / full[1]
    std_ratio = sampled[1] / full[1]
    return {"max_mean_shift_in_std": round(float(mean_shift.max()), 5),
            "std_ratio_range": [round(float(std_ratio.min()), 5), round(float(std_ratio.max()), 5)]}


def sample_rows(num: int, images: int) -> np.ndarray:
    """`images` rows spread evenly over 0..num-1 (every row when images >= num): every class folder of a
    sorted listing is in the sample, not only the first ones."""
    if images >= num:
        return np.arange(num)
    return np.unique(np.linspace(0, num - 1, images).round().astype(np.int64))


def _sampled_stats(cfg: TFConfig, layout: Layout, models: dict, weights_label: str,
                   splits: dict | None = None, graphs: dict | None = None,
                   clock: PhaseClock | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The channel statistics of encoder.stats_images images spread over the source, computed once (before the
    pass, so a fused hierarchy can standardise with them) and kept in the store: a resumed run reuses them."""
    path = layout.latents()
    kept = latent_store.sampled_stats(path)
    if kept is not None:
        return kept
    ids = zarr_store.open_array(layout.images(), "sample")[:]
    rows = sample_rows(len(ids), cfg.encoder.stats_images)
    sampled = [str(ids[r]) for r in rows]
    if cfg.ingest.dask_address:
        [moments] = run_chunks(stats_chunk, [(cfg.encoder.model_dump(), cfg.source.model_dump(), cfg.device,
                                              sampled, weights_label)],
                               description="channel statistics", address=cfg.ingest.dask_address,
                               workers=cfg.ingest.workers, resources=GPU_RESOURCES,
                               worker_loss_timeout=cfg.ingest.worker_loss_timeout)
    else:
        device, model = next(iter(models.items()))
        preprocess = Preprocess(cfg.source.image_size, resize_short_side(cfg.source), cfg.source.interpolation)
        with Progress(len(rows), "channel statistics", unit="img") as bar:
            moments = sample_moments(model, sample_files(cfg.source, sampled), preprocess, device,
                                     batch_size=cfg.encoder.batch_size,
                                     readers=cfg.encoder.readers, read_timeout=cfg.encoder.read_timeout_s,
                                     split=(splits or {}).get(device), graphs=(graphs or {}).get(device),
                                     clock=clock)
            bar.advance(len(rows))
    count, mean, m2 = moments
    stats = mean_std(np.array([count]), np.asarray(mean)[None], np.asarray(m2)[None])
    latent_store.write_sampled_stats(path, *stats, {"images": len(rows), "tokens": int(count)})
    return stats


def _plain_sample_beside(cfg: TFConfig, layout: Layout, models: dict, num: int) -> cf.Future | None:
    """For the direct path on this process's device: encoder.verify_images rows spread over the source,
    encoded the plain way (tasks.encode.verify) in a thread while the pass runs, so that the check after
    the pass only reads and compares (on an H100 the plain encoding took 0.25-0.39 s of a 50,000-image
    stage's 0.4-0.6 s check; the rest was the read, now zarr_store.read_stored's). Its own stream,
    and CAPTURE_LOCK: no graph capture runs beside it. Rows the pass rejects are left out afterwards."""
    if not cfg.encoder.verify_images or not models or not encode_reads_files(cfg):
        return None
    from tasks.encode.verify import plain_tokens

    rows = sample_rows(num, cfg.encoder.verify_images)
    ids = zarr_store.sample_ids(layout.images(), rows)
    files = sample_files(cfg.source, [str(i) for i in ids])
    preprocess = Preprocess(cfg.source.image_size, resize_short_side(cfg.source), cfg.source.interpolation)
    device, model = next(iter(models.items()))

    def run() -> dict:
        began = time.perf_counter()
        cuda = device.startswith("cuda")
        with (CAPTURE_LOCK if cuda else contextlib.nullcontext()), torch.no_grad(), \
                (torch.cuda.stream(torch.cuda.Stream(device)) if cuda else contextlib.nullcontext()):
            tokens, ok, rejects = plain_tokens(model, files, preprocess, device, cfg.encoder.batch_size,
                                               cfg.encoder.gpu_decoder)
        return {"rows": rows, "ids": ids, "tokens": tokens, "ok": ok, "rejects": rejects,
                "seconds": round(time.perf_counter() - began, 3)}

    pool = cf.ThreadPoolExecutor(1, thread_name_prefix="verify-sample")
    try:
        return pool.submit(run)
    finally:
        pool.shutdown(wait=False)


def _verify_sample(cfg: TFConfig, layout: Layout, models: dict, plain: cf.Future | None = None) -> dict:
    """encoder.verify_images of the stored latents, spread over the store, encoded again the plain way and
    compared with what the pass stored (tasks.encode.verify): raises when they differ. `plain`: that sample
    already encoded beside the pass (_plain_sample_beside); without it, or when the pass rejected every row of
    it, the sample is taken from the valid rows and encoded now."""
    from models.encoder import encode_images
    from tasks.encode.verify import check_sample, encode_files_plainly, no_longer_decodes

    if not cfg.encoder.verify_images:
        return {"status": "skipped", "reason": "encoder.verify_images is 0"}
    if not models:
        return {"status": "skipped", "reason": "encoded on Dask workers: this process holds no encoder"}
    began = time.perf_counter()
    path = layout.latents()
    valid = zarr_store.open_array(path, "valid")[:]
    if plain is not None:
        early = plain.result()
        stored, decoded = valid[early["rows"]], early["ok"]
        lost = np.flatnonzero(stored & ~decoded)
        if len(lost):   # rejects are in row order: the first lost row's is after the failures before it
            raise no_longer_decodes(early["rejects"][int((~decoded[:lost[0]]).sum())])
        if stored.any():
            compared = check_sample(path, early["rows"][stored], early["tokens"][stored[decoded]],
                                    early["ids"][stored])
            return {**compared, "seconds": round(time.perf_counter() - began, 3),
                    "encoded_beside_pass_s": early["seconds"]}
    valid = np.flatnonzero(valid)
    if not len(valid):
        return {"status": "skipped", "reason": "no valid image"}
    rows = valid[sample_rows(len(valid), cfg.encoder.verify_images)]
    ids = zarr_store.sample_ids(path, rows)
    device, model = next(iter(models.items()))
    if encode_reads_files(cfg):
        preprocess = Preprocess(cfg.source.image_size, resize_short_side(cfg.source), cfg.source.interpolation)
        recomputed = encode_files_plainly(model, sample_files(cfg.source, [str(i) for i in ids]), preprocess,
                                          device, cfg.encoder.batch_size, cfg.encoder.gpu_decoder)
    else:   # the pass's own function over the image store's pixels, one batch at a time
        pixels = np.asarray(zarr_store.open_array(layout.images(), "image").oindex[rows])
        cuda = torch.device(device).type == "cuda"
        recomputed = encode_images(model, pixels, device=device, batch_size=cfg.encoder.batch_size,
                                   dtype=torch.bfloat16 if cuda else None)
    return {**check_sample(path, rows, recomputed, ids), "seconds": round(time.perf_counter() - began, 3)}


def _warm_hierarchy(cfg: TFConfig, device: str | None, grid: int, dim: int) -> cf.Future | None:
    """On CUDA, the batched hierarchy once over random tokens of a full batch's shape, in a thread: its
    Triton kernels compile (seconds on a fresh machine) while the statistics pass runs."""
    if device is None or not device.startswith("cuda"):
        return None
    import torch

    from models.hierarchy.batched import build_hierarchies_batched

    spec = hierarchy_spec(cfg.hierarchy)

    def run() -> None:
        # on a stream of its own, waiting only for it, and never during a CUDA graph capture (tasks.encode.cuda_graph)
        try:
            with CAPTURE_LOCK, torch.no_grad(), torch.cuda.device(device):
                stream = torch.cuda.Stream(device)
                with torch.cuda.stream(stream):
                    noise = torch.Generator(device=device).manual_seed(0)
                    tokens = torch.randn((cfg.encoder.batch_size, grid, grid, dim), device=device, generator=noise)
                    build_hierarchies_batched(tokens.half().float(), spec, stats=(np.zeros(dim), np.ones(dim)))
                stream.synchronize()
        except Exception as error:   # only a head start: the pass compiles them itself, and says what failed
            warnings.warn(f"warming the hierarchy kernels failed ({error!r}); the pass compiles them", stacklevel=1)

    pool = cf.ThreadPoolExecutor(1)
    try:
        return pool.submit(run)
    finally:
        pool.shutdown(wait=False)


@contextlib.contextmanager
def _fused_teacher(cfg: TFConfig, layout: Layout, stats):
    """The Teacher the encode pass fills, its store's template made and its stage lock held for the pass;
    None (encode only) when another run holds the hierarchy stage. The store records (storage.lineage) the
    latents being written as what it is built from, as the hierarchy stage would: that stage then reuses it,
    or resumes it chunk by chunk. A teacher store there from other latents, or complete (these latents are
    computed anew), is removed first."""
    from storage import lineage
    from storage.files import remove_tree
    from storage.locks import StageLocked, stage_lock

    stage = teacher_stage(cfg, layout)
    try:
        lock = stage_lock(stage.path, "fail", 0.0)
        lock.__enter__()
    except StageLocked:
        yield None
        return
    try:
        upstreams = [u for u, _ in stage.needs]
        if stage.path.exists() and (zarr_store.is_complete(stage.path) or lineage.read(stage.path) is None
                                    or lineage.mismatch(stage.path, upstreams)):
            remove_tree(stage.path)
        if lineage.read(stage.path) is None:
            lineage.start(stage.path, stage.key, None, [lineage.identity(u) for u in upstreams])
        teacher_template(cfg, layout)
        yield Teacher(hierarchy_spec(cfg.hierarchy), stats, stage.path)
    finally:
        lock.__exit__(None, None, None)


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
                       bounds, bar: Progress, teacher: Teacher | None = None,
                       splits: dict | None = None, graphs: dict | None = None) -> dict[str, dict[str, float]]:
    """The direct path on this machine's devices: one pass per device over every n-th pending chunk. Returns
    each device's PhaseClock summary: where the pass spent its time."""
    ids = zarr_store.open_array(layout.images(), "sample")[:].tolist()
    labels = zarr_store.open_array(layout.images(), "label")[:]
    files = sample_files(cfg.source, ids)
    preprocess = Preprocess(cfg.source.image_size, resize_short_side(cfg.source), cfg.source.interpolation)
    lock = threading.Lock()

    def advance(rows: int) -> None:
        with lock:
            bar.advance(rows)

    devices = list(models)
    clocks = {device: PhaseClock(device.startswith("cuda")) for device in devices}
    with cf.ThreadPoolExecutor(len(devices)) as pool:
        runs = [pool.submit(encode_file_chunks, models[device], files, labels, layout.latents(),
                            [(c, *bounds[c]) for c in pending[i::len(devices)]], preprocess, device,
                            batch_size=cfg.encoder.batch_size, dtype=cfg.encoder.dtype, weights_label=weights_label,
                            readers=cfg.encoder.readers, writers=cfg.encoder.writers,
                            read_timeout=cfg.encoder.read_timeout_s, on_chunk=advance, teacher=teacher,
                            clock=clocks[device], split=(splits or {}).get(device),
                            graphs=(graphs or {}).get(device), hierarchy_graph=cfg.encoder.hierarchy_graph)
                for i, device in enumerate(devices)]
        for run in runs:
            run.result()
    return {device: clock.summary() for device, clock in clocks.items()}
