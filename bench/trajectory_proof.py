"""Does staged generation work on the built-in world, at convergence? Flat against Trajectory Forcing
(issues 16 and 30): arms flat; TF with one shared generator with the oracle (ground-truth) teacher and
with the clustered one; TF with one generator per level (oracle); several seeds each. Judged by the
scenes judge (DESIGN §4).

    python bench/trajectory_proof.py --device cuda --work /tmp/proof --seeds 0,1,2 --steps 1000 \\
        --time-limit 540 --parallel                                                  # one GPU, one call
    (run it again with the same --work to continue: every budget point's weights, training state and
    scores are kept there, each under a key of every argument that changes it)
    python bench/trajectory_proof.py --device cpu --image-size 56 --images 96 --preset tiny --steps 8 \\
        --max-steps 16 --samples 16 --reencode 8 --structure-samples 8 --judge-steps 20 --decoder-steps 20 \\
        --eval-batch 16 --batch-size 16 --seeds 0,1 --arms flat,tf_shared_oracle --workers 1 \\
        --work /tmp/proof-cpu --out /tmp/proof-cpu                                   # a CPU check, minutes

It runs the product, not a copy of it. One config per arm and seed (configs/scenes.yaml with this
script's flags as `--set` overrides, `arm_config`) goes through the plan (tasks.plan) to every model
spec. The data are the pipeline's stages, called as `tf pipeline` calls them (their `.fn`): ingest,
encode, hierarchy (the clustered and the oracle teacher stores side by side under one root),
train-decoder and the scenes judge, under <work>/root. Each run's generators are the train stage's jobs
(tasks.train.generator_job), trained by models.generator.train_loop.train_generator as `tf train` trains
them, scored with the evaluate stage's own pieces (tasks.evaluate.stage.load_scoring / stream_samples).

Budget, in generator steps: every run (an arm with a seed) trains --steps steps (TF per level: a
quarter for each level), is scored, then its budget doubles (training continues from the saved state)
until the doubling moves FD-scenes by less than --change-target (converged), the next budget passes
--max-steps, or it would not finish before --time-limit seconds after the start (the wall clock of
this call; what was done stays in --work for the next call). Every point is scored the same way
(--samples, with re-encode agreement), so FD-scenes at half and full budget compare. A run whose
training turns NaN is a row (`diverged_at_step`), not a crash.

With --parallel every arm x seed run is its own process, all at once on the one device, after the
shared stages. Writes <out>/trajectory_proof.json (default bench/results/): per arm the mean and
spread over seeds of FD-scenes, its ratio to flat (per seed), class accuracy, nesting, the judge's
pixel plan mIoU as a share of its ceiling (the same metric on real scenes against their ground-truth
plan), `*_fd_scenes_change_half_to_full`, and the figures (bench/proof_figures.py).
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
from bench.proof_report import arm_figures, fits, next_budget  # noqa: E402
from models.evaluation.eval_stats import metric_values  # noqa: E402
from models.evaluation.metrics import REGION_THRESHOLD, adjusted_rand  # noqa: E402
from models.evaluation.trajectory_metrics import teacher_structure  # noqa: E402
from models.generator.dit import TrajectoryDiT  # noqa: E402
from models.generator.train_loop import train_generator  # noqa: E402
from models.generator.train_state import export_state  # noqa: E402
from models.nonfinite import NonFiniteTraining  # noqa: E402
from storage import zarr_store  # noqa: E402
from storage.config import TFConfig, load_config  # noqa: E402
from storage.keys import stable_hash  # noqa: E402
from storage.scenes import masks_to_grid  # noqa: E402
from tasks import plan  # noqa: E402
from tasks.evaluate.stage import load_scoring, stream_samples  # noqa: E402
from tasks.train.generator_job import SHARED, generator_job, num_classes  # noqa: E402
from tasks.train.level_data import canvases, load_latents, regions_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = {   # name: (generator.sharing or flat, hierarchy.source); flat reads no teacher
    "flat": ("flat", "clustered"),
    "tf_levels_clustered": ("per_level", "clustered"),
    "tf_levels_oracle": ("per_level", "ground_truth"),
    "tf_shared_clustered": ("shared", "clustered"),
    "tf_shared_oracle": ("shared", "ground_truth"),
}
DEFAULT_ARMS = "flat,tf_shared_oracle,tf_shared_clustered,tf_levels_oracle"   # issue 30's four
BASE_CONFIG = ROOT / "configs" / "scenes.yaml"
# Arguments that change no cached result: where things go, which runs this call does, how it is
# scheduled. Every other argument enters the key of each phase it could change (`phase_keys`).
NOT_RESULT_ARGS = {"work", "root", "out", "figure", "curves_figure", "redraw", "parallel", "no_report", "arms",
                   "seeds", "time_limit", "deadline_at", "workers", "steps", "max_steps", "change_target"}
EVAL_ONLY_ARGS = {"samples", "reencode", "structure_samples", "eval_batch", "grid_rows", "diagnose", "region_threshold"}
REPORT_MARGIN_S = 20.0   # kept free before --time-limit for the report


# --- the configs: scenes.yaml, this script's flags, the arm and the seed ----------------------------

def _yaml(value) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (list, str)) else str(value)


def arm_config(args, name: str = "flat", seed: int = 0, *extra: str) -> TFConfig:
    """The run's pipeline config: configs/scenes.yaml with the flags below (and `extra`) as overrides. Every
    run shares the image, latent, decoder and judge stores (their seed is --data-seed); the teacher
    differs by hierarchy.source; the generators' and the evaluation's seed is the run's."""
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
        "generator.batch_size": args.batch_size, "generator.optimizer": args.optimizer, "generator.lr": args.lr,
        "generator.warmup_steps": args.warmup_steps, "generator.grad_clip": args.grad_clip,
        "generator.v_tangent": args.v_tangent, "generator.jvp_attention": args.jvp_attention,
        "generator.compile": args.compile,
        "generator.cond_noise": 0.0 if sharing == "flat" else args.cond_noise,
        "generator.checkpoint_every": 0, "generator.seed": seed,
        "decoder.width": 256, "decoder.depth": 4, "decoder.heads": 4, "decoder.steps": args.decoder_steps,
        "decoder.batch_size": 128, "decoder.seed": args.data_seed,
        "judge.steps": args.judge_steps, "judge.batch_size": 64, "judge.holdout": args.judge_holdout,
        "evaluate.batch_size": args.eval_batch, "evaluate.structure_samples": args.structure_samples,
        "evaluate.reencode_samples": args.reencode, "evaluate.region_threshold": args.region_threshold,
        "evaluate.keep_trajectories": args.grid_rows, "evaluate.grid_rows": args.grid_rows,
        "evaluate.structure_workers": args.workers, "evaluate.seed": seed,
    }
    return load_config(BASE_CONFIG, [f"{k}={_yaml(v)}" for k, v in sets.items()] + list(extra))


