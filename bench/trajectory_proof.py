"""Does staged generation work on the built-in world? Flat against Trajectory Forcing at equal GPU time
(issue 16): arms flat; TF with one generator per level and TF with one shared generator, each with the
clustered teacher and with the oracle (ground-truth) teacher. Judged by the scenes judge (DESIGN §4).

    python bench/trajectory_proof.py --device cuda --work /tmp/proof --budget 300 --parallel   # one H200
    (run it again with the same --work to continue: the stages and every phase's output are kept there,
    so a chain of device calls of at most 10 minutes each adds up to one run)
    python bench/trajectory_proof.py --device cpu --image-size 56 --images 192 --budget 8 --samples 64 \\
        --curve-samples 32 --preset tiny --judge-steps 40 --decoder-steps 30 --workers 2 \\
        --work /tmp/proof-cpu --out /tmp/proof-cpu                                                  # a CPU check

It runs the product, not a copy of it. One config per arm (configs/scenes.yaml with this script's
flags as `--set` overrides, `arm_config`) goes through the plan (tasks.plan) to every model spec. The
data are the pipeline's stages, called as `tf pipeline` calls them (their `.fn`): ingest, encode,
hierarchy (the clustered and the oracle teacher stores side by side under one root), train-decoder
and the scenes judge, under <work>/root. Each arm's generators are the train stage's jobs
(tasks.generator_job: model, data, objective and optimiser from the stores and the plan), trained by
models.generator.train_loop.train_generator as `tf train` trains them, except that the run stops at a
wall-clock budget and snapshots its sampled EMA on the way. Snapshots are scored with the evaluate
stage's own pieces (tasks.evaluate.load_scoring / stream_samples / supplied_values).

No Prefect is needed (the GPU box lacks it: tasks.stage.stage_task falls back to the plain function);
carry pydantic, dask / distributed, zarr and their wheels (README "GPU measurements").

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
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import results_io  # noqa: E402
from bench.proof_figures import redraw  # noqa: E402
from models.evaluation.eval_stats import JUDGE, metric_values  # noqa: E402
from models.evaluation.judge import judge_outputs  # noqa: E402
from models.evaluation.metrics import REGION_THRESHOLD, adjusted_rand, feature_stats, frechet_distance  # noqa: E402
from models.decoder import tensor_to_images  # noqa: E402
from models.generator.dit import TrajectoryDiT  # noqa: E402
from models.generator.train_loop import train_generator  # noqa: E402
from models.generator.trajectory import level_noises, one_step_level  # noqa: E402
from storage import zarr_store  # noqa: E402
from storage.config import TFConfig, load_config  # noqa: E402
from storage.scenes import masks_to_grid  # noqa: E402
from tasks import plan  # noqa: E402
from tasks.evaluate import load_scoring, stream_samples  # noqa: E402
from tasks.generator_job import SHARED, generator_job, num_classes  # noqa: E402
from tasks.level_data import canvases, load_regions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = {   # name: (generator.sharing or flat, hierarchy.source); flat reads no teacher
    "flat": ("flat", "clustered"),
    "tf_levels_clustered": ("per_level", "clustered"),
    "tf_levels_oracle": ("per_level", "ground_truth"),
    "tf_shared_clustered": ("shared", "clustered"),
    "tf_shared_oracle": ("shared", "ground_truth"),
}
BASE_CONFIG = ROOT / "configs" / "scenes.yaml"


# --- the configs: scenes.yaml, this script's flags, the arm -----------------------------------------

def _yaml(value) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (list, str)) else str(value)


def arm_config(args, name: str = "flat", *extra: str) -> TFConfig:
    """The arm's pipeline config: configs/scenes.yaml with the flags below (and `extra`) as overrides.
    Every arm shares the image, latent, decoder and judge stores; the teacher differs by hierarchy.source."""
    sharing, source = ARMS[name]
    sets = {
        "name": "proof", "device": args.device,
        "source.num_images": args.images, "source.image_size": args.image_size, "source.seed": args.scene_seed,
        "ingest.workers": args.workers, "ingest.chunk_size": args.chunk,
        "encoder.model": args.encoder, "encoder.weights": args.encoder_weights, "encoder.allow_random_init": True,
        "encoder.batch_size": args.eval_batch,
        "hierarchy.source": source,
        "generator.mode": "flat" if sharing == "flat" else "staged",
        "generator.sharing": "shared" if sharing == "flat" else sharing,
        "generator.preset": args.preset, "generator.width": args.width, "generator.depth": args.depth,
        "generator.head_depth": args.head_depth, "generator.heads": args.heads,
        "generator.batch_size": args.batch_size, "generator.lr": args.lr, "generator.warmup_steps": args.warmup_steps,
        "generator.v_tangent": args.v_tangent, "generator.jvp_attention": args.jvp_attention,
        "generator.cond_noise": 0.0 if sharing == "flat" else args.cond_noise,
        "generator.checkpoint_every": args.snapshot_every, "generator.seed": args.seed,
        "decoder.width": 256, "decoder.depth": 4, "decoder.heads": 4, "decoder.steps": args.decoder_steps,
        "decoder.batch_size": 128, "decoder.seed": args.seed,
        "judge.steps": args.judge_steps, "judge.batch_size": 64, "judge.holdout": args.judge_holdout,
        "evaluate.batch_size": args.eval_batch, "evaluate.structure_samples": args.structure_samples,
        "evaluate.reencode_samples": args.reencode, "evaluate.region_threshold": args.region_threshold,
        "evaluate.keep_trajectories": args.grid_rows, "evaluate.grid_rows": args.grid_rows,
        "evaluate.structure_workers": args.workers, "evaluate.seed": args.seed,
    }
    return load_config(BASE_CONFIG, [f"{k}={_yaml(v)}" for k, v in sets.items()] + list(extra))


def run_stages(args) -> list[dict]:
    """The pipeline's data stages on <work>/root, as `tf pipeline` runs them (each reused when complete):
    ingest, encode, both teachers, the decoder and the scenes judge."""
    from tasks.encode import encode_latents
    from tasks.hierarchy import build_teacher
    from tasks.ingest import ingest_images
    from tasks.judge import train_judge_task
    from tasks.train import train_decoder_task

    root, results = args.root, []
    clustered, oracle = arm_config(args, "tf_shared_clustered"), arm_config(args, "tf_shared_oracle")
    for stage, cfg in ((ingest_images, clustered), (encode_latents, clustered), (build_teacher, clustered),
                       (build_teacher, oracle), (train_decoder_task, clustered), (train_judge_task, clustered)):
        started = time.perf_counter()
        result = stage.fn(cfg, root)
        results.append({k: v for k, v in result.items() if isinstance(v, (str, int, float, bool))})
        print(f"{result['stage']}: {result['status']} in {time.perf_counter() - started:.1f}s", flush=True)
    return results


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



def train_unit(job, seconds: float, fractions: list[float], device: torch.device) -> dict:
    """Train one generator job (tasks.generator_job) for `seconds` of steps; its sampled EMA is copied
    when the clock passes each fraction."""
    optim = dataclasses.replace(job.optim, steps=10**9)   # the clock ends it
    clock, snapshots, steps_at, pending = BudgetClock(device), {}, {}, sorted(fractions)

    def on_step(step: int, stats: dict) -> None:
        if clock.elapsed() >= seconds:
            optim.steps = step + 1

    def on_checkpoint(state) -> None:
        while pending and pending[0] < 1.0 and clock.elapsed() >= pending[0] * seconds:
            clock.pause()
            snapshots[pending[0]], steps_at[pending[0]] = _cpu_copy(state.ema(job.ema)), state.step
            pending.pop(0)
            clock.start()

    clock.start()
    state = train_generator(job.model, job.data, job.level, job.objective, optim, str(device), on_step,
                            on_checkpoint=on_checkpoint)
    clock.pause()
    for fraction in pending:   # the last one (1.0), and any the loop ended before
        snapshots[fraction], steps_at[fraction] = _cpu_copy(state.ema(job.ema)), state.step
    history = state.history
    return {"snapshots": snapshots, "steps_at": steps_at, "steps": state.step, "seconds": clock.spent,
            "loss": history["loss"], "loss_u": history["loss_u"], "loss_region": history.get("loss_region", []),
            "level": history.get("level", [])}


def train_arm(name: str, args, device: torch.device) -> dict:
    """The arm's train-stage jobs: flat (one), shared (one, every level) or one per level (budget split)."""
    sharing, teacher = ARMS[name]
    cfg, fractions = arm_config(args, name), sorted(set(args.curve) | {1.0})
    if sharing == "per_level":
        levels = cfg.hierarchy.generator_levels
        units = [train_unit(generator_job(cfg, args.root, level), args.budget / levels, fractions, device)
                 for level in range(levels)]
    else:
        units = [train_unit(generator_job(cfg, args.root, None if sharing == "flat" else SHARED), args.budget,
                            fractions, device)]
    return {"units": units, "sharing": sharing, "teacher": teacher}


