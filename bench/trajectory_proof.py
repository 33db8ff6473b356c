"""Does staged generation work on the built-in world? Flat against Trajectory Forcing at equal GPU time
(issue 16): arms flat; TF with one generator per level and TF with one shared generator, each with the
clustered teacher and with the oracle (ground-truth) teacher. Judged by the scenes judge (DESIGN §4).

    python bench/trajectory_proof.py --device cuda --work /tmp/proof --deadline 540     # one H200 call
    (run it again with the same --work to continue: every phase's output is kept there, so a chain of
    device calls of at most 10 minutes each adds up to one run)
    python bench/trajectory_proof.py --device cpu --image-size 56 --images 192 --budget 8 --samples 64 \\
        --preset tiny --judge-steps 40 --decoder-seconds 4 --work /tmp/proof-cpu --out /tmp/proof-cpu  # a CPU check

No prefect / dask / pydantic (the GPU box lacks them; carry the zarr and torch-fidelity wheels): the stages run in this process with the functions their workers
call, in memory: the built-in scenes (storage.scenes), DINOv2 tokens (models.encoder) and their
per-channel statistics, the clustered teacher (models.hierarchy.reference.build_hierarchies on the standardised
latents, as the hierarchy stage) and the oracle teacher (models.hierarchy.reference.ground_truth_hierarchies,
as hierarchy.source: ground_truth), the decoder (models.generator.train_loop.train_decoder) and the scenes judge
(models.evaluation.judge.train_judge, real scenes only, the last --judge-holdout of them held out). Generators
train with models.generator.train_loop.train_generator (shared: the list form, one level per step) and are
scored by models.evaluation.streaming_eval.evaluate_streaming with the judge's streaming fn: the engine
tasks/evaluate.py runs.

Budget: every arm gets --budget seconds of training steps (wall-clock after a kernel warm-up, with
the time spent copying curve snapshots excluded); TF per level splits it evenly over its levels. EMA
snapshots at --curve fractions of the budget give the learning curves: each is evaluated on
--curve-samples samples, the last on --samples with re-encode agreement. FD-scenes at fraction 1/2
against 1 is the doubling check (the issue's "doubling the budget changes FD-scenes by < 10 %").

Diagnosis (docs/trajectory.md): for the TF arms, each level l > 0 is also sampled conditioned on the
teacher's level-(l-1) canvas of real scenes (teacher-forced), beside its own generated canvas; the
per-level token FD of both, and FD-scenes / class accuracy of the final decoded after a teacher-forced
level 2, separate what each level can do from what it inherits.

Writes <out>/trajectory_proof.json (default bench/results/) and --figure: per arm, sample rows of every
level decoded, each level's own regions outlined (flat: the final alone).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import results_io  # noqa: E402
from models.channel_stats import chunk_moments, mean_std  # noqa: E402
from models.decoder import DecoderConfig, TokenDecoder, images_to_tensor, tensor_to_images  # noqa: E402
from models.generator.dit import TrajectoryDiT, dit_config  # noqa: E402
from models.encoder import build_encoder, encode_images  # noqa: E402
from models.evaluation.eval_stats import JUDGE, reference_stats  # noqa: E402
from models.evaluation.fidelity import dinov2_feature_fn  # noqa: E402
from models.generator.flat import flat_level, flat_level_data  # noqa: E402
from models.hierarchy.reference import HierarchySpec, build_hierarchies, ground_truth_hierarchies  # noqa: E402
from models.evaluation.image_metrics import psnr, ssim  # noqa: E402
from models.evaluation.judge import (JudgeTraining, SceneJudge, SceneJudgeConfig, class_slots, holdout_scores,  # noqa: E402
                          judge_features, judge_fn, judge_outputs, train_judge)
from models.generator.meanflow import MeanFlowConfig  # noqa: E402
from models.evaluation.metrics import REGION_THRESHOLD, adjusted_rand, feature_stats, frechet_distance  # noqa: E402
from models.evaluation.streaming_eval import EvalPlan, Runtime, Scorers, evaluate_streaming, metric_values  # noqa: E402
from models.generator.train_loop import OptimConfig, train_decoder, train_generator  # noqa: E402
from models.generator.train_state import ema_name  # noqa: E402
from models.generator.trajectory import level_noises, one_step_level  # noqa: E402
from storage.scenes import masks_to_grid, render_scene  # noqa: E402
from tasks.level_data import Latents, canvases, level_data  # noqa: E402
from tasks.structure_pool import process_structure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = {   # name: (sharing, teacher); flat reads no teacher
    "flat": ("flat", None),
    "tf_levels_clustered": ("levels", "clustered"),
    "tf_levels_oracle": ("levels", "oracle"),
    "tf_shared_clustered": ("shared", "clustered"),
    "tf_shared_oracle": ("shared", "oracle"),
}
EMA_KIMG = 500.0   # the configs' EDM half-life, ramped up to 5 % of the images seen


# --- data: what the ingest / encode / hierarchy stage workers compute ------------------------------

def _render(job: tuple[int, int, int]) -> tuple[np.ndarray, int, np.ndarray]:
    index, seed, size = job
    scene = render_scene(index, seed, size)
    return scene.image, scene.label, scene.masks


def _hierarchy(job: tuple[np.ndarray, HierarchySpec]) -> np.ndarray:
    tokens, spec = job
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return build_hierarchies(tokens, spec)


def prepare_data(args, device: torch.device, spec: HierarchySpec) -> dict:
    timing, started = {}, time.perf_counter()
    jobs = [(i, args.scene_seed, args.image_size) for i in range(args.images)]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        rendered = pool.map(_render, jobs, chunksize=max(1, len(jobs) // (4 * args.workers)))
    images = np.stack([r[0] for r in rendered])
    labels = np.array([r[1] for r in rendered], np.int64)
    masks = np.stack([r[2] for r in rendered])
    timing["render_s"] = time.perf_counter() - started

    started = time.perf_counter()
    encoder, weights_label = build_encoder(args.encoder, args.image_size, args.encoder_weights, True)
    encoder = encoder.to(device).eval()
    raw = encode_images(encoder, images, device=device, batch_size=256,
                        dtype=torch.bfloat16 if device.type == "cuda" else None)
    count, mean, m2 = chunk_moments(raw)
    mean, std = mean_std(np.array([count]), mean[None], m2[None])
    grid, dim = raw.shape[1], raw.shape[-1]
    standardised = ((raw - mean) / std).astype(np.float32)
    timing["encode_s"] = time.perf_counter() - started

    started = time.perf_counter()
    step = max(1, -(-len(raw) // (4 * args.workers)))
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        parts = pool.map(_hierarchy, [(standardised[i:i + step], spec) for i in range(0, len(raw), step)])
    regions = {"clustered": np.concatenate(parts).reshape(len(raw), spec.partition_levels, -1).astype(np.int64),
               "oracle": ground_truth_hierarchies(masks, grid).reshape(len(raw), spec.partition_levels, -1).astype(np.int64)}
    timing["hierarchy_s"] = time.perf_counter() - started
    return {"images": images, "labels": labels, "masks": masks, "tokens": standardised.reshape(len(raw), -1, dim),
            "mean": mean, "std": std, "grid": grid, "dim": dim, "regions": regions,
            "encoder_state": {k: v.cpu() for k, v in encoder.state_dict().items()},
            "weights_label": weights_label, "timing": timing}


# --- training at a wall-clock budget, with curve snapshots -----------------------------------------

class BudgetClock:
    """Seconds of training steps, with pauses (snapshot copies) left out."""

    def __init__(self, device: torch.device):
        self.device, self.spent, self.since = device, 0.0, None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self.since = time.perf_counter()

    def pause(self) -> None:
        self._sync()
        self.spent += time.perf_counter() - self.since
        self.since = None

    def elapsed(self) -> float:
        return self.spent + (time.perf_counter() - self.since if self.since is not None else 0.0)


def _pack(value):
    """Phase outputs in what torch.load(weights_only=True) reads back (no pickle): numpy arrays as tagged
    tensors, numpy scalars as Python numbers, tuples as lists."""
    if isinstance(value, np.ndarray):
        return {"__numpy__": torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_pack(v) for v in value]
    return value


def _unpack(value):
    if isinstance(value, dict):
        if set(value) == {"__numpy__"}:
            return value["__numpy__"].numpy()
        return {k: _unpack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v) for v in value]
    return value


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def train_unit(model: TrajectoryDiT, data, level, seconds: float, fractions: list[float], args,
               device: torch.device, seed: int) -> dict:
    """Train one model for `seconds` of steps; EMA snapshots when the clock passes each fraction."""
    optim = OptimConfig(steps=10**9, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                        grad_clip=1.0, seed=seed, ema_decays=[], ema_halflives_kimg=[EMA_KIMG],
                        checkpoint_every=args.snapshot_every)
    objective = MeanFlowConfig(v_tangent=args.v_tangent, jvp_attention=args.jvp_attention,
                               cond_noise=args.cond_noise)
    sampled = ema_name(halflife_kimg=EMA_KIMG)
    clock, snapshots, steps_at, pending = BudgetClock(device), {}, {}, sorted(fractions)

    def on_step(step: int, stats: dict) -> None:
        if clock.elapsed() >= seconds:
            optim.steps = step + 1

    def on_checkpoint(state) -> None:
        while pending and pending[0] < 1.0 and clock.elapsed() >= pending[0] * seconds:
            clock.pause()
            snapshots[pending[0]], steps_at[pending[0]] = _cpu_copy(state.ema(sampled)), state.step
            pending.pop(0)
            clock.start()

    clock.start()
    state = train_generator(model, data, level, objective, optim, str(device), on_step, on_checkpoint=on_checkpoint)
    clock.pause()
    for fraction in pending:   # the last one (1.0), and any the loop ended before
        snapshots[fraction], steps_at[fraction] = _cpu_copy(state.ema(sampled)), state.step
    history = state.history
    return {"snapshots": snapshots, "steps_at": steps_at, "steps": state.step, "seconds": clock.spent,
            "loss": history["loss"], "loss_u": history["loss_u"], "loss_region": history.get("loss_region", []),
            "level": history.get("level", [])}


def new_model(args, data: dict, seed: int) -> TrajectoryDiT:
    torch.manual_seed(seed)
    overrides = {k: v for k, v in (("width", args.width), ("depth", args.depth), ("heads", args.heads)) if v}
    return TrajectoryDiT(dit_config(args.preset, token_dim=data["dim"], grid=data["grid"],
                                    num_classes=int(data["labels"].max()) + 1, num_levels=args.levels, **overrides))


def level_sets(data: dict, teacher: str) -> list:
    latents = Latents(torch.from_numpy(data["tokens"]), torch.from_numpy(data["labels"]),
                      np.arange(len(data["tokens"])), data["mean"], data["std"], data["grid"], data["weights_label"])
    regions = torch.from_numpy(data["regions"][teacher])
    return [level_data(latents, regions, level) for level in range(regions.shape[1] + 1)]   # + the latent itself


def train_arm(name: str, data: dict, args, device: torch.device) -> dict:
    sharing, teacher = ARMS[name]
    fractions = sorted(set(args.curve) | {1.0})
    if sharing == "flat":
        flat = flat_level_data(torch.from_numpy(data["tokens"]), torch.from_numpy(data["labels"]))
        units = [train_unit(new_model(args, data, args.seed), flat, flat_level(args.levels), args.budget, fractions,
                            args, device, args.seed)]
    elif sharing == "shared":
        units = [train_unit(new_model(args, data, args.seed), level_sets(data, teacher), list(range(args.levels)),
                            args.budget, fractions, args, device, args.seed)]
    else:
        sets = level_sets(data, teacher)
        units = [train_unit(new_model(args, data, args.seed + level), sets[level], level, args.budget / args.levels,
                            fractions, args, device, args.seed + level) for level in range(args.levels)]
    return {"units": units, "sharing": sharing, "teacher": teacher}


def arm_models(arm: dict, fraction: float, args, data: dict, device: torch.device) -> list[TrajectoryDiT]:
    models = []
    for unit in arm["units"]:
        model = new_model(args, data, 0)
        model.load_state_dict(unit["snapshots"][fraction])
        models.append(model.to(device).eval())
    if arm["sharing"] == "shared":
        return models * args.levels
    return models


# --- scoring ---------------------------------------------------------------------------------------

def summarise(values) -> dict:
    out = {}
    for v in values:
        finite = v.values[np.isfinite(v.values)]
        if len(finite):
            key = v.metric + (f"_L{v.level}" if v.level >= 0 else "") + (f"_{v.variant}" if v.variant else "")
            out[key] = round(float(finite.mean()), 5)
    return out


def teacher_forced(models: list, data: dict, teacher: str, decoder, judge, reference: dict, args,
                   device: torch.device) -> dict:
    """Each level l > 0 conditioned on the teacher's level-(l-1) canvas of real scenes (not its own
    generated one): token FD per level against the teacher's level-l canvases, and the judge's
    FD-scenes / class accuracy of the final decoded after a teacher-forced level L-2."""
    n = min(args.curve_samples, len(data["tokens"]))
    index = np.random.default_rng(args.seed + 7).choice(len(data["tokens"]), n, replace=False)
    tokens = torch.from_numpy(data["tokens"][index])
    teach = canvases(tokens, torch.from_numpy(data["regions"][teacher][index]))
    labels = torch.from_numpy(data["labels"][index]).to(device)
    noises = level_noises(args.levels, tokens.shape[1], tokens.shape[2], list(range(10**6, 10**6 + n)))
    out, final = {}, []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for level in range(1, args.levels):
            made = []
            for start in range(0, n, args.eval_batch):
                stop = min(n, start + args.eval_batch)
                made.append(one_step_level(models[level], noises[level][start:stop].to(device),
                                           teach[level - 1][start:stop].to(device), labels[start:stop], level)
                            .float().cpu())
            made = torch.cat(made)
            gen_tokens = made.reshape(-1, made.shape[-1]).numpy()
            real_tokens = teach[level].reshape(-1, made.shape[-1]).numpy()
            pick = np.random.default_rng(level).permutation(len(gen_tokens))[:20000]
            mu_g, cov_g = feature_stats(gen_tokens[pick])
            mu_r, cov_r = feature_stats(real_tokens[pick])
            out[f"fd_level_L{level}_tokens_teacher_forced"] = round(float(frechet_distance(mu_g, cov_g, mu_r, cov_r)), 4)
            if level == args.levels - 1:
                final = made
    images = np.concatenate([tensor_to_images(decoder(final[s:s + 256].to(device)).float().cpu())
                             for s in range(0, n, 256)])
    verdict = judge_outputs(judge, images, device=device)
    mu, cov = feature_stats(verdict["features"])
    out["fd_scenes_teacher_forced_final"] = round(float(frechet_distance(mu, cov, reference[f"{JUDGE}.mean"],
                                                                         reference[f"{JUDGE}.cov"])), 4)
    out["class_accuracy_teacher_forced_final"] = round(float((verdict["logits"].argmax(1) ==
                                                              data["labels"][index]).mean()), 4)
    return out


# --- the figure ------------------------------------------------------------------------------------

def outline(image: np.ndarray, regions: np.ndarray, grid: int, colour=(255, 0, 0)) -> np.ndarray:
    """The image with the borders between tokens of different region ids drawn in `colour`."""
    out = image.copy()
    ids = np.asarray(regions).reshape(grid, grid)
    cell = image.shape[0] // grid
    for r in range(grid):
        for c in range(grid):
            y, x = r * cell, c * cell
            if c + 1 < grid and ids[r, c] != ids[r, c + 1]:
                out[y:y + cell, x + cell - 1:x + cell + 1] = colour
            if r + 1 < grid and ids[r, c] != ids[r + 1, c]:
                out[y + cell - 1:y + cell + 1, x:x + cell] = colour
    return out


def proof_figure(path: Path, kept: dict, grid: int, rows: int) -> None:
    """Per arm, `rows` samples: levels 0..L-1 decoded with the level's own regions outlined (the last
    level plain); flat: its final alone in the last column."""
    from PIL import Image, ImageDraw

    levels = max(k["images"].shape[1] for k in kept.values())   # flat keeps its final alone
    size = next(iter(kept.values()))["images"].shape[2]
    pad, label_w = 2, 150
    blocks = []
    for name, k in kept.items():
        for i in range(min(rows, len(k["images"]))):
            row = np.full((size, levels * (size + pad), 3), 255, np.uint8)
            for level in range(levels):
                if k["flat"] and level < levels - 1:
                    continue
                image = k["images"][i, -1 if k["flat"] else level]
                if not k["flat"] and level < levels - 1 and k["regions"].shape[-1]:
                    image = outline(image, k["regions"][i, level], grid)
                row[:, level * (size + pad):level * (size + pad) + size] = image
            blocks.append((name if i == 0 else "", row))
    height = len(blocks) * (size + pad) + 16
    out = Image.new("RGB", (label_w + levels * (size + pad), height), "white")
    draw = ImageDraw.Draw(out)
    for level in range(levels):
        draw.text((label_w + level * (size + pad) + 2, 2), f"level {level}", fill="black")
    for i, (name, row) in enumerate(blocks):
        y = 16 + i * (size + pad)
        out.paste(Image.fromarray(row), (label_w, y))
        if name:
            draw.text((4, y + 4), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


COLOURS = [(0, 0, 0), (31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def curve_figure(path: Path, curves: dict[str, list[tuple[float, float]]], title: str, log_y: bool = False) -> None:
    """A line chart (PIL: no plotting library in the project): one polyline per named series of (x, y)."""
    from PIL import Image, ImageDraw

    width, height, left, bottom, top, right = 560, 330, 60, 40, 24, 170
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    points = [p for series in curves.values() for p in series]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    fy = (lambda v: float(np.log10(v))) if log_y else float
    x0, x1, y0, y1 = 0.0, max(xs), min(fy(y) for y in ys), max(fy(y) for y in ys)
    y0, y1 = y0 - 0.05 * (y1 - y0 + 1e-9), y1 + 0.05 * (y1 - y0 + 1e-9)

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (fy(y) - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        label = 10 ** yv if log_y else yv
        y = height - bottom - k / 4 * (height - top - bottom)
        draw.text((4, y - 6), f"{label:.3g}", fill="black")
        xv = x1 * k / 4
        draw.text((left + k / 4 * (width - left - right) - 8, height - bottom + 4), f"{xv:.3g}", fill="black")
    draw.text((left, 4), title, fill="black")
    for i, (name, series) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = [at(x, y) for x, y in sorted(series)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((width - right + 8, top + 14 * i), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


def redraw(result_json: Path, figure: Path, curves_figure: Path, rows: int) -> None:
    """Figures from a finished run's JSON (and its kept trajectories, when beside it)."""
    body = json.loads(result_json.read_text())
    arms = body["arms"]
    curves = {name: [(c["seconds"], c["fd_scenes"]) for c in arm["curve"].values() if "fd_scenes" in c]
              for name, arm in arms.items()}
    curve_figure(curves_figure, curves, "FD-scenes against training seconds (equal GPU time per arm)", log_y=True)
    kept_file = result_json.with_name("trajectory_proof_kept.npz")
    if kept_file.exists():
        kept = np.load(kept_file)
        present = {key.rsplit(".", 1)[0] for key in kept.files}
        names = [n for arm in arms for n in (arm, f"{arm} snapped") if n in present]   # each arm, then snapped
        proof_figure(figure, {name: {key: kept[f"{name}.{key}"] for key in ("images", "regions", "flat")}
                              for name in names}, body["setup"]["grid"], rows)


