"""Data-plane bench: JPEG files (ImageNet class-folder layout) -> DINOv2 latents -> teacher store, one GPU.

    python bench/dataplane.py --images 20000 --device cuda [--out DIR]

1. Writes ImageNet-shaped synthetic JPEGs (typical sizes 500x375 and the like, quality 90, smooth
   content plus grain, ~100 KB each like ImageNet's mean) into <workdir>/train/<synset>/<synset>_<i>.JPEG.
2. Runs the pipeline once, timed: reader threads load file bytes for the next batches while the GPU
   decodes (torchvision nvjpeg), centre-crops and resizes, encodes (DINOv2 in bf16), builds the
   hierarchy (models.hierarchy_batched) and writer threads put chunks into the project's Zarr
   latent and teacher stores (storage.zarr_store: template first, disjoint chunks, marker last).
3. Measures the encoder alone on resident batches, the hierarchy's share of the encoder's time,
   the batched hierarchy's ARI against the scipy/scikit-learn reference on stored latents, and
   peak host and GPU memory. Writes <out>/dataplane.json (DESIGN §7 shape).

Random encoder weights (the figure is throughput, not quality). No prefect / dask imports: it runs
where torch, torchvision, timm, numpy, scikit-learn and zarr exist.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import results_io  # noqa: E402

SIZES = [((500, 375), 0.45), ((375, 500), 0.15), ((500, 333), 0.15), ((500, 400), 0.1), ((640, 480), 0.1),
         ((800, 600), 0.05)]


def _write_jpeg(job: tuple[str, int]) -> int:
    from PIL import Image

    path, seed = job
    rng = np.random.default_rng(seed)
    (w, h) = SIZES[rng.choice(len(SIZES), p=[p for _, p in SIZES])][0]
    small = rng.integers(0, 256, (max(2, h // 10), max(2, w // 10), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    image = np.clip(image + rng.normal(0, 14, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    Path(path).write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def make_jpegs(folder: Path, count: int, classes: int, workers: int) -> tuple[list[str], np.ndarray, float]:
    """(paths, labels, mean bytes) of `count` JPEGs in <folder>/<synset>/; labels = sorted synset index."""
    synsets = [f"n{10_000_000 + 7919 * c:08d}" for c in range(classes)]
    jobs = []
    for i in range(count):
        synset = synsets[i % classes]
        (folder / synset).mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / synset / f"{synset}_{i}.JPEG"), i))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        sizes = pool.map(_write_jpeg, jobs, chunksize=64)
    # ImageFolder order: sorted synsets, then sorted file names
    paths = sorted(p for p, _ in jobs)
    order = sorted(synsets)
    labels = np.array([order.index(Path(p).parent.name) for p in paths], dtype=np.int64)
    return paths, labels, float(np.mean(sizes))


def read_bytes(paths: list[str]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]


def gpu_preprocess(images: list[torch.Tensor], size: int, resize_short: int) -> torch.Tensor:
    """uint8 CHW images (any size, on the GPU) -> float [B,3,size,size] in [0,1].

    Resize-short-side-then-centre-crop, done as the equivalent crop first (the central
    size/resize_short share of the short side) and one antialiased bilinear resize; images of
    one shape (most ImageNet photos share a few) go through one interpolate call."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape[1:]), []).append(index)
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=images[0].device)
    for (h, w), members in groups.items():
        crop = max(1, round(min(h, w) * size / resize_short))
        top, left = (h - crop) // 2, (w - crop) // 2
        patch = torch.stack([images[i][:, top:top + crop, left:left + crop] for i in members]).float()
        out[members] = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.div_(255.0)