def arm_models(cfg: TFConfig, arm: dict, fraction: float, args, device: torch.device) -> list[TrajectoryDiT]:
    """The snapshot's samplers, built as the evaluate stage builds its generators (one per level, the
    shared one at every level, or the flat one)."""
    layout = plan.layout(args.root, cfg)
    latents = zarr_store.open_array(layout.latents(), "tokens")
    grid, dim = latents.shape[1], latents.shape[-1]
    models = []
    for unit in arm["units"]:
        model = TrajectoryDiT(plan.generator_config(cfg, grid, dim, num_classes(layout)))
        model.load_state_dict(unit["snapshots"][fraction])
        models.append(model.to(device).eval())
    return models * cfg.hierarchy.generator_levels if arm["sharing"] == "shared" else models


# --- scoring ---------------------------------------------------------------------------------------

def summarise(values) -> dict:
    out = {}
    for v in values:
        finite = v.values[np.isfinite(v.values)]
        if len(finite):
            key = v.metric + (f"_L{v.level}" if v.level >= 0 else "") + (f"_{v.variant}" if v.variant else "")
            out[key] = round(float(finite.mean()), 5)
    return out



def teacher_forced(models: list, scoring, args, device: torch.device) -> dict:
    """Each level l > 0 conditioned on the teacher's level-(l-1) canvas of real scenes (not its own
    generated one): token FD per level against the teacher's level-l canvases, and the judge's
    FD-scenes / class accuracy of the final decoded after a teacher-forced level L-2."""
    latents, levels = scoring.latents, len(models)
    n = min(args.curve_samples, len(latents.tokens))
    index = np.random.default_rng(args.seed + 7).choice(len(latents.tokens), n, replace=False)
    tokens = latents.tokens[index]
    teach = canvases(tokens, scoring.teacher[index])
    labels = latents.label[index].to(device)
    noises = level_noises(levels, tokens.shape[1], tokens.shape[2], list(range(10**6, 10**6 + n)))
    out, final = {}, []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for level in range(1, levels):
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
            if level == levels - 1:
                final = made
    with torch.no_grad():
        images = np.concatenate([tensor_to_images(scoring.decoder(final[s:s + 256].to(device)).float().cpu())
                                 for s in range(0, n, 256)])
    verdict = judge_outputs(scoring.judge["model"], images, device=device)
    mu, cov = feature_stats(verdict["features"])
    reference = scoring.reference
    out["fd_scenes_teacher_forced_final"] = round(float(frechet_distance(mu, cov, reference[f"{JUDGE}.mean"],
                                                                         reference[f"{JUDGE}.cov"])), 4)
    out["class_accuracy_teacher_forced_final"] = round(float((verdict["logits"].argmax(1) ==
                                                              latents.label[index].numpy()).mean()), 4)
    return out


