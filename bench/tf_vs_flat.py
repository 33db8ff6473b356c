"""Trajectory Forcing (one generator per level) against the flat baseline (one one-step model straight
to the latent), trained on the same stores with the same backbone and step budget.

    .venv/bin/python bench/tf_vs_flat.py [--config configs/scenes.yaml] [--root /tmp/tf-vs-flat] [--samples 256]

Builds (or reuses) the image, latent and teacher stores, trains the four level generators, the flat
model with the same steps as one level ("flat") and with the staged run's total steps ("flat_equal_total"),
samples the same noise and labels from each, and scores against the real latents:
  - final_fd_*: Frechet distance of the final latents to the real latents (mean-pooled per image, and
    per token), the one number both methods have;
  - rebuilt_fd_level_l: the teacher hierarchy rebuilt on each method's final latents, FD of its level-l
    canvases to the teacher canvases of real images (does the output carry the real coarse structure?);
  - staged_plan_ari_level_l: ARI between the regions of the staged run's own level-l canvas and the
    hierarchy rebuilt from its final latent (does the final follow the plan?); the flat model has no plan;
  - real_split_final_fd: the same FD between two halves of the real set, the noise floor at this n.
Writes bench/results/tf_vs_flat.json. On the built-in scenes the encoder is random-init and the budget
is a few hundred CPU steps: the figures compare wiring at a small budget, not the method at scale.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.results_io import write_result  # noqa: E402


def final_fd(generated: np.ndarray, real: np.ndarray, max_tokens: int = 20000, seed: int = 0) -> tuple[float, float]:
    from models.metrics import fd_from_features

    rng = np.random.default_rng(seed)
    tokens_g, tokens_r = generated.reshape(-1, generated.shape[-1]), real.reshape(-1, real.shape[-1])
    tokens_g = tokens_g[rng.permutation(len(tokens_g))[:max_tokens]]
    tokens_r = tokens_r[rng.permutation(len(tokens_r))[:max_tokens]]
    return fd_from_features(generated.mean(1), real.mean(1)), fd_from_features(tokens_g, tokens_r)


def rebuilt_canvases(final: torch.Tensor, mean: np.ndarray, std: np.ndarray, grid: int, spec) -> tuple[list, np.ndarray]:
    """Teacher hierarchy on generated final latents (in the store's raw scale), canvases in normalised scale."""
    from models.hierarchy import build_hierarchies
    from tasks.level_data import canvases

    raw = final.numpy() * std + mean
    regions = build_hierarchies(raw.reshape(len(raw), grid, grid, -1), spec).reshape(len(raw), spec.num_levels, -1)
    return canvases(final, torch.from_numpy(regions.astype(np.int64))), regions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/scenes.yaml")
    parser.add_argument("--root", default=None)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="tf-vs-flat-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from flows.stages import encode_flow, hierarchy_flow, ingest_flow
    from models.flat import sample_flat
    from models.metrics import adjusted_rand
    from models.trajectory import level_noises, sample_trajectory
    from models.trajectory_metrics import generated_regions, per_level_fd
    from storage.checkpoints import load_checkpoint
    from storage.config import load_config
    from storage.keys import Layout
    from tasks.chunk_workers import hierarchy_spec
    from tasks.generator_job import generator_config, num_classes
    from tasks.level_data import canvases, load_latents, load_regions
    from tasks.train import load_flat_generator, train_flat_task, train_level_task
    from models.dit import TrajectoryDiT

    cfg = load_config(args.config, args.set)
    levels = cfg.hierarchy.num_levels
    for stage in (ingest_flow, encode_flow, hierarchy_flow):
        stage(config=cfg, root=str(root), run_id=f"tf-vs-flat-{stage.name}")
    layout = Layout(root, cfg)
    seconds, status = {}, {}
    started = time.perf_counter()
    for level in range(levels):
        status[f"L{level}"] = train_level_task(cfg, str(root), level)["status"]
    seconds["staged"] = time.perf_counter() - started
    equal_total = load_config(args.config, args.set + [f"generator.steps={cfg.generator.steps * levels}"])
    flats = {}
    for name, flat_cfg in (("flat", cfg), ("flat_equal_total", equal_total)):
        started = time.perf_counter()
        status[name] = train_flat_task(flat_cfg, str(root))["status"]
        seconds[name] = time.perf_counter() - started

    latents = load_latents(layout.latents())
    real = canvases(latents.tokens, load_regions(layout.teacher(), latents.index))
    grid, dim = latents.grid, latents.tokens.shape[-1]
    for name, flat_cfg in (("flat", cfg), ("flat_equal_total", equal_total)):
        flats[name] = load_flat_generator(flat_cfg, str(root), grid, dim)
    models = []
    for level in range(levels):
        model = TrajectoryDiT(generator_config(cfg, grid, dim, num_classes(layout)))
        model.load_state_dict(load_checkpoint(layout.generator(level) / "generator")[0])
        models.append(model.eval())
    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.choice(latents.label.numpy(), size=args.samples))
    noises = level_noises(levels, grid * grid, dim, seeds=range(args.samples))
    staged = sample_trajectory(models, noises, label)
    finals = {"staged": staged[-1], **{name: sample_flat(m, noises[-1], label, levels) for name, m in flats.items()}}

    spec = hierarchy_spec(cfg.hierarchy)
    real_np = [c.numpy() for c in real]
    figures: dict[str, tuple[float, str]] = {}
    half = len(real_np[-1]) // 2
    figures["real_split_final_fd_mean_pooled"] = (round(final_fd(real_np[-1][:half], real_np[-1][half:])[0], 4), "FD")
    for name, final in finals.items():
        pooled, tokens = final_fd(final.numpy(), real_np[-1])
        figures[f"{name}_final_fd_mean_pooled"] = (round(pooled, 4), "FD")
        figures[f"{name}_final_fd_tokens"] = (round(tokens, 4), "FD")
        rebuilt, regions = rebuilt_canvases(final, latents.mean, latents.std, grid, spec)
        # Per token only: a region-mean canvas has its latent's token mean, so the mean-pooled FD of a
        # rebuilt canvas is the final latent's FD at every level (seen: identical to 4 digits).
        for value in per_level_fd([c.numpy() for c in rebuilt[:-1]], real_np[:-1]):
            if value.variant == "tokens":
                figures[f"{name}_rebuilt_fd_tokens_level_{value.level}"] = (round(float(value.values[0]), 4), "FD")
        if name == "staged":   # the staged run's own canvases, each generated by its level's model
            for value in per_level_fd([c.numpy() for c in staged], real_np):
                figures[f"staged_canvas_fd_{value.variant}_level_{value.level}"] = (round(float(value.values[0]), 4),
                                                                                   "FD")
            own = generated_regions([c.numpy() for c in staged], cfg.evaluate.region_threshold)
            for level, ids in enumerate(own):
                ari = np.mean([adjusted_rand(a, b) for a, b in zip(ids, regions[:, level])])
                figures[f"staged_plan_ari_level_{level}"] = (round(float(ari), 4), "ARI")
    for name, value in seconds.items():   # only when this run trained them (a reused stage costs ~0 s)
        if name != "staged" and status[name] == "computed" or name == "staged" and \
                all(status[f"L{level}"] == "computed" for level in range(levels)):
            figures[f"{name}_train_s"] = (round(value, 2), "s")
    path = write_result("tf_vs_flat", figures, {
        "config": args.config, "overrides": args.set, "samples": args.samples, "steps_per_model": cfg.generator.steps,
        "encoder_weights": latents.weights_label, "stage_status": status,
        "note": "CPU, small budget; scenes latents come from a random-init encoder unless encoder.weights is set: "
                "a wiring-level comparison, not a result about the method at scale"})
    print(path.read_text())


if __name__ == "__main__":
    main()