class Timer:
    """Per-phase GPU time from CUDA events (or wall time on CPU), summed over calls."""

    def __init__(self, device: torch.device):
        self.device, self.pending, self.total = device, [], {}

    def span(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                if timer.device.type == "cuda":
                    self.start = torch.cuda.Event(enable_timing=True)
                    self.start.record()
                else:
                    self.start = time.perf_counter()

            def __exit__(self, *exc):
                if timer.device.type == "cuda":
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    timer.pending.append((name, self.start, end))
                else:
                    timer.total[name] = timer.total.get(name, 0.0) + time.perf_counter() - self.start

        return _Span()

    def seconds(self) -> dict[str, float]:
        for name, start, end in self.pending:
            end.synchronize()
            self.total[name] = self.total.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        self.pending = []
        return dict(self.total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="vit_base_patch14_reg4_dinov2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize-short", type=int, default=256)
    parser.add_argument("--batch", type=int, default=512, help="images per GPU batch = rows per store chunk")
    parser.add_argument("--readers", type=int, default=12)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--reference-images", type=int, default=200)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--no-graph", action="store_true", help="eager hierarchy loop (no CUDA graph)")
    parser.add_argument("--linkage", choices=("auto", "triton", "torch"), default="auto",
                        help="merge loop of the hierarchy: fused Triton kernel, torch loop (CUDA graph), "
                             "or auto (Triton on CUDA where installed)")
    parser.add_argument("--compress-latents", action="store_true",
                        help="zstd-compress the latents (the stage default stores them raw)")
    parser.add_argument("--out", default=None, help="folder for dataplane.json (default bench/results)")
    args = parser.parse_args()

    from models.encoder import _normalise, build_encoder
    from models.hierarchy import HierarchySpec, build_hierarchies
    from models.hierarchy_batched import (build_hierarchies_batched, grid_coordinates_t, object_masks,
                                          uses_triton)
    from sklearn.metrics import adjusted_rand_score
    from storage import zarr_store
    from storage.zarr_store import ArraySpec
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(args.device)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tf-dataplane-"))
    started = time.perf_counter()
    paths, labels, mean_bytes = make_jpegs(workdir / "train", args.images, args.classes, os.cpu_count() or 4)
    print(f"{len(paths)} JPEGs ({mean_bytes / 1024:.0f} KB mean) in {time.perf_counter() - started:.1f}s", flush=True)

    encoder, weights_label = build_encoder(args.model, args.image_size, None, allow_random_init=True)
    encoder = encoder.to(device).eval().to(memory_format=torch.channels_last)
    grid, dim = encoder.patch_embed.grid_size[0], encoder.embed_dim
    spec = HierarchySpec()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def forward(images01: torch.Tensor) -> torch.Tensor:
        tokens = encoder.forward_features(_normalise(encoder, images01).contiguous(memory_format=torch.channels_last))
        return tokens[:, encoder.num_prefix_tokens:]

    encode = torch.compile(forward) if args.compile else forward
    compiled = args.compile

    # --- stores: the project's Zarr template, then disjoint chunk writes with markers ---------
    n, batch = len(paths), args.batch
    latents, teacher = workdir / "latents", workdir / "teacher"
    zarr_store.create_store(latents, {"tokens": ArraySpec((n, grid, grid, dim), "float16", ("sample", "y", "x", "channel"),
                                                                compressed=args.compress_latents),
                                      "label": ArraySpec((n,), "int64", ("sample",))}, batch,
                            {"stage": "latents", "encoder_weights": weights_label})
    zarr_store.create_store(teacher, {"regions": ArraySpec((n, spec.num_levels, grid, grid), "int16",
                                                           ("sample", "level", "y", "x"))}, batch,
                            {"stage": "teacher", "spec": str(spec)})

    # --- warm-up (cuDNN choices, compile), untimed ----------------------------------------------
    tail = n % batch
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        for rows in [batch, batch] + ([tail] if tail else []):   # also the last, shorter batch's graph
            warm = torch.rand(rows, 3, args.image_size, args.image_size, device=device)
            try:
                out = encode(warm)
            except Exception as error:   # compile unavailable: measure eager, and say so
                print(f"torch.compile failed ({type(error).__name__}: {error}); eager encoder", flush=True)
                encode, compiled = forward, False
                out = encode(warm)
            build_hierarchies_batched(out.float().reshape(rows, grid, grid, dim), spec, use_graph=not args.no_graph,
                                      linkage=args.linkage)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    # --- the timed run: JPEG -> teacher store ----------------------------------------------------
    chunks = zarr_store.chunk_bounds(n, batch)
    readers = cf.ThreadPoolExecutor(args.readers)
    writers = cf.ThreadPoolExecutor(args.writers)
    timer = Timer(device)

    def load(start: int, stop: int) -> list:
        step = math.ceil((stop - start) / args.readers)
        parts = [readers.submit(read_bytes, paths[s:min(s + step, stop)]) for s in range(start, stop, step)]
        return parts

    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None       # decode + preprocess of the next batch
    copier = torch.cuda.Stream(device) if cuda else None     # device -> pinned host copies
    slots = 2 * args.writers + 2
    host_tokens = [torch.empty((batch, grid, grid, dim), dtype=torch.float16, pin_memory=cuda) for _ in range(slots)]
    host_regions = [torch.empty((batch, spec.num_levels, grid, grid), dtype=torch.int16, pin_memory=cuda)
                    for _ in range(slots)]
    slot_writes: list[cf.Future | None] = [None] * slots
    preparer = cf.ThreadPoolExecutor(1)
    read_wait = [0.0]

    def prepare(c: int):
        """Bytes -> decoded -> preprocessed batch on the side stream; returns (images, ready event)."""
        waited = time.perf_counter()
        data = [t for part in ahead.pop(c) for t in part.result()]
        read_wait[0] += time.perf_counter() - waited
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            with timer.span("decode"):
                decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            with timer.span("preprocess"):
                images01 = gpu_preprocess(decoded, args.image_size, args.resize_short)
            ready = None
            if cuda:
                ready = torch.cuda.Event()
                ready.record(side)
        return images01, ready

    write_seconds: list[float] = []

    def store(chunk: int, start: int, rows: int, slot: int, copied) -> None:
        if copied is not None:
            copied.synchronize()
        began = time.perf_counter()
        tokens = host_tokens[slot][:rows].numpy()
        zarr_store.write_chunk(latents, chunk, start, {"tokens": tokens, "label": labels[start:start + rows]})
        zarr_store.write_chunk(teacher, chunk, start, {"regions": host_regions[slot][:rows].numpy()})
        write_seconds.append(time.perf_counter() - began)

    wall = time.perf_counter()
    ahead = {c: load(*chunks[c]) for c in range(min(3, len(chunks)))}
    prepared = preparer.submit(prepare, 0)
    with torch.no_grad():
        for c, (start, stop) in enumerate(chunks):
            images01, ready = prepared.result()
            if c + 3 < len(chunks):
                ahead[c + 3] = load(*chunks[c + 3])
            if c + 1 < len(chunks):
                prepared = preparer.submit(prepare, c + 1)
            if cuda:
                torch.cuda.current_stream(device).wait_event(ready)
                images01.record_stream(torch.cuda.current_stream(device))
            with timer.span("encode"), torch.autocast(device.type, dtype=dtype, enabled=cuda):
                tokens = encode(images01)
            with timer.span("hierarchy"):
                regions = build_hierarchies_batched(tokens.float().reshape(len(tokens), grid, grid, dim), spec,
                                                    use_graph=not args.no_graph, linkage=args.linkage)
            tokens16 = tokens.to(torch.float16).reshape(len(tokens), grid, grid, dim)
            slot = c % slots
            if slot_writes[slot] is not None:      # the slot's previous chunk must be on disk first
                slot_writes[slot].result()
            rows, copied = len(tokens), None
            if cuda:
                copier.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(copier), timer.span("to_host"):
                    host_tokens[slot][:rows].copy_(tokens16, non_blocking=True)
                    host_regions[slot][:rows].copy_(regions, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(copier)
                tokens16.record_stream(copier)
                regions.record_stream(copier)
            else:
                host_tokens[slot][:rows].copy_(tokens16)
                host_regions[slot][:rows].copy_(regions)
            slot_writes[slot] = writers.submit(store, c, start, rows, slot, copied)
        if cuda:
            torch.cuda.synchronize(device)
        gpu_loop_s = time.perf_counter() - wall   # every batch decoded, encoded, clustered and copied out
        for w in slot_writes:
            if w is not None:
                w.result()
    read_wait = read_wait[0]
    preparer.shutdown()
    end_to_end_s = time.perf_counter() - wall
    readers.shutdown()
    writers.shutdown()
    for path in (latents, teacher):
        zarr_store.mark_complete(path, {"samples": n})
    phases = timer.seconds()
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    linkage_used = "triton" if uses_triton(args.linkage, device, "linkage") else "torch"
    print(f"end to end {n / end_to_end_s:.0f} img/s ({end_to_end_s:.1f}s); phases {phases}; read wait {read_wait:.1f}s",
          flush=True)

    # --- every sample exactly once, in order -----------------------------------------------------
    stored_labels = np.asarray(zarr_store.open_array(latents, "label")[:])
    markers = len(zarr_store.chunk_infos(latents))
    assert markers == len(chunks) and np.array_equal(stored_labels, labels), "store incomplete or out of order"

    # --- encoder alone on resident batches -------------------------------------------------------
    resident = torch.rand(batch, 3, args.image_size, args.image_size, device=device)
    repeats = max(3, min(20, math.ceil(8192 / batch)))
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        encode(resident)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = encode(resident)
        if device.type == "cuda":
            torch.cuda.synchronize()
        encoder_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            build_hierarchies_batched(out.float().reshape(batch, grid, grid, dim), spec, use_graph=not args.no_graph,
                                      linkage=args.linkage)
        if device.type == "cuda":
            torch.cuda.synchronize()
        hierarchy_s = time.perf_counter() - t0
        # level 0 (k-means) alone on the same batches: the rest of hierarchy_s is the part levels
        flat = out.float().reshape(batch, grid * grid, dim)
        unit = flat / flat.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        coords = grid_coordinates_t(grid, grid, device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            object_masks(unit, coords, spec)
        if device.type == "cuda":
            torch.cuda.synchronize()
        level0_s = time.perf_counter() - t0
    encoder_img_s = repeats * batch / encoder_s

    # --- batched hierarchy vs the scipy / scikit-learn reference on stored latents --------------
    k = min(args.reference_images, n)
    sample_tokens = zarr_store.read_floats(zarr_store.open_array(latents, "tokens"), slice(0, k))
    reference = build_hierarchies(sample_tokens, spec)
    stored = np.asarray(zarr_store.open_array(teacher, "regions")[:k])
    ari = [float(np.mean([adjusted_rand_score(reference[i, l].ravel(), stored[i, l].ravel()) for i in range(k)]))
           for l in range(spec.num_levels)]
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    bytes_per_image = grid * grid * dim * 2 + spec.num_levels * grid * grid * 2 + 8
    figures = {
        "end_to_end_img_per_s": (round(n / end_to_end_s, 1), "img/s"),
        "encoder_img_per_s": (round(encoder_img_s, 1), "img/s"),
        "hierarchy_share": (round(hierarchy_s / encoder_s, 4), "hierarchy time / encoder time, same batches"),
        "hierarchy_share_in_pipeline": (round(phases["hierarchy"] / phases["encode"], 4), "GPU time ratio"),
        "hierarchy_ari_vs_reference": (round(min(ari), 4), f"min over levels of mean ARI, {k} images"),
        "peak_gpu_mem_gib": (round(peak_gpu, 2), "GiB"),
        "peak_host_mem_gib": (round(peak_host, 2), "GiB (max RSS)"),
        "store_bytes_per_image": (bytes_per_image, "B (float16 latents + int16 regions + label)"),
        "imagenet_train_tb": (round(bytes_per_image * 1_281_167 / 1e12, 3), "TB uncompressed for 1.28M images"),
    }
    print(f"hierarchy ({linkage_used} linkage): {phases['hierarchy']:.2f}s GPU in the pipeline; resident "
          f"{hierarchy_s:.3f}s for {repeats * batch} images, of which level 0 (k-means) {level0_s:.3f}s", flush=True)
    extra = {"phases_gpu_s": {k2: round(v, 3) for k2, v in phases.items()}, "read_wait_s": round(read_wait, 3),
             "hierarchy_resident": {"linkage": linkage_used, "images": repeats * batch, "total_s": round(hierarchy_s, 4),
                                    "level0_kmeans_s": round(level0_s, 4),
                                    "part_levels_and_rest_s": round(hierarchy_s - level0_s, 4)},
             "end_to_end_s": round(end_to_end_s, 2), "gpu_loop_s": round(gpu_loop_s, 2),
             "write_drain_s": round(end_to_end_s - gpu_loop_s, 2),
             "chunk_write_s": {"mean": round(float(np.mean(write_seconds)), 3), "max": round(max(write_seconds), 3),
                               "writers": args.writers}, "ari_per_level": [round(a, 4) for a in ari],
             "config": {"images": n, "classes": args.classes, "model": args.model, "batch": batch,
                        "readers": args.readers, "writers": args.writers, "compile": compiled, "cuda_graph": not args.no_graph,
                        "linkage": args.linkage,
                        "mean_jpeg_kb": round(mean_bytes / 1024, 1), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "weights": weights_label}}
    path = results_io.write_result("dataplane", figures, extra, args.out)
    print(path.read_text(), flush=True)


if __name__ == "__main__":
    main()
