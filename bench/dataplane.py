"""Data-plane bench: JPEG files (ImageNet class-folder layout) -> latent store -> teacher store, one GPU.

    python bench/dataplane.py --images 20000 --device cuda [--out DIR]

1. Writes ImageNet-shaped synthetic JPEGs (typical sizes 500x375 and the like, quality 90, smooth
   content plus grain, ~100 KB each like ImageNet's mean) into <workdir>/train/<synset>/<synset>_<i>.JPEG.
2. Times what `tf encode` runs for an ImageNet source (encoder.read_from files):
   tasks.encode_files.encode_file_chunks (reader threads, nvjpeg decode with CPU fallback, crop +
   resize, DINOv2 in bf16, writer threads filling the product's latent store chunk by chunk, markers
   last), then the mean/std merge, then what `tf hierarchy` runs per chunk with backend batched
   (tasks.chunk_workers.hierarchy_chunk) into a teacher store.
3. Measures the encoder alone on resident batches, the hierarchy's share of the encoder's time,
   the batched hierarchy's ARI against the scipy/scikit-learn reference on the stored latents, peak
   host and GPU memory and the stores' bytes per image. Writes <out>/dataplane.json (DESIGN §7 shape).

Random encoder weights (the figure is throughput, not quality). No prefect / dask / pydantic imports:
it runs where torch, torchvision, timm, numpy, scikit-learn and zarr exist.
"""
from __future__ import annotations

import argparse
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