def phase_keys(args, name: str, seed: int) -> tuple[str, str]:
    """(train key, eval key) of one run: the train key hashes its whole config (data, teacher, model,
    optimiser, seed) and every argument but the eval-only and NOT_RESULT ones; the eval key adds those
    eval-only ones. A budget point's files are named by a key and its step count."""
    result_args = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_RESULT_ARGS}
    config = arm_config(args, name, seed).model_dump(mode="json")
    config["ingest"].pop("workers")            # processes, not results
    config["encoder"].pop("batch_size")        # out of the latents' own key too
    evaluation = config.pop("evaluate")        # scoring settings: the eval key's
    evaluation.pop("structure_workers")
    train = stable_hash({"arm": name, "seed": seed, "config": config,
                         "args": {k: v for k, v in result_args.items() if k not in EVAL_ONLY_ARGS}})
    return train, stable_hash({"train": train, "evaluate": evaluation, "eval_args": result_args})


def run_stages(args) -> list[dict]:
    """The pipeline's data stages on <work>/root, as `tf pipeline` runs them (each reused when complete):
    ingest, encode, both teachers, the decoder and the scenes judge."""
    from tasks.encode.stage import encode_latents
    from tasks.hierarchy.stage import build_teacher
    from tasks.ingest.stage import ingest_images
    from tasks.judge.stage import train_judge_task
    from tasks.train.stage import train_decoder_task

    root, results = args.root, []
    clustered, oracle = arm_config(args, "tf_shared_clustered"), arm_config(args, "tf_shared_oracle")
    for stage, cfg in ((ingest_images, clustered), (encode_latents, clustered), (build_teacher, clustered),
                       (build_teacher, oracle), (train_decoder_task, clustered), (train_judge_task, clustered)):
        started = time.perf_counter()
        result = stage.fn(cfg, root)
        results.append({k: v for k, v in result.items() if isinstance(v, (str, int, float, bool))})
        print(f"{result['stage']}: {result['status']} in {time.perf_counter() - started:.1f}s", flush=True)
    return results


