"""Trajectory Forcing (one generator per level) against the flat baseline (one one-step model straight
to the final latent) at equal training wall-clock, scored by the evaluation engine (DESIGN §3, §4).

    python bench/tf_vs_flat.py --device cuda --image-size 224 --seconds-per-method 150      # the H200 run
    python bench/tf_vs_flat.py --device cpu --image-size 56 --seconds-per-method 20 \\
        --images 256 --samples 128 --preset tiny --out /tmp/tfvf                              # a CPU check

Runs where only torch, timm, numpy, scipy, scikit-learn, pandas, xarray, zarr and torch-fidelity
exist: no prefect / dask / pydantic imports. The stages are done in this process with the functions
the stage workers use, in memory instead of stores: the built-in scenes (storage.scenes), DINOv2
patch tokens (models.encoder, bf16 on CUDA) and per-channel statistics (models.channel_stats), the
teacher hierarchy (models.hierarchy, a CPU pool) and its canvases (tasks.level_data), the decoder
(models.train_loop.train_decoder, its own budget, shared by both methods), then:

  - TF: one generator per level (tasks.level_data.level_data), each trained for seconds / L;
  - flat: one generator on the raw latent (models.flat.flat_level_data), trained for all the seconds;

same backbone (DiT preset), batch, optimiser, EMA and objective (the region term is TF's: the flat
model has no regions). The budget is wall-clock of the training steps alone (after an untimed
warm-up of the kernels); the learning rate is constant after warm-up, so a budget cut ends nothing
half-scheduled. Both are then evaluated by models.streaming_eval.evaluate_streaming (mode "staged" /
"flat") against models.eval_stats.reference_stats of the real side, the path tasks/evaluate.py
takes: FD-DINOv2 of the decoded final, per-level FD (TF: every level; flat: the final only),
re-encode ARI / mIoU (against the hierarchy rebuilt on the final: both methods; against the plan:
TF), nesting and plan adherence (TF), the decoder's held-out PSNR / SSIM; FID only with
--inception-weights (else skipped). The same seeds give both methods the same labels and the same
final-level noise. real_split_fd_dinov2 is the FD-DINOv2 between two halves of the real set: the
floor at this n.

The encoder is random-init (no weights ship with the project): its features only prove the wiring;
the FD-DINOv2 and re-encode figures compare the methods under a random feature map, not under DINOv2.
Writes <out>/tf_vs_flat.json (default bench/results/) and a grid of kept trajectories (rows = samples,
columns = TF levels 0..L-1 decoded, then the flat final) to --figure (default
docs/tf_vs_flat_trajectories.png).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import results_io  # noqa: E402
from models.channel_stats import chunk_moments, mean_std  # noqa: E402
from models.decoder import DecoderConfig, TokenDecoder, images_to_tensor, tensor_to_images  # noqa: E402
from models.dit import TrajectoryDiT, dit_config  # noqa: E402
from models.encoder import build_encoder, encode_images  # noqa: E402
from models.eval_stats import reference_stats  # noqa: E402
from models.fidelity import dinov2_feature_fn, fidelity_unavailable_reason, inception_feature_fn  # noqa: E402
from models.flat import flat_level, flat_level_data  # noqa: E402
from models.hierarchy import HierarchySpec, build_hierarchies  # noqa: E402
from models.image_metrics import psnr, ssim  # noqa: E402
from models.meanflow import MeanFlowConfig  # noqa: E402
from models.metrics import frechet_distance  # noqa: E402
from models.streaming_eval import evaluate_streaming, metric_values  # noqa: E402
from models.train_loop import OptimConfig, train_decoder, train_generator  # noqa: E402
from models.train_state import ema_name  # noqa: E402
from storage.scenes import render_scene  # noqa: E402
from tasks.level_data import Latents, canvases, level_data  # noqa: E402
from tasks.structure_pool import process_structure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --- data (what the ingest / encode / hierarchy stage workers compute) -------------------------------

def _render(job: tuple[int, int, int]) -> tuple[np.ndarray, int, np.ndarray]:
    index, seed, size = job
    scene = render_scene(index, seed, size)
    return scene.image, scene.label, scene.masks


def _hierarchy(job: tuple[np.ndarray, object]) -> np.ndarray:
    tokens, spec = job
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return build_hierarchies(tokens, spec)


def build_data(args, device: torch.device, spec, workers: int) -> dict:
    """Scenes -> raw DINOv2 tokens -> normalised latents + teacher regions + canvases, all in memory."""
    timing = {}
    started = time.perf_counter()
    jobs = [(i, args.scene_seed, args.image_size) for i in range(args.images)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        rendered = pool.map(_render, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
    images = np.stack([r[0] for r in rendered])
    labels = np.array([r[1] for r in rendered], np.int64)
    timing["render_s"] = time.perf_counter() - started

    started = time.perf_counter()
    encoder, weights_label = build_encoder(args.encoder, args.image_size, args.encoder_weights, True)
    encoder = encoder.to(device).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else None
    raw = encode_images(encoder, images, device=device, batch_size=args.encode_batch, dtype=dtype)
    count, mean, m2 = chunk_moments(raw)
    mean, std = mean_std(np.array([count]), mean[None], m2[None])
    grid, dim = raw.shape[1], raw.shape[-1]
    tokens = torch.from_numpy((raw.reshape(len(raw), grid * grid, dim) - mean) / std)
    timing["encode_s"] = time.perf_counter() - started

    started = time.perf_counter()
    step = max(1, -(-len(raw) // (4 * workers)))
    standardised = ((raw - mean) / std).astype(np.float32)   # the hierarchy clusters what the generators see
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_hierarchy, [(standardised[i:i + step], spec) for i in range(0, len(raw), step)])
    regions = torch.from_numpy(np.concatenate(parts).reshape(len(raw), spec.num_levels, -1).astype(np.int64))
    timing["hierarchy_s"] = time.perf_counter() - started
    return {"images": images, "labels": torch.from_numpy(labels), "tokens": tokens, "regions": regions,
            "canvases": canvases(tokens, regions), "mean": mean, "std": std, "grid": grid, "dim": dim,
            "encoder": encoder, "weights_label": weights_label, "timing": timing}


# --- training at a wall-clock budget ---------------------------------------------------------------

def budget_stop(optim, seconds: float, device: torch.device):
    """(on_step, begin): on_step ends training (optim.steps = steps done) once `seconds` have passed since
    begin(). Every step already syncs (the loop reads its loss as a float): the clock sees finished work."""
    started = [0.0]

    def on_step(step: int, stats: dict) -> None:
        if time.perf_counter() - started[0] >= seconds:
            optim.steps = step + 1

    def begin() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started[0] = time.perf_counter()

    return on_step, begin


def ema_settings(spec: str) -> tuple[dict, str]:
    """--ema: 'edm' (EDM half-life 500 kimg ramped up to 5 % of the images seen: the configs' default) or
    a constant decay such as 0.99 -> (OptimConfig EMA fields, the sampled EMA's name)."""
    if spec == "edm":
        return {"ema_decays": [], "ema_halflives_kimg": [500.0]}, ema_name(halflife_kimg=500.0)
    return {"ema_decays": [float(spec)]}, ema_name(float(spec))


def train_generator_for(seconds: float, model, data, level: int, args, device: torch.device, seed: int) -> dict:
    emas, sampled = ema_settings(args.ema)
    optim = OptimConfig(steps=10**9, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                        grad_clip=1.0, seed=seed, **emas)
    objective = MeanFlowConfig(jvp_attention=args.jvp_attention, v_tangent=args.v_tangent)
    on_step, begin = budget_stop(optim, seconds, device)
    begin()
    started = time.perf_counter()
    state = train_generator(model, data, level, objective, optim, str(device), on_step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    losses = state.history["loss"]
    tail = losses[-max(1, len(losses) // 10):]
    return {"model": state.ema(sampled).to(device).eval(), "steps": state.step, "seconds": elapsed,
            "final_loss": float(np.mean(tail))}


def warm_up(model_fn, data, level: int, args, device: torch.device) -> None:
    """A few untimed steps on a throwaway model: kernel choices, allocator, Triton compiles."""
    optim = OptimConfig(steps=3, batch_size=args.batch_size, lr=args.lr, warmup_steps=1, **ema_settings(args.ema)[0])
    train_generator(model_fn(), data, level, MeanFlowConfig(jvp_attention=args.jvp_attention), optim, str(device))


# --- the figure ------------------------------------------------------------------------------------

def trajectory_figure(path: Path, staged_images: np.ndarray, flat_images: np.ndarray, rows: int) -> None:
    """rows x (L TF levels decoded + the flat final), a header naming the columns."""
    from PIL import Image, ImageDraw

    rows = min(rows, len(staged_images), len(flat_images))
    cells = np.concatenate([staged_images[:rows], flat_images[:rows, -1:]], 1)   # [R, L + 1, H, W, 3]
    r, c, size, _, _ = cells.shape
    pad, header = 2, 14
    grid = np.full((r * (size + pad) + pad, c * (size + pad) + pad, 3), 255, np.uint8)
    for i in range(r):   # storage.trajectory_store.image_grid's layout (that module pulls in pydantic)
        for j in range(c):
            grid[pad + i * (size + pad):pad + i * (size + pad) + size, pad + j * (size + pad):pad + j * (size + pad) + size] = cells[i, j]
    out = Image.new("RGB", (grid.shape[1], grid.shape[0] + header), "white")
    out.paste(Image.fromarray(grid), (0, header))
    draw = ImageDraw.Draw(out)
    names = [f"TF L{level}" for level in range(staged_images.shape[1])] + ["flat"]
    for column, name in enumerate(names):
        draw.text((pad + column * (size + pad) + 2, 1), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


# --- main ------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=4096, help="built-in scenes rendered (training and real set)")
    parser.add_argument("--scene-seed", type=int, default=0)
    parser.add_argument("--encoder", default="vit_small_patch14_reg4_dinov2", help="the scenes config's encoder")
    parser.add_argument("--encoder-weights", default=None, help="a local DINOv2 file (default: random-init)")
    parser.add_argument("--encode-batch", type=int, default=256)
    parser.add_argument("--seconds-per-method", type=float, default=150.0,
                        help="training wall-clock per method: TF splits it over its levels, flat gets all of it")
    parser.add_argument("--decoder-seconds", type=float, default=None, help="default: seconds-per-method / 3")
    parser.add_argument("--preset", default="S", help="DiT preset of both methods (tiny, S, B, L, H)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--head-depth", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--ema", default="edm", help="the EMA sampled: edm (the configs') or a constant decay")
    parser.add_argument("--v-tangent", default="h0", choices=["h0", "same"])
    parser.add_argument("--jvp-attention", default="auto", choices=["auto", "kernel", "math"])
    parser.add_argument("--decoder-width", type=int, default=256)
    parser.add_argument("--decoder-depth", type=int, default=4)
    parser.add_argument("--decoder-heads", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2048, help="generated samples per method")
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--reencode", type=int, default=512)
    parser.add_argument("--structure-samples", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="CPU processes for scenes, hierarchy and structure values")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 4 on cuda, 1 on cpu: on a shared CPU more threads spin)")
    parser.add_argument("--inception-weights", default=None, help="local pt_inception weights (FID); else skipped")
    parser.add_argument("--grid-rows", type=int, default=8)
    parser.add_argument("--out", default=None, help="folder for tf_vs_flat.json (default bench/results)")
    parser.add_argument("--figure", default=str(ROOT / "docs" / "tf_vs_flat_trajectories.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    decoder_seconds = args.decoder_seconds if args.decoder_seconds is not None else args.seconds_per_method / 3

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or (4 if device.type == "cuda" else 1))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = HierarchySpec(cuts=(0.65, 0.35))   # the scenes / reference defaults: k=2, lambda 0.2, average linkage
    levels = spec.num_levels + 1
    wall = time.perf_counter()
    print(f"device {device}, {os.cpu_count()} CPUs, {args.images} scenes at {args.image_size} px, "
          f"{args.seconds_per_method:.0f} s per method", flush=True)

    data = build_data(args, device, spec, args.workers)
    grid, dim = data["grid"], data["dim"]
    num_classes = int(data["labels"].max()) + 1
    print(f"data: grid {grid}x{grid}, C {dim}, {data['timing']}", flush=True)

    # --- decoder (shared: both methods are decoded by it) -------------------------------------
    patch = args.image_size // grid
    decoder = TokenDecoder(DecoderConfig(token_dim=dim, grid=grid, patch=patch, width=args.decoder_width,
                                         depth=args.decoder_depth, heads=args.decoder_heads))
    pixels = images_to_tensor(data["images"])
    held = max(1, len(pixels) // 10)
    optim = OptimConfig(steps=10**9, batch_size=min(args.batch_size, 128), lr=1e-3, warmup_steps=20,
                        seed=args.seed, **ema_settings("edm")[0])
    on_step, begin = budget_stop(optim, decoder_seconds, device)
    begin()
    started = time.perf_counter()
    state = train_decoder(decoder, data["tokens"][:-held], pixels[:-held], optim, str(device), on_step)
    decoder_s = time.perf_counter() - started
    decoder = state.ema(ema_settings("edm")[1]).to(device).eval()
    with torch.no_grad():
        recon = np.concatenate([tensor_to_images(decoder(b.to(device)).float().cpu())
                                for b in data["tokens"][-held:].split(64)])
    truth = data["images"][-held:]
    decoder_psnr = float(np.mean([psnr(a, b) for a, b in zip(recon, truth)]))
    decoder_ssim = float(np.mean([ssim(a, b) for a, b in zip(recon, truth)]))
    print(f"decoder: {state.step} steps in {decoder_s:.1f}s, held-out PSNR {decoder_psnr:.2f} dB", flush=True)

    # --- generators at equal wall-clock ----------------------------------------------------------
    overrides = {k: v for k, v in (("width", args.width), ("depth", args.depth), ("head_depth", args.head_depth),
                                   ("heads", args.heads)) if v is not None}

    def new_model(seed: int) -> TrajectoryDiT:
        torch.manual_seed(seed)
        return TrajectoryDiT(dit_config(args.preset, token_dim=dim, grid=grid, num_classes=num_classes,
                                        num_levels=levels, **overrides))

    latents = Latents(data["tokens"], data["labels"], np.arange(len(data["tokens"])), data["mean"], data["std"],
                      grid, data["weights_label"])
    level_sets = [level_data(latents, data["regions"], level) for level in range(levels)]
    flat_set = flat_level_data(data["tokens"], data["labels"])
    warm_up(lambda: new_model(10**6), level_sets[1], 1, args, device)
    staged, trained = [], {}
    for level in range(levels):
        out = train_generator_for(args.seconds_per_method / levels, new_model(args.seed + level), level_sets[level],
                                  level, args, device, args.seed + level)
        staged.append(out["model"])
        trained[f"tf_L{level}"] = {k: v for k, v in out.items() if k != "model"}
        print(f"TF level {level}: {out['steps']} steps in {out['seconds']:.1f}s, loss {out['final_loss']:.4f}",
              flush=True)
    out = train_generator_for(args.seconds_per_method, new_model(args.seed), flat_set, flat_level(levels), args,
                              device, args.seed)
    flat_model = out["model"]
    trained["flat"] = {k: v for k, v in out.items() if k != "model"}
    print(f"flat: {out['steps']} steps in {out['seconds']:.1f}s, loss {out['final_loss']:.4f}", flush=True)
    params_m = sum(p.numel() for p in flat_model.parameters()) / 1e6

    # --- evaluation: the engine tasks/evaluate.py runs ---------------------------------------------
    started = time.perf_counter()
    encoder = data["encoder"]
    dinov2_fn = dinov2_feature_fn(encoder, device, batch_size=args.encode_batch)
    inception_reason = fidelity_unavailable_reason(args.inception_weights)
    inception_fn = None if inception_reason else inception_feature_fn(args.inception_weights, device)
    images = data["images"]

    def real_batches(index: np.ndarray, with_levels: bool):
        for begin_ in range(0, len(index), args.eval_batch):
            rows = index[begin_:begin_ + args.eval_batch]
            yield images[rows], ([c[rows] for c in data["canvases"]] if with_levels else [])

    everything = np.arange(len(images))
    reference = reference_stats(real_batches(everything, True), dinov2_fn, inception_fn=inception_fn, device=device)
    half = len(images) // 2
    split = [reference_stats(real_batches(part, False), dinov2_fn, device=device)
             for part in (everything[:half], everything[half:])]
    real_split = frechet_distance(split[0]["fd_dinov2.mean"], split[0]["fd_dinov2.cov"],
                                  split[1]["fd_dinov2.mean"], split[1]["fd_dinov2.cov"])
    reference_s = time.perf_counter() - started

    seeds = 1_000_003 * args.seed + np.arange(args.samples)
    common = dict(inception_fn=inception_fn, encoder=encoder, hierarchy_spec=spec, device=device,
                  batch_size=args.eval_batch, keep=max(args.grid_rows, 2), reencode_samples=args.reencode,
                  structure_samples=args.structure_samples, structure_runner=process_structure(args.workers, 4),
                  latent_stats=(data["mean"], data["std"]))
    label_pool = data["labels"].numpy()
    results, eval_s = {}, {}
    for name, models, mode in (("tf", staged, "staged"), ("flat", [flat_model], "flat")):
        started = time.perf_counter()
        results[name] = evaluate_streaming(models, decoder, seeds, label_pool, dinov2_fn, mode=mode, **common)
        eval_s[name] = time.perf_counter() - started
        print(f"evaluated {name}: {args.samples} samples in {eval_s[name]:.1f}s", flush=True)

    # --- figures -----------------------------------------------------------------------------------
    figures: dict[str, tuple[float, str]] = {}
    summary: dict[str, dict] = {}
    for name, result in results.items():
        values = metric_values(result, reference, kid_subset_size=max(2, min(1000, args.samples // 2)))
        rows = {}
        for v in values:
            finite = v.values[np.isfinite(v.values)]
            if not len(finite):
                continue
            key = v.metric + (f"_L{v.level}" if v.level >= 0 else "") + (f"_{v.variant}" if v.variant else "")
            rows[key] = round(float(finite.mean()), 5)
        summary[name] = rows
        for key, value in rows.items():
            unit = "FD" if key.startswith(("fd", "fid")) else ("ARI" if "ari" in key else
                                                               "mIoU" if "miou" in key else "")
            figures[f"{name}_{key}"] = (value, unit or "score")
        figures[f"{name}_train_s"] = (round(sum(t["seconds"] for k, t in trained.items()
                                                if k.startswith(name + "_") or k == name), 2), "s")
        figures[f"{name}_eval_s"] = (round(eval_s[name], 2), "s")
    for key, t in trained.items():
        figures[f"{key}_steps"] = (t["steps"], "steps")
        figures[f"{key}_final_loss"] = (round(t["final_loss"], 5), "loss")
    figures["real_split_fd_dinov2"] = (round(float(real_split), 5), "FD")
    figures["decoder_holdout_psnr"] = (round(decoder_psnr, 3), "dB")
    figures["decoder_holdout_ssim"] = (round(decoder_ssim, 4), "SSIM")
    figures["decoder_steps"] = (state.step, "steps")
    figures["wall_s"] = (round(time.perf_counter() - wall, 1), "s")

    figure = Path(args.figure)
    trajectory_figure(figure, results["tf"].kept.images, results["flat"].kept.images, args.grid_rows)
    skipped = {"fid": inception_reason or "", "flat: per-level FD below the final, nesting, plan adherence, "
               "plan re-encode": "flat baseline: no staged canvases (one step straight to the latent)"}
    extra = {
        "budget": {"seconds_per_method": args.seconds_per_method, "tf_seconds_per_level": args.seconds_per_method / levels,
                   "flat_seconds": args.seconds_per_method, "decoder_seconds": decoder_seconds,
                   "what": "wall-clock of the training steps alone, after an untimed kernel warm-up"},
        "setup": {"images": args.images, "image_size": args.image_size, "grid": grid, "token_dim": dim,
                  "encoder": args.encoder, "encoder_weights": data["weights_label"], "preset": args.preset,
                  "generator_overrides": overrides, "params_M_per_model": round(params_m, 2),
                  "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema, "samples": args.samples,
                  "reencode_samples": args.reencode, "structure_samples": args.structure_samples,
                  "autocast": "bf16" if device.type == "cuda" else "none", "device": str(device),
                  "torch": torch.__version__, "hierarchy": {"k": spec.k, "lam": spec.lam, "cuts": list(spec.cuts)}},
        "timing_s": {**{k: round(v, 2) for k, v in data["timing"].items()}, "decoder_train_s": round(decoder_s, 2),
                     "reference_s": round(reference_s, 2)},
        "metrics": summary, "skipped": skipped, "figure": str(figure),
        "note": ("encoder_weights random-init: the latents, the FD-DINOv2 features and the re-encoder are a random "
                 "ViT, so the comparison is wiring-level for everything measured through encoder features; "
                 "equal training wall-clock per method, TF split evenly over its levels"
                 if data["weights_label"] == "random-init" else "encoder weights: " + data["weights_label"]),
    }
    path = results_io.write_result("tf_vs_flat", figures, extra, args.out)
    print(path.read_text(), flush=True)


if __name__ == "__main__":
    main()
