"""Evaluate: stream sampled trajectories through every metric, run the edit suite, write the tables.

Reads the latent/teacher/image stores and the checkpoints; writes the evaluation folder
(trajectories Zarr for the kept subset, edits Parquet/Zarr, grid PNG) and one metrics
Parquet part for the run. Samples are streamed in batches (models.evaluation.streaming_eval), so
50k samples never sit in memory; the real side's image statistics are cached with the
real set (tasks.evaluate.reference).

With `generator.mode: flat` the flat baseline is evaluated instead of the level generators, into
its own folder (`evaluate-flat-<key>`, beside the staged `evaluate-<key>`): one step from the final
level's noise to the latent; FD-DINOv2 / FID / KID / IS of the decoded final, the final level's FD,
re-encode agreement against the hierarchy rebuilt on the final (variant "final_hierarchy", which the
staged run also writes) and the decoder's PSNR / SSIM are numbers; what needs staged canvases
(per-level FD below the final, nesting, plan adherence, plan re-encode agreement, edits) is written
as skipped with the reason. Every row carries the mode.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextvars
import functools
import os
import time

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.decoder import TokenDecoder, tensor_to_images
from models.generator.dit import TrajectoryDiT
from models.generator.edit_suite import plan_edits, run_edit_suite
from models.evaluation.fidelity import (dinov2_extractor_label, dinov2_feature_fn, fidelity_unavailable_reason,
                             inception_extractor_label, inception_feature_fn)
from models.evaluation.eval_stats import metric_values_by_entry
from models.evaluation.plan import EvalPlan
from models.evaluation.registry import EvalSetting, MetricValues, pooled
from models.evaluation.streaming_eval import Runtime, Scorers, StreamingEvalResult, evaluate_streaming
from models.generator.trajectory import level_noises, own_regions_cut, sample_trajectory
from models.evaluation.trajectory_metrics import generated_regions, hierarchy_alignment
from storage import zarr_store
from storage.checkpoints import load_built
from storage.config import TFConfig
from storage.keys import CODE_VERSIONS, Layout, stable_hash
from storage.scenes import masks_to_grid
from storage.tables import write_metrics
from storage.trajectory_store import new_edit_id, write_edits, write_grid, write_trajectories
from tasks.plan import decoder_spec, eval_plan, generator_config, hierarchy_spec, layout as stage_layout
from tasks.encode.decode import DecodeSplit
from tasks.encode.pixels import real_pixel_batches
from tasks.encode.encoder_load import load_encoder
from tasks.evaluate.judge import holdout_values, judge_labels, prepare_judge
from tasks.judge.stage import ensure_judge
from tasks.evaluate.reference import image_reference, level_reference
from tasks.evaluate.report import publish_artifacts
from tasks.evaluate.rows import registry_rows
from tasks.train.level_data import Latents, load_latents, regions_of, valid_rows
from tasks.encode.phase_clock import Laps
from tasks.progress import Progress
from tasks.stage import Done, Stage, pick_device, run_stage, stage_task
from tasks.evaluate.structure_pool import process_structure
from tasks.judge.stage import NOT_SCENES
from tasks.train.generator_job import num_classes
from tasks.train.stage import load_flat_generator


def _sampled_keys(layout: Layout) -> list[str]:
    return [layout.keys.shared_generator] if layout.sharing == "shared" else list(layout.keys.generators)


def _load_generators(cfg: TFConfig, layout: Layout, grid: int, dim: int, device: str) -> list[TrajectoryDiT]:
    """The sampler of each level: its own model, or the one shared model at every level."""
    loaded: dict = {}
    for level in range(cfg.hierarchy.generator_levels):
        folder = layout.level_generator(level)
        if folder not in loaded:
            config = generator_config(cfg, grid, dim, num_classes(layout))
            model, _ = load_built(folder / "generator", lambda _: TrajectoryDiT(config), device)
            loaded[folder] = model.eval()
    return [loaded[layout.level_generator(level)] for level in range(cfg.hierarchy.generator_levels)]


def _extractors(cfg: TFConfig, device: str):
    """The re-encoding DINOv2 (also the FD-DINOv2 extractor) and Inception when its weights exist."""
    ev = cfg.evaluate
    encoder, weights_label = load_encoder(cfg.encoder.model, cfg.source.image_size, cfg.encoder.weights,
                                           cfg.encoder.allow_random_init)
    encoder = encoder.to(device).eval()
    dinov2 = {"fn": dinov2_feature_fn(encoder, device, batch_size=cfg.encoder.batch_size),
              "label": dinov2_extractor_label(encoder, weights_label),
              "row": {"feature_extractor": f"dinov2-cls:{cfg.encoder.model}", "extractor_weights": weights_label}}
    reason = fidelity_unavailable_reason(ev.inception_weights)
    inception = {"fn": None, "label": None, "reason": reason,
                 "row": {"feature_extractor": "inception-v3-compat", "extractor_weights": ev.inception_weights or ""}}
    if reason is None:
        inception["fn"] = inception_feature_fn(ev.inception_weights, device)
        inception["label"] = inception_extractor_label(ev.inception_weights)
    return encoder, weights_label, dinov2, inception


def _image_reference(cfg: TFConfig, layout: Layout, real: np.ndarray, dinov2: dict, inception: dict,
                     device: str) -> tuple[dict, dict, float]:
    """(statistics, reused, seconds) of the real images' features over the image store's rows `real` (the
    latents' own samples, found by id); reused from the images store when it holds them (even under --force
    evaluate)."""
    began = time.perf_counter()
    ev = cfg.evaluate
    reference, reused = {}, {}
    # the direct path stores only a sample: the rest is decoded from the files, on the GPU where there is one
    split = DecodeSplit.for_encoder(cfg.encoder) if device.startswith("cuda") else None   # as the encode pass
    pixels = functools.partial(real_pixel_batches, cfg.source, layout.images(), device=device,
                               readers=cfg.encoder.readers, split=split)
    for name, extractor in (("dinov2", dinov2), ("inception", inception)):
        if extractor["fn"] is None:
            continue
        fns = {"dinov2_fn": extractor["fn"]} if name == "dinov2" else {"inception_fn": extractor["fn"]}
        arrays, reused[name] = image_reference(layout.images(), real, extractor["label"], device=device,
                                               batch_size=ev.batch_size, pixel_batches=pixels, **fns)
        reference.update(arrays)
    return reference, reused, time.perf_counter() - began


@stage_task("evaluate")
def evaluate_run(cfg: TFConfig, root: str, run_id: str, force: bool = False) -> dict:
    layout = stage_layout(root, cfg)
    out, key = layout.mode_evaluation()
    stage = Stage("evaluate", key, out, store_stage="", needs=evaluation_needs(cfg, layout))
    if cfg.source.kind == "scenes":   # trained (or reused) before the evaluation holds it as a store it reads
        ensure_judge(cfg, root)

    def reused() -> dict:
        done = zarr_store.completion(out)
        return {"metrics_table": done["table"], "grid_png": str(out / "grid.png"), "rows": done["metrics_rows"]}

    return run_stage(cfg, stage, force, lambda: _evaluate(cfg, root, run_id, layout), reused=reused)


def evaluation_needs(cfg: TFConfig, layout: Layout) -> list[tuple[Path, str]]:
    """Every stage folder the evaluation reads, with the command that makes it: the latents first (the
    evaluation's rows are theirs), the teacher, the decoder, the generators it samples, the scenes judge,
    and the image store (the real side)."""
    if cfg.generator.mode == "flat":
        generators = [layout.flat_generator()]
    else:
        levels = range(cfg.hierarchy.generator_levels)
        generators = list(dict.fromkeys(layout.level_generator(level) for level in levels))   # shared: one
    judge = [(layout.judge(), "judge")] if cfg.source.kind == "scenes" else []
    return [(layout.latents(), "encode"), (layout.teacher(), "hierarchy"), (layout.decoder(), "train"),
            *[(g, "train") for g in generators], *judge, (layout.images(), "ingest")]


def _number(value) -> float:
    return float("nan") if value is None else float(value)


@dataclass
class Scoring:
    """Everything scoring generators of one root needs, loaded once: its latents and teacher, the decoder,
    the extractors, the real-side statistics and the judge. The evaluate stage scores its generators with
    it; bench/trajectory_proof.py scores its training snapshots with the same."""
    cfg: TFConfig
    device: str
    latents: Latents
    teacher: torch.Tensor
    decoder: TokenDecoder
    decoder_meta: dict
    encoder: torch.nn.Module
    weights_label: str
    dinov2: dict
    inception: dict
    reference: dict
    reference_reused: dict
    judge: dict | None
    real_rows: np.ndarray   # the image store's row of each latent, found by sample id
    load_s: dict = field(default_factory=dict)   # where loading went: the real images' features ran beside

    @property
    def grid(self) -> int:
        return self.latents.grid

    @property
    def dim(self) -> int:
        return self.latents.dim


def load_scoring(cfg: TFConfig, root: str, layout: Layout, device: str) -> Scoring:
    began = time.perf_counter()
    ids = zarr_store.sample_ids(layout.latents(), valid_rows(layout.latents()))
    real = zarr_store.rows_of(layout.images(), ids)   # the image store's row of each latent, by id
    encoder, weights_label, dinov2, inception = _extractors(cfg, device)
    # The real images' features (the first time, a decode and encode of every image: 15 s for 50,000 on an
    # H100) are computed beside the host-bound reads of the latents (20 GB at 50,000 B-sized latents), the
    # teacher and the decoder; the level statistics, GPU work too, come after (the decode starves beside
    # other GPU work, docs/gpu.md).
    with cf.ThreadPoolExecutor(1, thread_name_prefix="real-reference") as beside:
        # in this context's copy: the thread's progress artifact belongs to this Prefect task run
        images_side = beside.submit(contextvars.copy_context().run, _image_reference, cfg, layout, real, dinov2,
                                    inception, device)
        started = time.perf_counter()
        latents = load_latents(layout.latents())
        teacher = regions_of(layout.teacher(), latents)
        grid, dim = latents.grid, latents.dim
        decoder, decoder_meta = load_built(layout.decoder() / "decoder",
                                           lambda _: TokenDecoder(decoder_spec(cfg, grid, dim)), device)
        decoder = decoder.eval()
        loaded_s = time.perf_counter() - started
        reference, reference_reused, images_s = images_side.result()
    if not np.array_equal(latents.ids, ids):
        raise RuntimeError(f"{layout.latents()} changed while the evaluation read it")
    joined_s = time.perf_counter() - began
    reference.update(level_reference(latents, teacher, device=device, batch_size=cfg.evaluate.batch_size,
                                     tokens_per_sample=cfg.evaluate.tokens_per_sample))
    load_s = {"real_images_beside": round(images_s, 3), "latents_teacher_decoder": round(loaded_s, 3),
              "until_both_done": round(joined_s, 3),
              "level_reference": round(time.perf_counter() - began - joined_s, 3)}
    judge = prepare_judge(cfg, root, layout, real, grid, device, cfg.evaluate.batch_size)   # None unless scenes
    if judge is not None:
        reference.update(judge["reference"])
        reference_reused["judge"] = judge["reused"]
    return Scoring(cfg, device, latents, teacher, decoder, decoder_meta, encoder, weights_label, dinov2, inception,
                   reference, reference_reused, judge, real, load_s)


def sample_seeds(cfg: TFConfig, num_samples: int) -> np.ndarray:
    """One seed per generated sample, from evaluate.seed: sample i is the same in every evaluation."""
    return cfg.evaluate.seed * 1_000_003 + np.arange(num_samples)


def stream_samples(scoring: Scoring, generators: list[TrajectoryDiT], num_samples: int, plan: EvalPlan,
                   progress=None) -> StreamingEvalResult:
    """Sample `num_samples` trajectories of `generators` (seeds from evaluate.seed) and fold every metric."""
    cfg, ev = scoring.cfg, scoring.cfg.evaluate
    seeds = sample_seeds(cfg, num_samples)
    judge = scoring.judge
    scorers = Scorers(scoring.dinov2["fn"], scoring.inception["fn"], None if judge is None else judge["fn"],
                      scoring.encoder, hierarchy_spec(cfg.hierarchy), (scoring.latents.mean, scoring.latents.std))
    # noise comes from per-sample CPU generators (the same in any batch and on any device): on a GPU machine
    # threads draw it a batch ahead, or it would bound the pass (39 G normals, 157 GB, for 50k B-sized samples)
    threads = min(8, max(1, (os.cpu_count() or 2) // 2)) if torch.device(scoring.device).type == "cuda" else 0
    runtime = Runtime(scoring.device, structure_runner=process_structure(ev.structure_workers),
                      noise_threads=threads, progress=progress)
    return evaluate_streaming(generators, scoring.decoder, seeds, scoring.latents.label.numpy(), scorers, plan,
                              runtime, token_shape=(scoring.grid * scoring.grid, scoring.dim))


def supplied_values(scoring: Scoring, layout: Layout) -> dict[str, list[MetricValues]]:
    """Values computed outside the engine, by registry entry: the decoder's held-out quality, the judge
    on held-out real scenes, and the teacher's alignment with the ground truth."""
    meta = scoring.decoder_meta
    supplied = {"decoder": [pooled("decoder", name, _number(meta.get(name)), meta.get("holdout_n", 0))
                            for name in ("holdout_psnr", "holdout_ssim")]}
    if scoring.judge is not None:
        supplied.update(holdout_values(scoring.judge, layout, scoring.cfg.hierarchy.generator_levels))
    if zarr_store.has_array(layout.images(), "masks"):
        truth = masks_to_grid(zarr_store.open_array(layout.images(), "masks").oindex[scoring.real_rows],
                              scoring.grid)
        supplied["alignment"] = hierarchy_alignment(scoring.teacher.numpy(),
                                                    truth.reshape(len(truth), truth.shape[1], -1))
    return supplied


def _evaluate(cfg: TFConfig, root: str, run_id: str, layout: Layout) -> Done:
    flat = cfg.generator.mode == "flat"
    out, key = layout.mode_evaluation()
    ev = cfg.evaluate
    device = pick_device(cfg.device)
    laps = Laps()   # where the stage's wall time went, before, in and after the sample loop
    scoring = load_scoring(cfg, root, layout, device)
    laps.lap("load_scoring_and_reference")
    latents, decoder, judge = scoring.latents, scoring.decoder, scoring.judge
    grid, dim, levels = latents.grid, latents.dim, cfg.hierarchy.generator_levels
    patch = cfg.source.image_size // grid
    generators = [load_flat_generator(cfg, root, grid, dim, device)] if flat else \
        _load_generators(cfg, layout, grid, dim, device)
    laps.lap("load_generators")

    # Sample and score every trajectory in batches; keep whole only the first few (stored, edited, shown).
    seeds = sample_seeds(cfg, ev.num_samples)
    keep = min(ev.num_samples, max(ev.keep_trajectories, ev.grid_rows, 2))
    with Progress(ev.num_samples, "evaluate: sample + metrics", unit="sample") as bar:
        result = stream_samples(scoring, generators, ev.num_samples, eval_plan(cfg, keep),
                                progress=lambda done, total, timing: bar.advance(done - bar.done))
    laps.lap("sample_loop")
    supplied = supplied_values(scoring, layout)

    def decode(tokens: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([tensor_to_images(decoder(b.to(device)).cpu()) for b in tokens.split(64)])

    kept = result.kept
    if flat:   # no levels to edit; the kept regions are the hierarchy rebuilt on each final
        regions = [kept.regions[:, level] for level in range(levels - 1)]
    else:   # edits on the kept trajectories, re-sampled in float32 like the edited ones so only the edit differs
        kept_labels = torch.from_numpy(kept.labels).to(device)
        noises = level_noises(levels, grid * grid, dim, kept.seeds.tolist(), device)
        with torch.no_grad():
            base = sample_trajectory(generators, noises, kept_labels, snap_threshold=ev.snap_threshold())
        regions = generated_regions([c.float().cpu().numpy() for c in base],
                                    own_regions_cut(ev.region_threshold, ev.snap_threshold()))
        specs = plan_edits(keep, regions, levels, ev.edits_per_level, ev.seed)
        supplied["control"], edited = run_edit_suite(generators, noises, kept_labels, base, regions, specs, decode,
                                                     grid, patch, ev.snap_threshold())
    laps.lap("edits")
    setting = EvalSetting(levels, cfg.generator.mode, scoring.inception["reason"],
                          None if judge is not None else NOT_SCENES + f" (source.kind is {cfg.source.kind!r})",
                          ev.structure_samples, ev.reencode_samples)
    labels = {"dinov2": scoring.dinov2["row"], "inception": scoring.inception["row"], "judge": judge_labels(layout),
              "encoder": {"feature_extractor": cfg.encoder.model, "extractor_weights": scoring.weights_label}}
    rows = registry_rows(setting, metric_values_by_entry(result, scoring.reference, supplied=supplied), labels,
                         ev.bootstrap)
    context = {"latents_key": layout.keys.latents, "teacher_key": layout.keys.teacher,
               "model_key": stable_hash([layout.keys.decoder, layout.keys.flat_generator] if flat else
                                        [layout.keys.decoder, *_sampled_keys(layout)]),
               "code_version": f"evaluate-v{CODE_VERSIONS['evaluate']}", "encoder_weights": latents.weights_label,
               "mode": cfg.generator.mode}
    laps.lap("rows_and_intervals")
    table = write_metrics(root, run_id, rows, context)

    ids = [f"traj-{s}" for s in seeds]
    attrs = {"stage": "evaluate", "key": key, "run_id": run_id, "encoder_weights": latents.weights_label,
             "mode": cfg.generator.mode, "snap_threshold": ev.snap_threshold()}   # edits re-sample the same way
    stored = kept.canvases.shape[1]   # every level, or the final alone (flat)
    write_trajectories(out / "trajectories.zarr", ids[:keep], kept.seeds, kept.labels,
                       kept.canvases.reshape(keep, stored, grid, grid, dim), kept.images,
                       np.stack(regions, 1).reshape(keep, levels - 1, grid, grid), attrs,
                       level_ids=np.arange(levels - stored, levels))
    if not flat:
        _write_edits(out, run_id, ids, specs, edited, regions, kept, decode, attrs, levels, grid, dim)
    write_grid(out / "grid.png", kept.images[:min(ev.grid_rows, keep)])
    publish_artifacts(run_id, rows, out, table)
    laps.lap("write_outputs")
    timing = {k: round(float(v), 3) for k, v in result.timing.items()}
    return Done({"run_id": run_id, "metrics_rows": len(rows), "table": str(table), "timing_s": timing,
                 "wall_s": laps.seconds, "load_s": scoring.load_s, "counts": result.counts,
                 "reference_reused": scoring.reference_reused},
                {"metrics_table": str(table), "grid_png": str(out / "grid.png"), "rows": len(rows),
                 "reference_reused": scoring.reference_reused, "images": ev.num_samples, "timing_s": timing,
                 "wall_s": laps.seconds, "load_s": scoring.load_s})


def _write_edits(out, run_id: str, ids: list[str], specs: list[dict], edited: list[list[torch.Tensor]],
                 regions: list[np.ndarray], kept, decode, attrs: dict, levels: int, grid: int, dim: int) -> None:
    """Edit objects (id, parent, donor, level, region, source) in Parquet and their trajectories in Zarr."""
    edit_records = [{"edit_id": e, "parent": ids[s["parent"]], "donor": ids[s["donor"]], "level": s["level"],
                     "region": s["region"], "source": s["kind"], "result": f"{e}-traj", "run_id": run_id}
                    for e, s in zip([new_edit_id() for _ in specs], specs)]
    write_edits(out / "edits.parquet", edit_records)
    parents = [s["parent"] for s in specs]
    edited_levels = [torch.cat([batch[level] for batch in edited]) for level in range(levels)]
    write_trajectories(out / "edits.zarr", [r["result"] for r in edit_records], kept.seeds[parents],
                       kept.labels[parents],
                       np.stack([c.float().cpu().numpy() for c in edited_levels], 1).reshape(len(specs), levels, grid, grid, dim),
                       np.stack([decode(c) for c in edited_levels], 1),
                       np.stack([regions[l][parents] for l in range(levels - 1)], 1).reshape(len(specs), levels - 1, grid, grid),
                       attrs, parents=[r["parent"] for r in edit_records])
