"""Data-plane bench: JPEG files (ImageNet class-folder layout) -> latent store -> teacher store, one GPU.

    python bench/dataplane.py --images 20000 [--config configs/imagenet.yaml] [--set key=value] [--out DIR]

1. Writes ImageNet-shaped synthetic JPEGs (typical sizes 500x375 and the like, quality 90, smooth
   content plus grain, ~100 KB each like ImageNet's mean) into <workdir>/train/<synset>/<synset>_<i>.JPEG.
2. Runs the stages as `tf pipeline` does, through their task functions (tasks.ingest.stage.ingest_images,
   tasks.encode.stage.encode_latents, tasks.hierarchy.stage.build_teacher: `.fn`, without the Prefect run around
   them) on configs/imagenet.yaml with a random-init encoder: once with the hierarchy fused into the encode
   pass (encoder.stats_images, the config's default), once the two-pass way (stats from every image, then
   the hierarchy stage). Each stage's seconds, throughput, GPU figures and the encode pass's phase times
   (tasks.encode.phase_clock) are what the stages themselves return, as the runs table records them.
   `--compare NAME:KEY=VALUE` times the fused encode stage again with other settings in the same call (the
   same machine as the baseline: ratios from one run), e.g. cuda_graph:encoder.cuda_graph=true.
3. Measures the encoder and the hierarchy alone on resident batches, the batched hierarchy against the
   scipy/scikit-learn reference on the stored latents, peak host memory and the stores' bytes per image.
   Writes <out>/dataplane.json (DESIGN §7 shape).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import results_io  # noqa: E402

SIZES = [((500, 375), 0.45), ((375, 500), 0.15), ((500, 333), 0.15), ((500, 400), 0.1), ((640, 480), 0.1),
         ((800, 600), 0.05)]


def _write_jpeg(job: tuple[str, int]) -> int:
    from PIL import Image

    path, seed = job
    if Path(path).exists():   # written by an earlier bench in the same work folder: the same bytes
        return Path(path).stat().st_size
    rng = np.random.default_rng(seed)
    (w, h) = SIZES[rng.choice(len(SIZES), p=[p for _, p in SIZES])][0]
    small = rng.integers(0, 256, (max(2, h // 10), max(2, w // 10), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    grain = rng.standard_normal(image.shape, dtype=np.float32) * 14   # float32: half the time of float64 draws
    image = np.clip(image + grain, 0, 255).astype(np.uint8)
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


def _variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    """--compare NAME:KEY=VALUE[,KEY=VALUE] -> (name, sets)."""
    out = []
    for spec in specs:
        name, _, sets = spec.partition(":")
        if not name or not sets or name in ("fused", "two_pass"):
            raise SystemExit(f"--compare {spec!r}: give NAME:KEY=VALUE[,KEY=VALUE], NAME not fused or two_pass")
        out.append((name, sets.split(",")))
    return out


def _compare(workdir: Path, args, name: str, sets: list[str], n: int) -> dict:
    """The fused encode stage (the hierarchy in its pass) with `sets` on top of the bench's own, on its own root,
    timed like the main run; the root is removed after (the disk holds about two 50k stores)."""
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    cfg = _stage_config(args.config, workdir / "train", [*args.sets, *sets])
    root = fresh_root(workdir / name)
    try:
        ingest_images.fn(cfg, str(root))
        encode = timed(encode_latents.fn(cfg, str(root), with_teacher=True), name)
    except Exception as error:   # a lever that fails is a result too: the baseline's figures still count
        print(f"{name} ({','.join(sets)}) failed: {type(error).__name__}: {error}", flush=True)
        return {"sets": sets, "failed": f"{type(error).__name__}: {error}"}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    keep = ("duration_s", "images_per_s", "gpu_busy_share", "gpu_peak_mem_gib", "stats_pass_s", "stats_phases_s",
            "phases_s", "wall_s", "decoded_by", "verified")
    print(f"{name} ({','.join(sets)}): encode {encode['duration_s']:.1f}s: {n / encode['duration_s']:.0f} img/s",
          flush=True)
    return {"sets": sets, "img_per_s": round(n / encode["duration_s"], 1),
            **{k: encode[k] for k in keep if k in encode}}


def fresh_root(root: Path) -> Path:
    """`root` emptied: a store left by a run that was killed before its clean-up (a device call past its limit)
    would be reused, and its stage timed at a few milliseconds (the H100 call at f17fed5 reported 1.5M img/s)."""
    shutil.rmtree(root, ignore_errors=True)
    return root


def timed(stage: dict, name: str) -> dict:
    """A stage's record, refused unless the stage computed: a reused store has no throughput."""
    if stage.get("status") != "computed":
        raise SystemExit(f"{name}: the {stage.get('stage')} stage was {stage.get('status')}, not computed: "
                         f"{stage.get('path')} holds an earlier run's store, so its seconds are no measurement")
    return stage