def folder_bytes(*folders: Path) -> int:
    return sum(p.stat().st_size for folder in folders for p in folder.rglob("*") if p.is_file())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="vit_base_patch14_reg4_dinov2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize-short", type=int, default=256)
    parser.add_argument("--interpolation", choices=("bicubic", "bilinear"), default="bicubic",
                        help="source.interpolation (configs/imagenet.yaml: bicubic)")
    parser.add_argument("--batch", type=int, default=512, help="encoder.batch_size")
    parser.add_argument("--chunk", type=int, default=1024, help="ingest.chunk_size: rows per store chunk")
    parser.add_argument("--readers", type=int, default=12, help="encoder.readers")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--dtype", default="float16", help="encoder.dtype (latent storage)")
    parser.add_argument("--reference-images", type=int, default=200)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="folder for dataplane.json (default bench/results)")
    args = parser.parse_args()

    from sklearn.metrics import adjusted_rand_score

    from models.channel_stats import mean_std
    from models.encoder import build_encoder, grid_size, token_dim
    from models.hierarchy.reference import build_hierarchies
    from models.hierarchy.batched import build_hierarchies_batched
    from storage import zarr_store
    from storage.config import HierarchyConfig
    from storage.imagenet import SampleFiles
    from storage.latent_store import latent_store_arrays
    from storage.zarr_store import ArraySpec
    from tasks.chunk_workers import hierarchy_chunk
    from tasks.encode_files import Preprocess, encode_batch, encode_file_chunks
    from tasks.plan import hierarchy_spec

    device = torch.device(args.device)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tf-dataplane-"))
    started = time.perf_counter()
    paths, labels, mean_bytes = make_jpegs(workdir / "train", args.images, args.classes, os.cpu_count() or 4)
    print(f"{len(paths)} JPEGs ({mean_bytes / 1024:.0f} KB mean) in {time.perf_counter() - started:.1f}s", flush=True)

    encoder, weights_label = build_encoder(args.model, args.image_size, None, allow_random_init=True)
    encoder = encoder.to(device).eval()
    grid, dim = grid_size(encoder), token_dim(encoder)
    spec = hierarchy_spec(HierarchyConfig())   # the default config's teacher
    n = len(paths)
    bounds = zarr_store.chunk_bounds(n, args.chunk)
    latents, teacher = workdir / "latents", workdir / "teacher"
    zarr_store.create_store(latents, latent_store_arrays(n, len(bounds), grid, dim, args.dtype), args.chunk,
                            {"stage": "latents", "encoder_weights": weights_label, "read_from": "files"})
    zarr_store.write_array(latents, "sample", np.asarray([str(Path(p).relative_to(workdir / "train")) for p in paths]))
    zarr_store.create_store(teacher, {"regions": ArraySpec((n, len(spec.cuts) + 1, grid, grid), np.int16,
                                                           ("sample", "level", "gy", "gx"))}, args.chunk,
                            {"stage": "teacher", "spec": str(spec)})

    # --- warm-up (cuDNN choices, nvjpeg handles), untimed ----------------------------------------
    with torch.no_grad():
        for rows in sorted({args.batch, n % args.batch or args.batch}):
            out = encode_batch(encoder, torch.rand(rows, 3, args.image_size, args.image_size, device=device))
            build_hierarchies_batched(out, spec, stats=(np.zeros(dim, np.float32), np.ones(dim, np.float32)))
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # --- the timed run: JPEG -> latent store (tf encode) -> teacher store (tf hierarchy) ------------
    wall = time.perf_counter()
    infos = encode_file_chunks(encoder, SampleFiles(paths=tuple(paths)), labels, latents,
                               [(c, *bounds[c]) for c in range(len(bounds))],
                               Preprocess(args.image_size, args.resize_short, args.interpolation), device,
                               batch_size=args.batch, dtype=args.dtype, weights_label=weights_label,
                               readers=args.readers, writers=args.writers)
    mean, std = mean_std(*(zarr_store.open_array(latents, k)[:] for k in ("chunk_count", "chunk_mean", "chunk_m2")))
    zarr_store.write_array(latents, "mean", mean)
    zarr_store.write_array(latents, "std", std)
    zarr_store.mark_complete(latents, {"samples": n})
    encode_s = time.perf_counter() - wall
    for c, (start, stop) in enumerate(bounds):
        hierarchy_chunk(spec, "batched", str(latents), str(teacher), c, start, stop)
    sync(device)
    zarr_store.mark_complete(teacher, {"samples": n})
    end_to_end_s = time.perf_counter() - wall
    hierarchy_stage_s = end_to_end_s - encode_s
    print(f"encode {n / encode_s:.0f} img/s ({encode_s:.1f}s); JPEG to teacher store {n / end_to_end_s:.0f} img/s "
          f"({end_to_end_s:.1f}s)", flush=True)

    # --- every sample exactly once, in order, decoded ----------------------------------------------
    stored_labels = np.asarray(zarr_store.open_array(latents, "label")[:])
    assert len(infos) == len(bounds) and np.array_equal(stored_labels, labels), "store incomplete or out of order"
    assert np.asarray(zarr_store.open_array(latents, "valid")[:]).all(), "a synthetic JPEG was rejected"

    # --- encoder and hierarchy alone on resident batches -------------------------------------------
    resident = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
    repeats = max(3, min(20, math.ceil(8192 / args.batch)))
    with torch.no_grad():
        out = encode_batch(encoder, resident)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = encode_batch(encoder, resident)
        sync(device)
        encoder_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            build_hierarchies_batched(out, spec, stats=(mean, std))
        sync(device)
        hierarchy_s = time.perf_counter() - t0

    # --- batched hierarchy vs the scipy / scikit-learn reference on stored latents --------------
    k = min(args.reference_images, n)
    sample_tokens = zarr_store.read_floats(zarr_store.open_array(latents, "tokens"), slice(0, k))
    reference = build_hierarchies(sample_tokens, spec, stats=(mean, std))
    stored = np.asarray(zarr_store.open_array(teacher, "regions")[:k])
    ari = [float(np.mean([adjusted_rand_score(reference[i, l].ravel(), stored[i, l].ravel()) for i in range(k)]))
           for l in range(len(spec.cuts) + 1)]
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    bytes_per_image = folder_bytes(latents, teacher) / n

    figures = {
        "end_to_end_img_per_s": (round(n / end_to_end_s, 1), "img/s, JPEG to teacher store"),
        "encode_stage_img_per_s": (round(n / encode_s, 1), "img/s, JPEG to latent store (tf encode's loop)"),
        "encoder_img_per_s": (round(repeats * args.batch / encoder_s, 1), "img/s"),
        "hierarchy_share": (round(hierarchy_s / encoder_s, 4), "hierarchy time / encoder time, same batches"),
        "hierarchy_share_in_pipeline": (round(hierarchy_stage_s / encode_s, 4), "hierarchy stage / encode stage"),
        "hierarchy_ari_vs_reference": (round(min(ari), 4), f"min over levels of mean ARI, {k} images"),
        "peak_gpu_mem_gib": (round(peak_gpu, 2), "GiB"),
        "peak_host_mem_gib": (round(peak_host, 2), "GiB (max RSS)"),
        "store_bytes_per_image": (round(bytes_per_image), "B on disk (latent + teacher stores)"),
        "imagenet_train_tb": (round(bytes_per_image * 1_281_167 / 1e12, 3), "TB for 1.28M images"),
    }
    extra = {"encode_s": round(encode_s, 2), "hierarchy_stage_s": round(hierarchy_stage_s, 2),
             "end_to_end_s": round(end_to_end_s, 2), "ari_per_level": [round(a, 4) for a in ari],
             "config": {"images": n, "classes": args.classes, "model": args.model, "batch": args.batch,
                        "chunk": args.chunk, "readers": args.readers, "writers": args.writers,
                        "interpolation": args.interpolation, "dtype": args.dtype,
                        "mean_jpeg_kb": round(mean_bytes / 1024, 1), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "weights": weights_label}}
    path = results_io.write_result("dataplane", figures, extra, args.out)
    print(path.read_text(), flush=True)


if __name__ == "__main__":
    main()