def evaluate_arm(name: str, arm: dict, args, device: torch.device) -> dict:
    """Every curve snapshot scored as the evaluate stage scores a run (its scoring pieces, the config's
    evaluation plan); at the full budget also re-encoded, teacher-forced, and sampled with snapping."""
    cfg = arm_config(args, name)
    layout = plan.layout(args.root, cfg)
    scoring = load_scoring(cfg, args.root, layout, str(device))
    staged = arm["sharing"] != "flat"

    def score(models, samples: int, final: bool, snap: bool):
        used = arm_config(args, name, "evaluate.snap_canvases=true") if snap else cfg
        evaluation = dataclasses.replace(plan.eval_plan(used, args.grid_rows),
                                         reencode_samples=args.reencode if final else 0)
        result = stream_samples(scoring, models, samples, evaluation)
        return result, summarise(metric_values(result, scoring.reference, kid_subset_size=max(2, samples // 2)))

    curve, snapped, forced, kept_snapped = {}, {}, {}, None
    for fraction in sorted(set(args.curve) | {1.0}):
        final = fraction == 1.0
        samples = args.samples if final else args.curve_samples
        models = arm_models(cfg, arm, fraction, args, device)
        result, row = score(models, samples, final, False)
        row.update(fraction=fraction, samples=samples, steps=[u["steps_at"][fraction] for u in arm["units"]],
                   seconds=round(fraction * args.budget, 2), eval_s=round(result.timing["total"], 2))
        curve[str(fraction)] = row
        print(f"  {name} @ {fraction:g}: fd_scenes {row.get('fd_scenes')}, class acc {row.get('class_accuracy')}",
              flush=True)
        if final:
            kept = {"images": result.kept.images, "regions": result.kept.regions, "flat": not staged}
            if staged:   # the same models with the snapping sampler (sampling only, no training)
                forced = teacher_forced(models, scoring, args, device)
                result, snapped = score(models, samples, True, True)
                kept_snapped = {"images": result.kept.images, "regions": result.kept.regions, "flat": False}
                print(f"  {name} snapped: fd_scenes {snapped.get('fd_scenes')}, class acc "
                      f"{snapped.get('class_accuracy')}", flush=True)
    out = {"curve": curve, "kept": kept, "teacher_forced": forced, "snapped": snapped}
    if kept_snapped is not None:
        out["kept_snapped"] = kept_snapped
    return out



# --- main ------------------------------------------------------------------------------------------

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", default="/tmp/trajectory-proof", help="the pipeline root and phase outputs, kept")
    p.add_argument("--deadline", type=float, default=None, help="stop starting phases after this many seconds")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--image-size", type=int, default=112, help="source.image_size; 112 px: 8 x 8 tokens")
    p.add_argument("--images", type=int, default=4096, help="source.num_images")
    p.add_argument("--scene-seed", type=int, default=0, help="source.seed")
    p.add_argument("--chunk", type=int, default=256, help="ingest.chunk_size")
    p.add_argument("--encoder", default="vit_small_patch14_reg4_dinov2", help="encoder.model")
    p.add_argument("--encoder-weights", default=None, help="encoder.weights: a local DINOv2 file (default: random-init)")
    p.add_argument("--budget", type=float, default=90.0, help="training seconds per arm")
    p.add_argument("--curve", type=lambda s: [float(x) for x in s.split(",")], default=[0.125, 0.25, 0.5, 1.0])
    p.add_argument("--snapshot-every", type=int, default=10, help="steps between curve checks")
    p.add_argument("--preset", default="S", help="generator.preset (its sizes unless given below)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--head-depth", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--v-tangent", default="h0", choices=["h0", "same"])
    p.add_argument("--jvp-attention", default="auto", choices=["auto", "kernel", "math"])
    p.add_argument("--cond-noise", type=float, default=0.0, help="generator.cond_noise of the TF arms (0: reference)")
    p.add_argument("--decoder-steps", type=int, default=2500, help="decoder.steps")
    p.add_argument("--judge-steps", type=int, default=1500, help="judge.steps")
    p.add_argument("--judge-holdout", type=float, default=0.15, help="judge.holdout")
    p.add_argument("--samples", type=int, default=2048, help="generated samples at the full budget")
    p.add_argument("--curve-samples", type=int, default=512, help="generated samples per earlier curve point")
    p.add_argument("--reencode", type=int, default=512, help="evaluate.reencode_samples at the full budget")
    p.add_argument("--structure-samples", type=int, default=512, help="evaluate.structure_samples")
    p.add_argument("--eval-batch", type=int, default=256, help="evaluate.batch_size")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                   help="ingest.workers (Dask processes) and evaluate.structure_workers")
    p.add_argument("--grid-rows", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--figure", default=str(ROOT / "docs" / "tf_vs_flat_trajectories.png"))
    p.add_argument("--region-threshold", type=float, default=REGION_THRESHOLD,
                   help="cosine cut that recovers a generated canvas's regions (evaluate.region_threshold)")
    p.add_argument("--curves-figure", default=str(ROOT / "docs" / "trajectory_proof_curves.png"))
    p.add_argument("--redraw", default=None, help="a trajectory_proof.json: draw its figures and stop")
    p.add_argument("--seed", type=int, default=0, help="generator, decoder and evaluate seeds")
    p.add_argument("--parallel", action="store_true",
                   help="after the shared stages, train and score every arm in its own process at once on the one "
                        "device (equal wall time, sharing the GPU), then report them together")
    p.add_argument("--no-report", action="store_true", help="stop after the arms' phases (a --parallel child)")
    args = p.parse_args(argv)
    args.root = str(Path(args.work) / "root")
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
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {sorted(ARMS)}")

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

    stages = phase("stages", 240, lambda: run_stages(args))

    def warm_reference() -> dict:
        """The real side's DINOv2 and judge features, cached in the image store by the first evaluation:
        computed here once, before parallel arms would race to write them."""
        cfg = arm_config(args, "tf_shared_clustered")
        started = time.perf_counter()
        load_scoring(cfg, args.root, plan.layout(args.root, cfg), str(device))
        return {"seconds": round(time.perf_counter() - started, 2)}

    phase("reference", 60, warm_reference)
    if not all((work / f"arm-{a}.pt").exists() for a in arms):   # kernel choices and allocator, untimed
        job = generator_job(arm_config(args, "flat"), args.root, None)
        train_generator(job.model, job.data, job.level, job.objective, dataclasses.replace(job.optim, steps=5),
                        str(device))

    if args.parallel and not all((work / f"eval-{a}.pt").exists() for a in arms):
        run_parallel(argv if argv is not None else sys.argv[1:], arms, args.workers)
    results = {}
    for name in arms:
        arm = phase(f"arm-{name}", args.budget * 1.2 + 20, lambda name=name: train_arm(name, args, device))
        print(f"{name}: " + ", ".join(f"{u['steps']} steps in {u['seconds']:.1f}s" for u in arm["units"]), flush=True)
        results[name] = phase(f"eval-{name}", 30 * (len(args.curve) + 1) + 30,
                              lambda name=name, arm=arm: evaluate_arm(name, arm, args, device))
    if args.no_report:
        return
    report(args, stages, results, arms, time.perf_counter() - wall)


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



def _store_facts(args) -> dict:
    """What the report reads back from the stores: the decoder's and the judge's held-out scores, and
    how the clustered teacher aligns with the ground truth (ARI per level, first 512 scenes)."""
    from storage.checkpoints import load_checkpoint
    from storage.files import read_json

    cfg = arm_config(args, "tf_shared_clustered")
    layout = plan.layout(args.root, cfg)
    _, decoder = load_checkpoint(layout.decoder() / "decoder")
    judge = read_json(layout.judge() / "judge.json")
    index = np.flatnonzero(zarr_store.open_array(layout.latents(), "valid")[:])[:512]
    regions = load_regions(layout.teacher(), index).numpy()
    tokens = zarr_store.open_array(layout.latents(), "tokens")
    grid = tokens.shape[1]
    truth = masks_to_grid(zarr_store.open_array(layout.images(), "masks").oindex[index], grid)
    truth = truth.reshape(len(index), truth.shape[1], -1)
    alignment = [round(float(np.mean([adjusted_rand(a, b) for a, b in zip(regions[:, level], truth[:, level])])), 4)
                 for level in range(regions.shape[1])]
    return {"decoder": decoder, "judge": judge, "alignment": alignment, "grid": grid, "token_dim": tokens.shape[-1],
            "encoder_weights": zarr_store.store_attrs(layout.latents())["encoder_weights"], "config": cfg}


def report(args, stages, results, arms, wall_s) -> None:
    facts = _store_facts(args)
    cfg = facts["config"]
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
        flat_fd = results["flat"]["curve"]["1.0"].get("fd_scenes")
        for name in arms:
            if name != "flat" and flat_fd and "fd_scenes" in results[name]["curve"]["1.0"]:
                figures[f"{name}_fd_scenes_over_flat"] = (
                    round(results[name]["curve"]["1.0"]["fd_scenes"] / flat_fd, 4), "ratio")
            if name != "flat" and flat_fd and "fd_scenes" in results[name].get("snapped", {}):
                figures[f"{name}_snapped_fd_scenes_over_flat"] = (
                    round(results[name]["snapped"]["fd_scenes"] / flat_fd, 4), "ratio")
    holdout = facts["judge"]["holdout"]
    figures["judge_holdout_accuracy"] = (holdout["accuracy"], "accuracy")
    for level, value in enumerate(holdout.get("miou_grid", [])):
        figures[f"judge_holdout_grid_miou_L{level}"] = (round(value, 4), "mIoU")
    figures["decoder_holdout_psnr"] = (round(facts["decoder"]["holdout_psnr"], 3), "dB")
    figures["wall_s_this_call"] = (round(wall_s, 1), "s")
    g = cfg.generator
    extra = {
        "setup": {"images": args.images, "image_size": args.image_size, "grid": facts["grid"],
                  "token_dim": facts["token_dim"], "encoder_weights": facts["encoder_weights"], "preset": g.preset,
                  "batch_size": g.batch_size, "lr": g.lr, "v_tangent": g.v_tangent, "cond_noise": args.cond_noise,
                  "region_threshold": cfg.evaluate.region_threshold,
                  "ema": f"EDM {g.ema_halflife_kimg:g} kimg, ramp-up {g.ema_rampup:g}",
                  "budget_s_per_arm": args.budget, "arms_in_parallel_on_one_device": args.parallel,
                  "curve_fractions": args.curve, "samples": args.samples, "curve_samples": args.curve_samples,
                  "device": args.device, "torch": torch.__version__, "stages": stages,
                  "decoder_steps": cfg.decoder.steps, "judge_seconds": facts["judge"]["train_seconds"]},
        "config": {"base": "configs/scenes.yaml", "arms": {name: dict(zip(("sharing", "hierarchy.source"), ARMS[name]))
                                                           for name in arms},
                   "shared_clustered": cfg.model_dump(mode="json")},
        "judge_holdout": holdout,
        "clustered_teacher_alignment_ari_with_ground_truth": facts["alignment"],
        "arms": extra_arms,
        "budget": "seconds of training steps per arm (after a kernel warm-up, snapshot copies excluded); TF per "
                  "level gives each level budget / 4; shared draws one level per step",
        "note": ("encoder random-init: latents and re-encode features are a random ViT; FD-scenes and the pixel "
                 "plan adherence come from the scenes judge trained on real scenes"
                 if facts["encoder_weights"] == "random-init" else "encoder weights: " + facts["encoder_weights"]),
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