def _stage_config(base: str, train: Path, sets: list[str]):
    from storage.config import load_config

    return load_config(REPO / base, [f"source.path={train}", "encoder.weights=null", "encoder.allow_random_init=true",
                                     "evaluate.inception_weights=null", *sets])


def fastest_sets(result: dict) -> list[str]:
    """The settings (KEY=VALUE) of the fastest `--compare` variant of a dataplane.json, where it beat the fused
    stage as configured; [] where none did (or none ran). What `gpu_session.sh` hands the pipeline step
    (GP_FASTEST=1), so that a chained call needs no reading of the one before."""
    baseline = result["figures"]["encode_stage_img_per_s"]["value"]
    ran = [run for run in result.get("compared", {}).values() if "img_per_s" in run]
    best = max(ran, key=lambda run: run["img_per_s"], default=None)
    return list(best["sets"]) if best and best["img_per_s"] > baseline else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--config", default="configs/imagenet.yaml", help="the stages' config (sizes via --set)")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--reference-images", type=int, default=200)
    parser.add_argument("--resident-repeats", type=int, default=8)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="folder for dataplane.json (default bench/results)")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="also time the fused encode stage with these settings, in this call, on its own root "
                             "(removed after: 20 GB at 50k images), e.g. cuda_graph:encoder.cuda_graph=true")
    parser.add_argument("--fastest-of", default=None, metavar="DATAPLANE_JSON",
                        help="print the fastest compared variant's settings as --set flags (fastest_sets) and exit")
    args = parser.parse_args()
    if args.fastest_of:
        print(" ".join(f"--set {s}" for s in fastest_sets(json.loads(Path(args.fastest_of).read_text()))))
        return

    from sklearn.metrics import adjusted_rand_score

    from models.hierarchy.batched import build_hierarchies_batched
    from models.hierarchy.reference import build_hierarchies
    from storage import zarr_store
    from storage.keys import Layout
    from tasks.encode.cuda_graph import EncoderGraphs
    from tasks.encode.files import encode_batch
    from tasks.encode.stage import encode_latents
    from tasks.encode.encoder_load import load_encoder
    from tasks.hierarchy.stage import build_teacher
    from tasks.ingest.stage import ingest_images
    from tasks.plan import hierarchy_spec
    from tasks.stage import pick_device

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tf-dataplane-"))
    started = time.perf_counter()
    paths, labels, mean_bytes = make_jpegs(workdir / "train", args.images, args.classes, os.cpu_count() or 4)
    print(f"{len(paths)} JPEGs ({mean_bytes / 1024:.0f} KB mean) in {time.perf_counter() - started:.1f}s", flush=True)
    fused_cfg = _stage_config(args.config, workdir / "train", args.sets)
    two_pass_cfg = _stage_config(args.config, workdir / "train", [*args.sets, "encoder.stats_images=0"])
    device = pick_device(fused_cfg.device)
    n = len(paths)

    # --- the stages as `tf pipeline` runs them (their task functions): fused, then the two-pass way --------
    runs, compared = {}, {}
    for name, cfg in (("fused", fused_cfg), ("two_pass", two_pass_cfg)):
        if name == "two_pass":   # the variants first: the disk holds the fused store, one variant's and two_pass's
            compared = {variant: _compare(workdir, args, variant, sets, n) for variant, sets in _variants(args.compare)}
        root = str(fresh_root(workdir / name))
        ingest_images.fn(cfg, root)   # the listing (and the image store's pixel sample): not timed
        if device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        encode = timed(encode_latents.fn(cfg, root, with_teacher=name == "fused"), name)
        hierarchy = build_teacher.fn(cfg, root)   # fused: reused (checked below), its seconds ~0
        if name == "two_pass":
            timed(hierarchy, name)
        seconds = encode["duration_s"] + hierarchy["duration_s"]
        runs[name] = {"encode": encode, "hierarchy": hierarchy, "end_to_end_s": round(seconds, 2),
                      "img_per_s": round(n / seconds, 1)}
        print(f"{name}: encode {encode['duration_s']:.1f}s ({encode['status']}), hierarchy "
              f"{hierarchy['duration_s']:.1f}s ({hierarchy['status']}): {n / seconds:.0f} img/s", flush=True)
    layout = Layout(str(workdir / "fused"), fused_cfg)
    latents, teacher = layout.latents(), layout.teacher()
    stored_labels = np.asarray(zarr_store.open_array(latents, "label")[:])
    assert np.array_equal(stored_labels, labels), "store out of order"
    assert np.asarray(zarr_store.open_array(latents, "valid")[:]).all(), "a synthetic JPEG was rejected"
    assert runs["fused"]["hierarchy"]["status"] == "reused", "the hierarchy was not fused into the encode pass"
    two_pass = Layout(str(workdir / "two_pass"), two_pass_cfg)
    fused_regions = zarr_store.open_array(teacher, "regions")

    # --- encoder and hierarchy alone on resident batches, the same model and spec ---------------------------
    import torch

    spec = hierarchy_spec(fused_cfg.hierarchy)
    encoder, _ = load_encoder(fused_cfg.encoder.model, fused_cfg.source.image_size, None, True)
    encoder = encoder.to(device).eval()
    batch = fused_cfg.encoder.batch_size
    mean, std = (zarr_store.open_array(latents, k)[:] for k in ("mean", "std"))
    resident = torch.rand(batch, 3, fused_cfg.source.image_size, fused_cfg.source.image_size, device=device)
    with torch.no_grad():
        out = encode_batch(encoder, resident)
        build_hierarchies_batched(out, spec, stats=(mean, std))
        sync(torch.device(device))
        t0 = time.perf_counter()
        for _ in range(args.resident_repeats):
            out = encode_batch(encoder, resident)
        sync(torch.device(device))
        encoder_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.resident_repeats):
            build_hierarchies_batched(out, spec, stats=(mean, std))
        sync(torch.device(device))
        hierarchy_s = time.perf_counter() - t0
        graph_s = None
        if device.startswith("cuda"):   # the same batches replayed as one CUDA graph (encoder.cuda_graph)
            try:
                graphs = EncoderGraphs(encoder)
                encode_batch(encoder, resident, graphs)
                sync(torch.device(device))
                t0 = time.perf_counter()
                for _ in range(args.resident_repeats):
                    encode_batch(encoder, resident, graphs)
                sync(torch.device(device))
                graph_s = time.perf_counter() - t0
            except RuntimeError as error:   # reported, and the figures above still written
                print(f"encoder as a CUDA graph failed: {error}", flush=True)

    # --- batched hierarchy vs the scipy / scikit-learn reference on the stored latents ---------------------
    k = min(args.reference_images, n)
    sample_tokens = zarr_store.read_floats(zarr_store.open_array(latents, "tokens"), slice(0, k))
    reference = build_hierarchies(sample_tokens, spec, stats=(mean, std))
    stored = np.asarray(fused_regions[:k])
    ari = [float(np.mean([adjusted_rand_score(reference[i, l].ravel(), stored[i, l].ravel()) for i in range(k)]))
           for l in range(len(spec.cuts) + 1)]
    exact = float(np.mean([np.array_equal(reference[i], stored[i]) for i in range(k)]))
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    bytes_per_image = folder_bytes(latents, teacher) / n
    fused, two = runs["fused"], runs["two_pass"]
    figures = {
        "end_to_end_img_per_s": (fused["img_per_s"], "img/s, JPEG to teacher store: encode (hierarchy fused) + "
                                                     "hierarchy stage seconds"),
        "two_pass_img_per_s": (two["img_per_s"], "img/s, JPEG to teacher store: encode, then the hierarchy stage "
                                                 "(stats from every image)"),
        "encode_stage_img_per_s": (fused["encode"].get("images_per_s", 0.0), "img/s, the fused encode stage"),
        "encoder_img_per_s": (round(args.resident_repeats * batch / encoder_s, 1), "img/s, resident batches"),
        "hierarchy_share": (round(hierarchy_s / encoder_s, 4), "hierarchy time / encoder time, same batches"),
        **({"encoder_graph_img_per_s": (round(args.resident_repeats * batch / graph_s, 1),
                                        "img/s, resident batches, the encoder replayed as a CUDA graph")}
           if graph_s else {}),
        **{f"{name}_encode_stage_img_per_s": (run["img_per_s"], f"img/s, the fused encode stage with {run['sets']}")
           for name, run in compared.items() if "img_per_s" in run},
        "hierarchy_ari_vs_reference": (round(min(ari), 4), f"min over levels of mean ARI, {k} images"),
        "hierarchy_exact_vs_reference": (round(exact, 4), f"share of {k} images whose regions equal the reference"),
        "peak_gpu_mem_gib": (fused["encode"].get("gpu_peak_mem_gib", 0.0), "GiB, the fused encode stage"),
        "gpu_busy_share": (fused["encode"].get("gpu_busy_share", 0.0), "NVML busy share, the fused encode stage"),
        "peak_host_mem_gib": (round(peak_host, 2), "GiB (max RSS)"),
        "store_bytes_per_image": (round(bytes_per_image), "B on disk (latent + teacher stores)"),
        "imagenet_train_tb": (round(bytes_per_image * 1_281_167 / 1e12, 3), "TB for 1.28M images"),
    }
    from bench.nvjpeg_paths import nvjpeg_paths

    extra = {"runs": runs, "compared": compared, "phases_s": fused["encode"].get("phases_s"),
             # which of torchvision's two CUDA decode paths these files take (docs/gpu.md)
             "nvjpeg_paths": nvjpeg_paths([Path(p).read_bytes() for p in paths[:2000]]),
             "stats_pass_s": fused["encode"].get("stats_pass_s"), "channel_stats": fused["encode"].get("channel_stats"),
             "ari_per_level": [round(a, 4) for a in ari],
             # the sampled statistics' effect on the teacher: the same images under the whole set's statistics
             "fused_vs_two_pass_exact_share": round(float(np.mean([np.array_equal(a, b) for a, b in zip(
                 np.asarray(zarr_store.open_array(two_pass.teacher(), "regions")[:k]), stored)])), 4),
             "config": {"images": n, "classes": args.classes, "config": args.config, "sets": args.sets,
                        "mean_jpeg_kb": round(mean_bytes / 1024, 1), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "weights": "random-init",
                        "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "default")}}
    path = results_io.write_result("dataplane", figures, extra, args.out)
    print(path.read_text(), flush=True)


if __name__ == "__main__":
    main()
