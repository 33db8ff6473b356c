"""50k-sample evaluation on one GPU: sampling, decoding, FD-DINOv2 / FID / KID / IS, per-level FD,
structure and re-encode agreement, through models.evaluation.streaming_eval (DESIGN §7: under 3 minutes on an H200).

    python bench/evaluation.py --samples 50000 --device cuda [--out DIR]

Models have the ImageNet configuration's shapes and random weights (the figure is time, not
quality): DINOv2-B/14-reg at 224 px (16x16 tokens, C = 768), four generators of preset B, the
decoder at width 768 / depth 12, and torch-fidelity's Inception from a random-weights file the
bench writes itself. The real side is a synthetic set (random images, their random-encoder
tokens, block partitions as teacher regions). eval_50k_s is the engine's wall time plus turning
the streamed state into metric values; model construction, the warm-up and the real-side
reference pass are reported separately. Writes <out>/evaluation.json (default bench/results/).
No prefect / dask / zarr imports: this runs where only torch, timm, numpy, scipy, sklearn,
torch-fidelity and pydantic (the config's defaults, through tasks.plan) exist.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench import results_io  # noqa: E402

SIZES = {
    # encoder, image size, generator preset, decoder width / depth / heads, classes
    "imagenet": dict(encoder="dinov2-b14-reg", image=224, preset="B", dec_width=768, dec_depth=12, dec_heads=12,
                     classes=1000),
    "tiny": dict(encoder="dinov2-s14-reg", image=56, preset="tiny", dec_width=64, dec_depth=1, dec_heads=2,
                 classes=10),
}


def random_inception_weights(path: str) -> str:
    """torch-fidelity's Inception with random (He-scaled) weights, saved in its own key layout."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    cls = inception_module.FeatureExtractorInceptionV3
    with mock.patch.object(inception_module, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None):
        network = cls("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(0)
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in)
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.data = 1 + 0.1 * torch.randn(module.weight.shape, generator=generator)
            module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=generator)
        elif isinstance(module, nn.Linear):
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * 30 / math.sqrt(module.in_features)
            module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=generator)
    torch.save(network.state_dict(), path)
    return path


def randomise_zero_layers(module: nn.Module, std: float = 0.02) -> nn.Module:
    """adaLN-Zero / zero heads make untrained outputs constant; give them small random weights instead."""
    generator = torch.Generator().manual_seed(1)
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and not layer.weight.detach().any():
            layer.weight.data = torch.randn(layer.weight.shape, generator=generator) * std
    return module