# --- main ------------------------------------------------------------------------------------------

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", default="/tmp/trajectory-proof", help="phase outputs, kept between calls")
    p.add_argument("--deadline", type=float, default=None, help="stop starting phases after this many seconds")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--image-size", type=int, default=112, help="112 px: 8 x 8 tokens")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--scene-seed", type=int, default=0)
    p.add_argument("--encoder", default="vit_small_patch14_reg4_dinov2")
    p.add_argument("--encoder-weights", default=None, help="a local DINOv2 file (default: random-init)")
    p.add_argument("--budget", type=float, default=90.0, help="training seconds per arm")
    p.add_argument("--curve", type=lambda s: [float(x) for x in s.split(",")], default=[0.125, 0.25, 0.5, 1.0])
    p.add_argument("--snapshot-every", type=int, default=10, help="steps between curve checks")
    p.add_argument("--preset", default="S")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--v-tangent", default="h0", choices=["h0", "same"])
    p.add_argument("--jvp-attention", default="auto", choices=["auto", "kernel", "math"])
    p.add_argument("--cond-noise", type=float, default=0.0, help="generator.cond_noise of the TF arms (0: reference)")
    p.add_argument("--decoder-seconds", type=float, default=40.0)
    p.add_argument("--judge-steps", type=int, default=1500)
    p.add_argument("--judge-holdout", type=float, default=0.15)
    p.add_argument("--samples", type=int, default=2048, help="generated samples at the full budget")
    p.add_argument("--curve-samples", type=int, default=512, help="generated samples per earlier curve point")
    p.add_argument("--reencode", type=int, default=512)
    p.add_argument("--structure-samples", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--grid-rows", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--figure", default=str(ROOT / "docs" / "tf_vs_flat_trajectories.png"))
    p.add_argument("--region-threshold", type=float, default=REGION_THRESHOLD,
                   help="cosine cut that recovers a generated canvas's regions (evaluate.region_threshold)")
    p.add_argument("--curves-figure", default=str(ROOT / "docs" / "trajectory_proof_curves.png"))
    p.add_argument("--redraw", default=None, help="a trajectory_proof.json: draw its figures and stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", action="store_true",
                   help="after the shared phases, train and score every arm in its own process at once on the one "
                        "device (equal wall time, sharing the GPU), then report them together")
    p.add_argument("--no-report", action="store_true", help="stop after the arms' phases (a --parallel child)")
    args = p.parse_args(argv)
    args.levels = 4
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.redraw:
        redraw(Path(args.redraw), Path(args.figure), Path(args.curves_figure), args.grid_rows)
        return
    wall = time.perf_counter()
    device = torch.device(args.device)
    torch.set_num_threads(4 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = HierarchySpec(cuts=(0.65, 0.35))   # the scenes / reference defaults: k = 2, lambda 0.2, average linkage
    arms = [a for a in args.arms.split(",") if a]

    def time_left(needed: float) -> bool:
        if args.deadline is None or time.perf_counter() - wall + needed <= args.deadline:
            return True
        print(f"stopping: {time.perf_counter() - wall:.0f}s spent, the next phase needs about {needed:.0f}s; "
              f"run again with --work {work} to continue", flush=True)
        return False

    def phase(name: str, needed: float, make):
        path = work / f"{name}.pt"
        if path.exists():
            return _unpack(torch.load(path, weights_only=True))
        if not time_left(needed):
            sys.exit(0)
        started = time.perf_counter()
        value = make()
        torch.save(_pack(value), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        print(f"{name}: {time.perf_counter() - started:.1f}s", flush=True)
        return value

    data = phase("data", 120, lambda: prepare_data(args, device, spec))
    grid, dim = data["grid"], data["dim"]
    encoder, _ = build_encoder(args.encoder, args.image_size, args.encoder_weights, True)
    encoder.load_state_dict(data["encoder_state"])
    encoder = encoder.to(device).eval()

    def make_decoder() -> dict:
        decoder = TokenDecoder(DecoderConfig(token_dim=dim, grid=grid, patch=args.image_size // grid, width=256,
                                             depth=4, heads=4))
        pixels = images_to_tensor(data["images"])
        held = max(1, len(pixels) // 10)
        optim = OptimConfig(steps=10**9, batch_size=128, lr=1e-3, warmup_steps=20, seed=args.seed, ema_decays=[],
                            ema_halflives_kimg=[EMA_KIMG])
        clock = BudgetClock(device)

        def stop(step, stats):
            if clock.elapsed() >= args.decoder_seconds:
                optim.steps = step + 1
        clock.start()
        state = train_decoder(decoder, torch.from_numpy(data["tokens"][:-held]), pixels[:-held], optim, str(device), stop)
        model = state.ema(ema_name(halflife_kimg=EMA_KIMG)).to(device).eval()
        with torch.no_grad():
            recon = np.concatenate([tensor_to_images(model(torch.from_numpy(b).to(device)).float().cpu())
                                    for b in np.array_split(data["tokens"][-held:], max(1, held // 64))])
        truth = data["images"][-held:]
        return {"state": _cpu_copy(model), "config": asdict(model.config), "steps": state.step,
                "psnr": float(np.mean([psnr(a, b) for a, b in zip(recon, truth)])),
                "ssim": float(np.mean([ssim(a, b) for a, b in zip(recon, truth)]))}

    dec = phase("decoder", args.decoder_seconds + 30, make_decoder)
    decoder = TokenDecoder(DecoderConfig(**dec["config"]))
    decoder.load_state_dict(dec["state"])
    decoder = decoder.to(device).eval()

    held = max(1, int(round(len(data["images"]) * args.judge_holdout)))
    train_n = len(data["images"]) - held

    def make_judge() -> dict:
        torch.manual_seed(args.seed)
        model = SceneJudge(SceneJudgeConfig(num_classes=int(data["labels"].max()) + 1,
                                            slots=class_slots(data["masks"][:train_n]), input_size=112))
        history = train_judge(model, data["images"][:train_n], data["labels"][:train_n], data["masks"][:train_n],
                              JudgeTraining(steps=args.judge_steps, batch_size=64, lr=3e-3), device)
        scores = holdout_scores(model, data["images"][train_n:], data["labels"][train_n:], data["masks"][train_n:],
                                masks_to_grid(data["masks"][train_n:], grid), grid, device=device)
        return {"state": _cpu_copy(model), "config": asdict(model.config), "holdout": scores,
                "seconds": history["seconds"]}

    jd = phase("judge", 60, make_judge)
    judge = SceneJudge(SceneJudgeConfig(**jd["config"]))
    judge.load_state_dict(jd["state"])
    judge = judge.to(device, memory_format=torch.channels_last).eval()
    dinov2_fn = dinov2_feature_fn(encoder, device, batch_size=256)

    def judge_feats(images: np.ndarray) -> np.ndarray:
        return judge_features(judge, images, device=device)

    def make_reference(teacher: str) -> dict:
        level_canvases = canvases(torch.from_numpy(data["tokens"]), torch.from_numpy(data["regions"][teacher]))

        def batches():
            for s in range(0, len(data["images"]), args.eval_batch):
                yield data["images"][s:s + args.eval_batch], [c[s:s + args.eval_batch] for c in level_canvases]
        return reference_stats(batches(), dinov2_fn, device=device, feature_fns={"judge": judge_feats})

    references = {t: phase(f"reference-{t}", 30, lambda t=t: make_reference(t)) for t in ("clustered", "oracle")}

    # warm-up: kernel choices and allocator, untimed, on a throwaway model
    if not all((work / f"arm-{a}.pt").exists() for a in arms):
        warm = flat_level_data(torch.from_numpy(data["tokens"][:512]), torch.from_numpy(data["labels"][:512]))
        train_generator(new_model(args, data, 10**6), warm, 3, MeanFlowConfig(jvp_attention=args.jvp_attention,
                        v_tangent=args.v_tangent), OptimConfig(steps=5, batch_size=args.batch_size, warmup_steps=1,
                                                               ema_decays=[], ema_halflives_kimg=[EMA_KIMG]), str(device))

    if args.parallel and not all((work / f"eval-{a}.pt").exists() for a in arms):
        run_parallel(argv if argv is not None else sys.argv[1:], arms, args.workers)
    fractions = sorted(set(args.curve) | {1.0})
    results = {}
    for name in arms:
        arm = phase(f"arm-{name}", args.budget * 1.2 + 20, lambda name=name: train_arm(name, data, args, device))
        print(f"{name}: " + ", ".join(f"{u['steps']} steps in {u['seconds']:.1f}s" for u in arm["units"]), flush=True)

        def evaluate(name=name, arm=arm) -> dict:
            teacher = arm["teacher"] or "clustered"
            staged = arm["sharing"] != "flat"

            def score(models, samples: int, final: bool, snap: float | None):
                seeds = 1_000_003 * args.seed + np.arange(samples)
                result = evaluate_streaming(
                    models, decoder, seeds, data["labels"],
                    Scorers(dinov2_fn, judge=judge_fn(judge, grid, device), encoder=encoder, hierarchy_spec=spec,
                            latent_stats=(data["mean"], data["std"])),
                    EvalPlan(batch_size=args.eval_batch, keep=args.grid_rows, structure_samples=args.structure_samples,
                             reencode_samples=args.reencode if final else 0, region_threshold=args.region_threshold,
                             snap_threshold=snap, mode="staged" if staged else "flat"),
                    Runtime(device, structure_runner=process_structure(args.workers, 4)))
                row = summarise(metric_values(result, references[teacher], kid_subset_size=max(2, samples // 2)))
                return result, row

            curve, snapped = {}, {}
            for fraction in fractions:
                final = fraction == 1.0
                samples = args.samples if final else args.curve_samples
                models = arm_models(arm, fraction, args, data, device)
                result, row = score(models, samples, final, None)
                row.update(fraction=fraction, samples=samples,
                           steps=[u["steps_at"][fraction] for u in arm["units"]],
                           seconds=round(fraction * args.budget, 2), eval_s=round(result.timing["total"], 2))
                curve[str(fraction)] = row
                print(f"  {name} @ {fraction:g}: fd_scenes {row.get('fd_scenes')}, class acc "
                      f"{row.get('class_accuracy')}", flush=True)
                if final:
                    kept = {"images": result.kept.images, "regions": result.kept.regions, "flat": not staged}
                    forced = teacher_forced(models, data, teacher, decoder, judge, references[teacher], args,
                                            device) if staged else {}
                    if staged:   # the same models with the snapping sampler (sampling only, no training)
                        result, snapped = score(models, samples, True, args.region_threshold)
                        kept_snapped = {"images": result.kept.images, "regions": result.kept.regions, "flat": False}
                        print(f"  {name} snapped: fd_scenes {snapped.get('fd_scenes')}, class acc "
                              f"{snapped.get('class_accuracy')}", flush=True)
            out = {"curve": curve, "kept": kept, "teacher_forced": forced, "snapped": snapped}
            if snapped:
                out["kept_snapped"] = kept_snapped
            return out

        results[name] = phase(f"eval-{name}", 30 * len(fractions) + 30, evaluate)

    if args.no_report:
        return
    report(args, data, dec, jd, results, arms, time.perf_counter() - wall)


def run_parallel(argv: list[str], arms: list[str], workers: int) -> None:
    """One child process per arm, started together once the shared phases are on disk: each trains and
    scores its arm into --work (the same phase files a sequential run writes), so the arms get the same
    wall-clock budget on one shared device. A failed child stops the run."""
    import subprocess

    drop = {"--parallel"}
    base, skip = [], False
    for i, token in enumerate(argv):   # remove --parallel and any --arms / --workers value
        if skip:
            skip = False
            continue
        if token in drop:
            continue
        if token in ("--arms", "--workers"):
            skip = True
            continue
        if token.startswith(("--arms=", "--workers=")):
            continue
        base.append(token)
    per_child = str(max(1, workers // len(arms)))
    children = {name: subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *base, "--arms", name,
                                        "--workers", per_child, "--no-report"]) for name in arms}
    failed = [name for name, child in children.items() if child.wait() != 0]
    if failed:
        raise SystemExit(f"arm processes failed: {', '.join(failed)}")


def report(args, data, dec, jd, results, arms, wall_s) -> None:
    figures: dict[str, tuple[float, str]] = {}
    extra_arms = {}
    for name in arms:
        curve = results[name]["curve"]
        final, half = curve["1.0"], curve.get("0.5", {})
        for key, value in final.items():
            if isinstance(value, (int, float)) and key not in ("fraction", "samples", "seconds"):
                figures[f"{name}_{key}"] = (value, "FD" if key.startswith("fd") else "score")
        figures[f"{name}_steps"] = (int(sum(final.get("steps", []))), "steps")
        if "fd_scenes" in final and "fd_scenes" in half:
            change = abs(final["fd_scenes"] - half["fd_scenes"]) / max(final["fd_scenes"], 1e-12)
            figures[f"{name}_fd_scenes_change_half_to_full"] = (round(change, 4), "ratio")
        for key, value in results[name]["teacher_forced"].items():
            figures[f"{name}_{key}"] = (value, "score")
        for key, value in results[name].get("snapped", {}).items():
            if isinstance(value, (int, float)):
                figures[f"{name}_snapped_{key}"] = (value, "FD" if key.startswith("fd") else "score")
        extra_arms[name] = {"curve": curve, "teacher_forced": results[name]["teacher_forced"],
                            "snapped": results[name].get("snapped", {})}
    if "flat" in arms:
        for name in arms:
            flat_fd = results["flat"]["curve"]["1.0"].get("fd_scenes")
            if name != "flat" and flat_fd and "fd_scenes" in results[name]["curve"]["1.0"]:
                figures[f"{name}_fd_scenes_over_flat"] = (
                    round(results[name]["curve"]["1.0"]["fd_scenes"] / flat_fd, 4), "ratio")
            if name != "flat" and flat_fd and "fd_scenes" in results[name].get("snapped", {}):
                figures[f"{name}_snapped_fd_scenes_over_flat"] = (
                    round(results[name]["snapped"]["fd_scenes"] / flat_fd, 4), "ratio")
    holdout = jd["holdout"]
    figures["judge_holdout_accuracy"] = (holdout["accuracy"], "accuracy")
    for level, value in enumerate(holdout.get("miou_grid", [])):
        figures[f"judge_holdout_grid_miou_L{level}"] = (round(value, 4), "mIoU")
    figures["decoder_holdout_psnr"] = (round(dec["psnr"], 3), "dB")
    figures["wall_s_this_call"] = (round(wall_s, 1), "s")
    regions = data["regions"]
    truth = masks_to_grid(data["masks"], data["grid"]).reshape(len(data["masks"]), 3, -1)
    alignment = [round(float(np.mean([adjusted_rand(a, b) for a, b in zip(regions["clustered"][:512, level],
                                                                          truth[:512, level])])), 4) for level in range(3)]
    extra = {
        "setup": {"images": args.images, "image_size": args.image_size, "grid": data["grid"], "token_dim": data["dim"],
                  "encoder_weights": data["weights_label"], "preset": args.preset, "batch_size": args.batch_size,
                  "lr": args.lr, "v_tangent": args.v_tangent, "cond_noise": args.cond_noise,
                  "region_threshold": args.region_threshold,
                  "ema": f"EDM {EMA_KIMG:g} kimg, ramp-up 0.05",
                  "budget_s_per_arm": args.budget, "arms_in_parallel_on_one_device": args.parallel, "curve_fractions": args.curve, "samples": args.samples,
                  "curve_samples": args.curve_samples, "device": args.device, "torch": torch.__version__,
                  "timing_s": data["timing"], "decoder_steps": dec["steps"], "judge_seconds": jd["seconds"]},
        "judge_holdout": holdout,
        "clustered_teacher_alignment_ari_with_ground_truth": alignment,
        "arms": extra_arms,
        "budget": "seconds of training steps per arm (after a kernel warm-up, snapshot copies excluded); TF per "
                  "level gives each level budget / 4; shared draws one level per step",
        "note": ("encoder random-init: latents and re-encode features are a random ViT; FD-scenes and the pixel "
                 "plan adherence come from the scenes judge trained on real scenes"
                 if data["weights_label"] == "random-init" else "encoder weights: " + data["weights_label"]),
    }
    path = results_io.write_result("trajectory_proof", figures, extra, args.out)
    kept = {name: results[name]["kept"] for name in arms}
    kept.update({f"{name} snapped": results[name]["kept_snapped"] for name in arms if "kept_snapped" in results[name]})
    np.savez_compressed(path.with_name("trajectory_proof_kept.npz"),   # redraw the figure without re-running
                        **{f"{name}.{key}": np.asarray(k[key]) for name, k in kept.items()
                           for key in ("images", "regions", "flat")})
    redraw(path, Path(args.figure), Path(args.curves_figure), args.grid_rows)
    print(json.dumps({k: v[0] for k, v in figures.items()}, indent=1), flush=True)
    print(f"wrote {path} and {args.figure}", flush=True)


if __name__ == "__main__":
    main()