# --- phase files -----------------------------------------------------------------------------------

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


def load_phase(path: Path):
    return _unpack(torch.load(path, weights_only=True)) if path.exists() else None


def save_phase(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(_pack(value), tmp)
    tmp.rename(path)


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class OutOfTime(Exception):
    """A training segment passed the call's deadline: its budget point is dropped, the earlier ones stay."""


# --- one run: an arm with a seed, its budget doubling ----------------------------------------------

def run_jobs(cfg: TFConfig, args, name: str) -> list:
    """The train-stage jobs of the run: flat (one), shared (one, every level) or one per level."""
    sharing = ARMS[name][0]
    if sharing == "per_level":
        return [generator_job(cfg, args.root, level) for level in range(cfg.hierarchy.generator_levels)]
    return [generator_job(cfg, args.root, None if sharing == "flat" else SHARED)]


def train_to(jobs: list, states: list, steps: int, device: torch.device, deadline: float | None) -> dict:
    """Every job trained on to its share of `steps` (continuing from `states`, exported train states or
    None); returns the sampled EMAs, the new states and the seconds spent."""
    def guard(step: int, stats: dict) -> None:
        if deadline is not None and time.time() > deadline:
            raise OutOfTime

    started, snapshots, exported = time.perf_counter(), [], []
    for job, state in zip(jobs, states or [None] * len(jobs)):
        optim = dataclasses.replace(job.optim, steps=steps // len(jobs))
        trained = train_generator(job.model, job.data, job.level, job.objective, optim, str(device), guard,
                                  resume=None if state is None else (state["tensors"], state["meta"]))
        snapshots.append(_cpu_copy(trained.ema(job.ema)))
        tensors, meta = export_state(trained)
        exported.append({"tensors": tensors, "meta": meta})
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"snapshots": snapshots, "states": exported, "train_s": time.perf_counter() - started}


def advance(jobs: list, states: list | None, steps: int, device: torch.device,
            deadline: float | None) -> tuple[dict | None, str, int | None]:
    """(train_to's result, "", None), or (None, why it stopped, the diverged update): a run whose training
    turns NaN or infinite is "diverged" at the update the training loop names, one past the deadline
    "time_limit"; neither is an error of the call."""
    try:
        return train_to(jobs, states, steps, device, deadline), "", None
    except NonFiniteTraining as error:
        return None, "diverged", error.step
    except OutOfTime:
        return None, "time_limit", None


def samplers(cfg: TFConfig, name: str, snapshots: list, args, device: torch.device) -> list[TrajectoryDiT]:
    """The point's samplers, as the evaluate stage builds its generators (one per level, the shared one at
    every level, or the flat one)."""
    layout = plan.layout(args.root, cfg)
    latents = zarr_store.open_array(layout.latents(), "tokens")
    models = []
    for weights in snapshots:
        model = TrajectoryDiT(plan.generator_config(cfg, latents.shape[1], latents.shape[-1], num_classes(layout)))
        model.load_state_dict(weights)
        models.append(model.to(device).eval())
    return models * cfg.hierarchy.generator_levels if ARMS[name][0] == "shared" else models


def summarise(values) -> dict:
    out = {}
    for v in values:
        finite = v.values[np.isfinite(v.values)]
        if len(finite):
            key = v.metric + (f"_L{v.level}" if v.level >= 0 else "") + (f"_{v.variant}" if v.variant else "")
            out[key] = round(float(finite.mean()), 5)
    return out


def score(scoring, models: list, cfg: TFConfig, args):
    """One point's scores as the evaluate stage computes them, with the evaluation plan of `cfg`."""
    result = stream_samples(scoring, models, args.samples, plan.eval_plan(cfg, args.grid_rows))
    return result, summarise(metric_values(result, scoring.reference, kid_subset_size=max(2, args.samples // 2)))


def run_unit(name: str, seed: int, args, device: torch.device, deadline: float | None) -> dict:
    """Train and score one run point after point (budgets doubling) until it converges, passes
    --max-steps, runs out of time or diverges. Points already in --work are read back, not recomputed."""
    train_key, eval_key = phase_keys(args, name, seed)
    work = Path(args.work)
    cfg = arm_config(args, name, seed)
    jobs, scoring = None, None
    points, states, stopped, diverged, kept, last = [], None, "", None, None, None
    seconds_per_step, eval_s, steps = None, 0.0, args.steps
    while True:
        trained_file = work / f"train-{name}-s{seed}-{train_key}-{steps}.pt"
        scored_file = work / f"score-{name}-s{seed}-{eval_key}-{steps}.pt"
        trained = load_phase(trained_file)
        done = points[-1]["steps"] if points else 0
        if trained is None:
            if seconds_per_step is not None and not fits(time.time(), deadline, steps - done, seconds_per_step, eval_s):
                stopped = "time_limit"
                break
            jobs = jobs or run_jobs(cfg, args, name)
            trained, stopped, diverged = advance(jobs, states, steps, device, deadline)
            if trained is None:
                print(f"{name} seed {seed}: stopped at {steps} steps: {stopped}", flush=True)
                break
            save_phase(trained_file, trained)
        seconds_per_step = trained["train_s"] / max(1, steps - done)
        scored = load_phase(scored_file)
        if scored is None:
            if deadline is not None and time.time() + eval_s > deadline:
                stopped = "time_limit"
                break
            scoring = scoring or load_scoring(cfg, args.root, plan.layout(args.root, cfg), str(device))
            started = time.perf_counter()
            models = samplers(cfg, name, trained["snapshots"], args, device)
            result, row = score(scoring, models, cfg, args)
            scored = {"row": row, "eval_s": round(time.perf_counter() - started, 2),
                      "kept": {"images": result.kept.images, "regions": result.kept.regions,
                               "flat": ARMS[name][0] == "flat"}}
            save_phase(scored_file, scored)
        eval_s = scored["eval_s"]
        points.append({"steps": steps, "row": scored["row"], "eval_s": scored["eval_s"],
                       "train_s": round(trained["train_s"], 2)})
        kept, last, states = scored["kept"], trained, trained["states"]
        print(f"{name} seed {seed} @ {steps} steps: fd_scenes {scored['row'].get('fd_scenes')}, class acc "
              f"{scored['row'].get('class_accuracy')}", flush=True)
        steps, stopped = next_budget(points, args.change_target, args.max_steps)
        if steps is None:
            break
    unit = {"arm": name, "seed": seed, "points": points, "stopped": stopped, "diverged_at_step": diverged,
            "kept": kept, "diagnosis": {}}
    if args.diagnose and last is not None and ARMS[name][0] != "flat":
        unit["diagnosis"] = diagnose(name, seed, last, scoring or load_scoring(cfg, args.root, plan.layout(
            args.root, cfg), str(device)), args, device)
    return unit


def diagnose(name: str, seed: int, trained: dict, scoring, args, device: torch.device) -> dict:
    """At the last point: the teacher-forced levels and the snapping sampler (docs/trajectory.md)."""
    from bench.proof_diagnosis import teacher_forced

    cfg = arm_config(args, name, seed)
    models = samplers(cfg, name, trained["snapshots"], args, device)
    out = teacher_forced(models, scoring, args.samples, args.eval_batch, args.data_seed, device)
    _, snapped = score(scoring, models, arm_config(args, name, seed, "evaluate.snap_canvases=true"), args)
    out.update({f"snapped_{k}": v for k, v in snapped.items()})
    return out


# --- main ------------------------------------------------------------------------------------------

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", default="/tmp/trajectory-proof", help="the pipeline root and phase outputs, kept")
    p.add_argument("--time-limit", type=float, default=None,
                   help="wall-clock seconds for this call: no budget point is started that would end later")
    p.add_argument("--deadline-at", type=float, default=None, help=argparse.SUPPRESS)   # a --parallel child's
    p.add_argument("--arms", default=DEFAULT_ARMS)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                   help="generator (and evaluation sampling) seeds: one run per arm and seed")
    p.add_argument("--data-seed", type=int, default=0, help="the decoder's seed (shared by every run)")
    p.add_argument("--image-size", type=int, default=112, help="source.image_size; 112 px: 8 x 8 tokens")
    p.add_argument("--images", type=int, default=4096, help="source.num_images")
    p.add_argument("--scene-seed", type=int, default=0, help="source.seed")
    p.add_argument("--chunk", type=int, default=256, help="ingest.chunk_size")
    p.add_argument("--encoder", default="vit_small_patch14_reg4_dinov2", help="encoder.model")
    p.add_argument("--encoder-weights", default=None, help="encoder.weights: a local DINOv2 file (default: random-init)")
    p.add_argument("--steps", type=int, default=1000, help="the first budget: generator steps per run")
    p.add_argument("--max-steps", type=int, default=64000, help="no budget past this")
    p.add_argument("--change-target", type=float, default=0.1,
                   help="converged when a doubling moves FD-scenes by less than this share")
    p.add_argument("--preset", default="S", help="generator.preset (its sizes unless given below)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--head-depth", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--optimizer", default="muon", choices=["muon", "adamw"])
    p.add_argument("--lr", type=float, default=0.01, help="generator.lr (the reference's 0.01 with muon)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=0.0, help="generator.grad_clip (0: none, as the reference)")
    p.add_argument("--compile", action="store_true", help="generator.compile")
    p.add_argument("--v-tangent", default="h0", choices=["h0", "same"])
    p.add_argument("--jvp-attention", default="auto", choices=["auto", "kernel", "math"])
    p.add_argument("--cond-noise", type=float, default=0.0, help="generator.cond_noise of the TF arms (0: reference)")
    p.add_argument("--decoder-steps", type=int, default=2500, help="decoder.steps")
    p.add_argument("--judge-steps", type=int, default=1500, help="judge.steps")
    p.add_argument("--judge-holdout", type=float, default=0.15, help="judge.holdout")
    p.add_argument("--samples", type=int, default=1024, help="generated samples scored at every budget point")
    p.add_argument("--reencode", type=int, default=256, help="evaluate.reencode_samples")
    p.add_argument("--structure-samples", type=int, default=512, help="evaluate.structure_samples")
    p.add_argument("--eval-batch", type=int, default=256, help="evaluate.batch_size")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                   help="ingest.workers (Dask processes) and evaluate.structure_workers")
    p.add_argument("--grid-rows", type=int, default=3)
    p.add_argument("--region-threshold", type=float, default=REGION_THRESHOLD,
                   help="cosine cut that recovers a generated canvas's regions (evaluate.region_threshold)")
    p.add_argument("--diagnose", action="store_true", help="teacher-forced levels and the snapping sampler at the end")
    p.add_argument("--out", default=None)
    p.add_argument("--figure", default=str(ROOT / "docs" / "tf_vs_flat_trajectories.png"))
    p.add_argument("--curves-figure", default=str(ROOT / "docs" / "trajectory_proof_curves.png"))
    p.add_argument("--redraw", default=None, help="a trajectory_proof.json: draw its figures and stop")
    p.add_argument("--parallel", action="store_true",
                   help="after the shared stages, every arm x seed run in its own process at once on the one device")
    p.add_argument("--no-report", action="store_true", help="stop after the runs (a --parallel child)")
    args = p.parse_args(argv)
    args.root = str(Path(args.work) / "root")
    unknown = sorted(set(a for a in args.arms.split(",") if a) - set(ARMS))
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {sorted(ARMS)}")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.redraw:
        redraw(Path(args.redraw), Path(args.figure), Path(args.curves_figure), args.grid_rows)
        return
    wall = time.time()
    deadline = args.deadline_at if args.deadline_at is not None else \
        None if args.time_limit is None else wall + args.time_limit - REPORT_MARGIN_S
    device = torch.device(args.device)
    torch.set_num_threads(4 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    arms = [a for a in args.arms.split(",") if a]
    runs = [(arm, seed) for arm in arms for seed in args.seeds]
    data_key = stable_hash({k: v for k, v in vars(phase_args(args)).items()})
    stages = load_phase(work / f"stages-{data_key}.pt")
    if stages is None:
        stages = run_stages(args)
        cfg = arm_config(args, "tf_shared_clustered")   # the real side's features, before parallel runs race
        load_scoring(cfg, args.root, plan.layout(args.root, cfg), str(device))
        save_phase(work / f"stages-{data_key}.pt", stages)
    if args.parallel and len(runs) > 1:
        run_parallel(argv if argv is not None else sys.argv[1:], runs, args.workers, deadline)
    else:
        for arm, seed in runs:
            save_phase(unit_file(args, arm, seed), run_unit(arm, seed, args, device, deadline))
    if args.no_report:
        return
    report(args, stages, [load_phase(unit_file(args, arm, seed)) for arm, seed in runs], arms, time.time() - wall)


def phase_args(args) -> argparse.Namespace:
    """The arguments the shared data stages depend on (their outputs are also keyed by the product)."""
    data = ("device", "image_size", "images", "scene_seed", "chunk", "encoder", "encoder_weights", "data_seed",
            "decoder_steps", "judge_steps", "judge_holdout", "eval_batch", "region_threshold")
    return argparse.Namespace(**{k: getattr(args, k) for k in data})


def unit_file(args, arm: str, seed: int) -> Path:
    """Where a run's outcome of this call lands (rewritten by every call: a later one may go further)."""
    return Path(args.work) / f"unit-{arm}-s{seed}-{phase_keys(args, arm, seed)[1]}.pt"


def run_parallel(argv: list[str], runs: list[tuple[str, int]], workers: int, deadline: float | None) -> None:
    """One child process per arm and seed, started together once the shared stages are on disk: each
    trains and scores its run into --work, so the runs share the one device. A failed child stops the call."""
    import subprocess

    valued = ("--arms", "--seeds", "--workers", "--deadline-at")
    base, skip = [], False
    for token in argv:   # drop --parallel and the per-child values
        if skip:
            skip = False
            continue
        if token == "--parallel":
            continue
        if token in valued:
            skip = True
            continue
        if token.startswith(tuple(f"{v}=" for v in valued)):
            continue
        base.append(token)
    per_child = str(max(1, workers // len(runs)))
    timing = ["--deadline-at", repr(deadline)] if deadline is not None else []
    children = {(arm, seed): subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *base, "--arms", arm,
                                               "--seeds", str(seed), "--workers", per_child, "--no-report", *timing])
                for arm, seed in runs}
    failed = [f"{arm} seed {seed}" for (arm, seed), child in children.items() if child.wait() != 0]
    if failed:
        raise SystemExit(f"run processes failed: {', '.join(failed)}")


def _store_facts(args) -> dict:
    """What the report reads back from the stores: the decoder's and the judge's held-out scores, and
    how the clustered teacher aligns with the ground truth (ARI per level, first 512 scenes)."""
    from storage.checkpoints import load_checkpoint
    from storage.files import read_json

    cfg = arm_config(args, "tf_shared_clustered")
    layout = plan.layout(args.root, cfg)
    _, decoder = load_checkpoint(layout.decoder() / "decoder")
    judge = read_json(layout.judge() / "judge.json")
    latents = load_latents(layout.latents(), limit=512)   # the first 512 valid samples
    teachers = {name: regions_of(plan.layout(args.root, arm_config(args, arm)).teacher(), latents)
                for name, arm in (("oracle", "tf_shared_oracle"), ("clustered", "tf_shared_clustered"))}
    regions = teachers["clustered"].numpy()
    truth = masks_to_grid(zarr_store.open_array(layout.images(), "masks").oindex[latents.index], latents.grid)
    truth = truth.reshape(len(latents), truth.shape[1], -1)
    alignment = [round(float(np.mean([adjusted_rand(a, b) for a, b in zip(regions[:, level], truth[:, level])])), 4)
                 for level in range(regions.shape[1])]
    # nesting's ceiling: each teacher's own canvases through the evaluation's region cut
    tokens = latents.normalised()
    structure = {name: teacher_structure([c.numpy() for c in canvases(tokens, ids)], cfg.evaluate.region_threshold)
                 for name, ids in teachers.items()}
    return {"decoder": decoder, "judge": judge, "alignment": alignment, "teachers": structure,
            "grid": latents.grid, "token_dim": latents.dim,
            "encoder_weights": latents.weights_label, "config": cfg}


def report(args, stages, units: list[dict | None], arms: list[str], wall_s: float) -> None:
    facts = _store_facts(args)
    cfg = facts["config"]
    units = [u for u in units if u is not None]
    holdout = facts["judge"]["holdout"]
    # the judge's pixel plan mIoU on its held-out real scenes against their ground truth, at the token grid
    ceiling = list(holdout.get("miou_grid", []))
    figures, detail = arm_figures(units, ceiling)
    for u in units:   # the diagnosis of the first seed per arm, when asked
        if u["diagnosis"] and u["seed"] == args.seeds[0]:
            detail[u["arm"]]["diagnosis"] = u["diagnosis"]
            figures.update({f"{u['arm']}_{k}": (v, "score") for k, v in u["diagnosis"].items()
                            if isinstance(v, (int, float))})
    for teacher, values in facts["teachers"].items():   # what the generated canvases' structure is read against
        figures.update({f"{teacher}_teacher_{k}": (round(v, 4), "the teacher's own canvases through the region cut")
                        for k, v in values.items()})
    figures["judge_holdout_accuracy"] = (holdout["accuracy"], "accuracy")
    figures["decoder_holdout_psnr"] = (round(facts["decoder"]["holdout_psnr"], 3), "dB")
    figures["wall_s_this_call"] = (round(wall_s, 1), "s")
    g = cfg.generator
    extra = {
        "setup": {"images": args.images, "image_size": args.image_size, "grid": facts["grid"],
                  "token_dim": facts["token_dim"], "encoder_weights": facts["encoder_weights"], "preset": g.preset,
                  "batch_size": g.batch_size, "optimizer": g.optimizer, "lr": g.lr, "warmup_steps": g.warmup_steps,
                  "grad_clip": g.grad_clip, "v_tangent": g.v_tangent, "cond_noise": args.cond_noise,
                  "region_threshold": cfg.evaluate.region_threshold,
                  "ema": f"EDM {g.ema_halflife_kimg:g} kimg, ramp-up {g.ema_rampup:g}", "seeds": args.seeds,
                  "first_budget_steps": args.steps, "max_steps": args.max_steps, "change_target": args.change_target,
                  "time_limit_s": args.time_limit, "runs_in_parallel_on_one_device": args.parallel,
                  "samples_per_point": args.samples, "device": args.device, "torch": torch.__version__,
                  "stages": stages, "decoder_steps": cfg.decoder.steps,
                  "judge_seconds": facts["judge"]["train_seconds"]},
        "config": {"base": "configs/scenes.yaml", "arms": {name: dict(zip(("sharing", "hierarchy.source"), ARMS[name]))
                                                           for name in arms},
                   "shared_clustered": cfg.model_dump(mode="json")},
        "judge_holdout": holdout,
        "clustered_teacher_alignment_ari_with_ground_truth": facts["alignment"],
        "arms": detail,
        "budget": "generator steps per run (TF per level: a quarter per level; shared draws one level per step), "
                  "doubling from --steps until FD-scenes moves by less than --change-target",
        "note": ("encoder random-init: latents and re-encode features are a random ViT; FD-scenes and the pixel "
                 "plan adherence come from the scenes judge trained on real scenes"
                 if facts["encoder_weights"] == "random-init" else "encoder weights: " + facts["encoder_weights"]),
    }
    path = results_io.write_result("trajectory_proof", figures, extra, args.out)
    first = {u["arm"]: u["kept"] for u in units if u["seed"] == args.seeds[0] and u["kept"] is not None}
    np.savez_compressed(path.with_name("trajectory_proof_kept.npz"),   # redraw the figure without re-running
                        **{f"{name}.{key}": np.asarray(k[key]) for name, k in first.items()
                           for key in ("images", "regions", "flat")})
    redraw(path, Path(args.figure), Path(args.curves_figure), args.grid_rows)
    print(json.dumps({k: v[0] for k, v in figures.items()}, indent=1), flush=True)
    print(f"wrote {path} and {args.figure}", flush=True)


if __name__ == "__main__":
    main()