def block_partitions(grid: int, levels: int) -> list[torch.Tensor]:
    """Nested block partitions [T] for levels 0..levels-2: 2x2, 4x4, 8x8 ... blocks of the grid."""
    out = []
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    for level in range(levels - 1):
        side = max(1, grid >> (level + 1))
        ids = (rows // side) * (grid // side + 1) + cols // side
        out.append(ids.reshape(-1))
    return out


def profile_parts(generators, decoder, dinov2_fn, inception_path, device, args) -> dict:
    """Milliseconds per 1,000 samples of each part, alone, on one batch (after the warm-up)."""
    import copy

    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    from models.decoder import tensor_to_images
    from models.evaluation.structure_stream import structure_chunk
    from models.generator.trajectory import level_noises, one_step_level
    from storage.config import HierarchyConfig
    from tasks.plan import hierarchy_spec

    cuda = device.type == "cuda"
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda)
    n = args.batch_size
    T, C = decoder.config.grid ** 2, decoder.config.token_dim
    x = torch.randn(n, T, C, device=device)
    label = torch.zeros(n, dtype=torch.long, device=device)

    def timed(fn, reps: int = 3) -> float:
        with torch.no_grad():
            fn()
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(reps):
                fn()
            if cuda:
                torch.cuda.synchronize()
        return round((time.perf_counter() - started) / reps * 1000 * 1000 / n, 1)

    out = {}
    with autocast:
        out["generator_level_autocast"] = timed(lambda: one_step_level(generators[1], x, x, label, 1))
    bf16 = copy.deepcopy(generators[1]).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    out["generator_level_bf16_weights"] = timed(lambda: one_step_level(bf16, xb, xb, label, 1))
    del bf16
    with autocast:
        out["decoder_autocast"] = timed(lambda: tensor_to_images(decoder(x)))
        images = tensor_to_images(decoder(x))
        out["dinov2_fn_autocast"] = timed(lambda: dinov2_fn(images))
    extractor = inception_module.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=inception_path)
    extractor = extractor.to(device).eval()
    gpu_images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()
    for name, enabled in (("inception_fp32", False), ("inception_autocast", cuda)):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled):
            out[name] = timed(lambda: [extractor(chunk) for chunk in gpu_images.split(args.feature_batch)])
    extractor = extractor.to(memory_format=torch.channels_last)
    with autocast:
        out["inception_autocast_channels_last"] = timed(
            lambda: [extractor(chunk.contiguous(memory_format=torch.channels_last))
                     for chunk in gpu_images.split(args.feature_batch)])
    del extractor, gpu_images
    started = time.perf_counter()
    level_noises(4, T, C, list(range(200)), "cpu")
    out["level_noises_cpu_1thread"] = round((time.perf_counter() - started) * 1000 * 1000 / 200, 1)
    canvases = np.stack([x[:40].float().cpu().numpy()] * 4)
    started = time.process_time()
    structure_chunk(canvases, None, 0.05, hierarchy_spec(HierarchyConfig()), 0)
    out["structure_cpu_1proc"] = round((time.process_time() - started) * 1000 * 1000 / 40, 1)
    print("profile, ms per 1000 samples:", out, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="folder for evaluation.json (default bench/results)")
    parser.add_argument("--size", choices=sorted(SIZES), default="imagenet")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--feature-batch", type=int, default=500, help="batch of the DINOv2 / Inception passes")
    parser.add_argument("--real", type=int, default=2000, help="synthetic real images for the reference")
    parser.add_argument("--warmup", type=int, default=None, help="samples of the untimed warm-up (2 batches)")
    parser.add_argument("--structure-workers", type=int, default=max(0, (os.cpu_count() or 1) - 5))
    parser.add_argument("--noise-threads", type=int, default=4)
    parser.add_argument("--inflight", type=int, default=12, help="batches handed to structure workers, not done")
    parser.add_argument("--structure-samples", type=int, default=10_000, help="-1: every sample")
    parser.add_argument("--reencode", type=int, default=512)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--tag", default="", help="suffix of the result name (evaluation<tag>.json)")
    parser.add_argument("--no-overlap", action="store_true", help="feature passes in the main thread")
    parser.add_argument("--profile", action="store_true", help="also time the parts on one batch (untimed)")
    args = parser.parse_args()

    from models.decoder import DecoderSpec, TokenDecoder
    from models.generator.dit import TrajectoryDiT, dit_config
    from models.encoder import build_encoder, encode_images
    from models.evaluation.fidelity import dinov2_feature_fn, inception_feature_fn
    from models.hierarchy.reference import region_canvas
    from models.evaluation.streaming_eval import PHASES, Runtime, Scorers, evaluate_streaming, metric_values, reference_stats
    from storage.config import TFConfig
    from tasks.plan import eval_plan, hierarchy_spec
    from tasks.evaluate.structure_pool import process_structure

    size = SIZES[args.size]
    device = torch.device(args.device)
    levels = 4
    torch.set_num_threads(max(1, args.noise_threads))
    print(f"device {device}, {os.cpu_count()} CPUs, structure workers {args.structure_workers}, "
          f"noise threads {args.noise_threads}, batch {args.batch_size}", flush=True)

    # --- models -------------------------------------------------------------------------------
    started = time.perf_counter()
    encoder, _ = build_encoder(size["encoder"], size["image"], None, allow_random_init=True)
    encoder = encoder.to(device).eval()
    grid, dim = encoder.patch_embed.grid_size[0], encoder.embed_dim
    generators = []
    for level in range(levels):
        torch.manual_seed(100 + level)
        config = dit_config(size["preset"], token_dim=dim, grid=grid, num_classes=size["classes"], num_levels=levels)
        generators.append(randomise_zero_layers(TrajectoryDiT(config)).to(device).eval())
    decoder = TokenDecoder(DecoderSpec(token_dim=dim, grid=grid, patch=size["image"] // grid, width=size["dec_width"],
                                         depth=size["dec_depth"], heads=size["dec_heads"]))
    decoder = randomise_zero_layers(decoder).to(device).eval()
    workdir = tempfile.mkdtemp(prefix="tf-bench-eval-")
    inception_path = random_inception_weights(os.path.join(workdir, "inception-random.pth"))
    inception_fn = inception_feature_fn(inception_path, device, batch_size=args.feature_batch)
    dinov2_fn = dinov2_feature_fn(encoder, device, batch_size=args.feature_batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - started
    params = {"generator_M": sum(p.numel() for p in generators[0].parameters()) / 1e6,
              "decoder_M": decoder.num_params() / 1e6, "encoder_M": sum(p.numel() for p in encoder.parameters()) / 1e6}
    print(f"built in {build_s:.1f}s: {params}", flush=True)

    # --- real side ----------------------------------------------------------------------------
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    partitions = [p.to(device) for p in block_partitions(grid, levels)]
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def real_batches():
        chunk = args.feature_batch
        for begin in range(0, args.real, chunk):
            images = rng.integers(0, 256, size=(min(chunk, args.real - begin), size["image"], size["image"], 3),
                                  dtype=np.uint8)
            tokens = torch.from_numpy(encode_images(encoder, images, device=device, batch_size=chunk, dtype=dtype))
            tokens = tokens.to(device).reshape(len(images), grid * grid, dim)
            tokens = (tokens - tokens.mean((0, 1))) / tokens.std((0, 1)).clamp(min=1e-6)
            canvases = [region_canvas(tokens, ids.expand(len(images), -1)) for ids in partitions] + [tokens]
            yield images, canvases

    reference = reference_stats(real_batches(), dinov2_fn, inception_fn=inception_fn, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    reference_s = time.perf_counter() - started
    print(f"reference over {args.real} real images in {reference_s:.1f}s", flush=True)

    structure_samples = None if args.structure_samples < 0 else args.structure_samples
    cfg = TFConfig()
    scorers = Scorers(dinov2_fn, inception_fn, encoder=encoder, hierarchy_spec=hierarchy_spec(cfg.hierarchy))
    # the default config's evaluation at the bench's sizes (label_seed 0: the labels the bench always drew)
    plan = dataclasses.replace(eval_plan(cfg, keep=args.keep), batch_size=args.batch_size,
                               reencode_samples=args.reencode, structure_samples=structure_samples, label_seed=0)
    runtime = Runtime(device, structure_runner=process_structure(args.structure_workers, args.inflight),
                      noise_threads=args.noise_threads, overlap_features=not args.no_overlap and device.type == "cuda")
    label_pool = np.arange(size["classes"])

    # --- warm-up (cuDNN / cuBLAS choices, allocator), untimed ----------------------------------
    started = time.perf_counter()
    warmup = args.warmup if args.warmup is not None else min(2 * args.batch_size, args.samples)
    if warmup:
        evaluate_streaming(generators, decoder, np.arange(10**9, 10**9 + warmup), label_pool, scorers,
                           dataclasses.replace(plan, structure_samples=min(100, warmup), reencode_samples=16), runtime)
    warmup_s = time.perf_counter() - started
    print(f"warm-up ({warmup} samples) {warmup_s:.1f}s", flush=True)
    profile = profile_parts(generators, decoder, dinov2_fn, inception_path, device, args) if args.profile else {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # --- the timed evaluation -----------------------------------------------------------------
    every = max(1, math.ceil(args.samples / args.batch_size / 10))

    def progress(done: int, total: int, timing: dict) -> None:
        if (done // args.batch_size) % every == 0 or done == total:
            parts = " ".join(f"{k}={v:.1f}" for k, v in timing.items())
            print(f"  {done}/{total} {parts}", flush=True)

    seeds = np.arange(args.samples, dtype=np.int64)
    started = time.perf_counter()
    result = evaluate_streaming(generators, decoder, seeds, label_pool, scorers, plan,
                                dataclasses.replace(runtime, progress=progress))
    engine_s = time.perf_counter() - started
    values = metric_values(result, reference)
    eval_s = time.perf_counter() - started
    metrics_s = eval_s - engine_s
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0

    figures = {"eval_50k_s" if args.samples == 50_000 else f"eval_{args.samples}_s": (round(eval_s, 2), "s"),
               "samples_per_s": (round(args.samples / eval_s, 1), "samples/s"),
               "engine_s": (round(engine_s, 2), "s"), "metrics_s": (round(metrics_s, 2), "s")}
    for phase in PHASES:
        figures[f"{phase}_s"] = (round(result.timing[phase], 2), "s")
    figures["features_busy_s"] = (round(result.timing["features_busy"], 2), "s (feature thread, overlapped)")
    figures["structure_copy_s"] = (round(result.timing["structure_copy"], 2), "s (inside structure_s)")
    figures["structure_cpu_s"] = (round(result.timing["structure_cpu"], 1), "CPU s (summed over workers)")
    figures.update({"build_s": (round(build_s, 2), "s"), "reference_s": (round(reference_s, 2), "s"),
                    "warmup_s": (round(warmup_s, 2), "s"), "peak_gpu_mem": (round(peak, 2), "GiB")})
    summary = {f"{v.group}/{v.metric}" + (f"/L{v.level}" if v.level >= 0 else "") + (f"/{v.variant}" if v.variant else ""):
               round(float(np.nanmean(v.values)), 5) for v in values}
    extra = {"counts": result.counts, "metric_values": summary, "params_M": params, "profile_ms": profile,
             "config": {"size": args.size, "samples": args.samples, "batch_size": args.batch_size,
                        "feature_batch": args.feature_batch, "real": args.real,
                        "structure_workers": args.structure_workers, "noise_threads": args.noise_threads,
                        "inflight": args.inflight, "reencode": args.reencode, "keep": args.keep,
                        "structure_samples": structure_samples, "warmup": warmup,
                        "overlap_features": runtime.overlap_features,
                        "torch": torch.__version__, "cpus": os.cpu_count(),
                        "weights": "random (shapes of the ImageNet configuration); synthetic real set"}}
    path = results_io.write_result("evaluation" + args.tag, figures, extra, args.out)
    print(path.read_text(), flush=True)


if __name__ == "__main__":
    main()
