"""Evaluate: sample trajectories, decode every level, run the edit suite, write metric tables.

Reads the latent/teacher/image stores and the checkpoints; writes the evaluation folder
(trajectories Zarr, edits Parquet, grid PNG) and one metrics Parquet part for the run.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.decoder import TokenDecoder, tensor_to_images
from models.dit import TrajectoryDiT
from models.edit_suite import plan_edits, run_edit_suite
from models.encoder import build_encoder, encode_images
from models.fidelity import fidelity_unavailable_reason, inception_metrics
from models.hierarchy import build_hierarchies
from models.metrics import bootstrap_ci, fd_from_features
from models.trajectory import level_noises, sample_trajectory
from models.trajectory_metrics import (MetricValues, generated_regions, hierarchy_alignment, per_level_fd,
                                       reencode_agreement, structural_consistency)
from storage import zarr_store
from storage.checkpoints import load_checkpoint
from storage.config import TFConfig
from storage.files import remove_tree
from storage.keys import CODE_VERSIONS, Layout, stable_hash
from storage.scenes import masks_to_grid
from storage.tables import metric_row, write_metrics
from storage.trajectory_store import new_edit_id, write_edits, write_grid, write_trajectories
from tasks.level_data import canvases, load_latents, load_regions
from tasks.progress import Progress
from tasks.stage import pick_device, stage_result
from tasks.train import decoder_config, generator_config, num_classes
from tasks.chunk_workers import hierarchy_spec
from tasks.evaluate_report import publish_artifacts


def _load_generators(cfg: TFConfig, layout: Layout, grid: int, dim: int, device: str) -> list[TrajectoryDiT]:
    models = []
    for level in range(cfg.hierarchy.num_levels):
        model = TrajectoryDiT(generator_config(cfg, grid, dim, num_classes(layout)))
        tensors, _ = load_checkpoint(layout.generator(level) / "generator", device)
        model.load_state_dict(tensors)
        models.append(model.to(device).eval())
    return models


def _rows(values: list[MetricValues], n_boot: int, **labels) -> list[dict]:
    rows = []
    for v in values:
        finite = v.values[np.isfinite(v.values)]
        if v.pooled:
            n = v.extra.get("n", len(v.values))
            rows.append(metric_row(v.group, v.metric, float(v.values[0]), level=v.level, variant=v.variant, n=n, **labels))
        elif len(finite) == 0:
            rows.append(metric_row(v.group, v.metric, None, level=v.level, variant=v.variant, status="skipped",
                                   reason="no finite per-sample values (e.g. empty or full regions)", **labels))
        else:
            rows.append(metric_row(v.group, v.metric, float(finite.mean()), level=v.level, variant=v.variant,
                                   n=len(finite), ci=bootstrap_ci(finite, n_boot=n_boot), **labels))
    return rows


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_run(cfg: TFConfig, root: str, run_id: str, force: bool = False) -> dict:
    started = time.monotonic()
    layout = Layout(root, cfg)
    out = layout.evaluation()
    if force:
        remove_tree(out)
    if zarr_store.is_complete(out):
        done = zarr_store.completion(out)
        return stage_result("evaluate", layout.keys.evaluate, out, False, started, metrics_table=done["table"],
                            grid_png=str(out / "grid.png"), rows=done["metrics_rows"])
    ev = cfg.evaluate
    device = pick_device(cfg.device)
    latents = load_latents(layout.latents())
    teacher = load_regions(layout.teacher(), latents.index)
    grid, dim, levels = latents.grid, latents.tokens.shape[-1], cfg.hierarchy.num_levels
    patch = cfg.source.image_size // grid
    generators = _load_generators(cfg, layout, grid, dim, device)
    decoder = TokenDecoder(decoder_config(cfg, grid, dim))
    decoder_tensors, decoder_meta = load_checkpoint(layout.decoder() / "decoder", device)
    decoder.load_state_dict(decoder_tensors)
    decoder = decoder.to(device).eval()

    def decode(tokens: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([tensor_to_images(decoder(b.to(device)).cpu()) for b in tokens.split(64)])

    # Sample trajectories: labels follow the data's classes, each sample has its own seed.
    rng = np.random.default_rng(ev.seed)
    seeds = ev.seed * 1_000_003 + np.arange(ev.num_samples)
    label = torch.from_numpy(rng.choice(latents.label.numpy(), ev.num_samples)).to(device)
    noises = level_noises(levels, grid * grid, dim, seeds.tolist(), device)
    with Progress(5, "evaluate", unit="step") as bar:
        trajectory = sample_trajectory(generators, noises, label)
        generated = [c.float().cpu().numpy() for c in trajectory]
        level_images = [decode(c) for c in trajectory]
        regions = generated_regions(generated, ev.region_threshold)
        bar.advance()

        encoder, encoder_label = build_encoder(cfg.encoder.model, cfg.source.image_size, cfg.encoder.weights,
                                               cfg.encoder.allow_random_init)
        encoder = encoder.to(device)
        reencoded = encode_images(encoder, level_images[-1], device=device, batch_size=cfg.encoder.batch_size)
        real_raw = latents.tokens.numpy() * latents.std + latents.mean
        labels = {"feature_extractor": cfg.encoder.model, "extractor_weights": encoder_label}
        values: list[MetricValues] = []
        fd = fd_from_features(reencoded.reshape(len(reencoded), -1, dim).mean(1), real_raw.mean(1))
        quality = [metric_row("quality", "fd_dinov2", fd, n=ev.num_samples, **labels)]
        real_images = zarr_store.open_array(layout.images(), "image").oindex[latents.index]
        reason = fidelity_unavailable_reason(ev.inception_weights)
        inception = {"feature_extractor": "inception-v3-compat", "extractor_weights": ev.inception_weights or ""}
        if reason is None:
            scores = inception_metrics(level_images[-1], real_images, ev.inception_weights, device=device)
            quality += [metric_row("quality", name, value, n=ev.num_samples, **inception) for name, value in scores.items()]
        else:
            quality += [metric_row("quality", name, None, status="skipped", reason=reason, **inception)
                        for name in ("fid", "kid_mean", "is_mean")]
        bar.advance()

        real_levels = [c.numpy() for c in canvases(latents.tokens, teacher)]
        values += per_level_fd(generated, real_levels)
        values += structural_consistency(generated, regions)
        rebuilt = build_hierarchies(reencoded, hierarchy_spec(cfg.hierarchy))
        values += reencode_agreement(regions, rebuilt.reshape(len(rebuilt), rebuilt.shape[1], -1))
        bar.advance()

        specs = plan_edits(ev.num_samples, regions, levels, ev.edits_per_level, ev.seed)
        control, edited = run_edit_suite(generators, noises, label, trajectory, regions, specs, decode, grid, patch)
        values += control
        bar.advance()

        if zarr_store.has_array(layout.images(), "masks"):
            truth = masks_to_grid(zarr_store.open_array(layout.images(), "masks").oindex[latents.index], grid)
            values += hierarchy_alignment(teacher.numpy(), truth.reshape(len(truth), truth.shape[1], -1))
        bar.advance()

    rows = quality + _rows(values, ev.bootstrap, **labels)
    rows += [metric_row("decoder", name, decoder_meta[key], n=decoder_meta.get("holdout_n", 0))
             for name, key in (("holdout_psnr", "holdout_psnr"), ("holdout_ssim", "holdout_ssim"))]
    context = {"latents_key": layout.keys.latents, "teacher_key": layout.keys.teacher,
               "model_key": stable_hash([layout.keys.decoder, *layout.keys.generators]),
               "code_version": f"evaluate-v{CODE_VERSIONS['evaluate']}", "encoder_weights": latents.weights_label}
    table = write_metrics(root, run_id, rows, context)

    keep = min(ev.keep_trajectories, ev.num_samples)
    ids = [f"traj-{s}" for s in seeds]
    stacked_canvas = np.stack(generated, 1)[:keep].reshape(keep, levels, grid, grid, dim)
    stacked_images = np.stack(level_images, 1)[:keep]
    stacked_regions = np.stack(regions, 1)[:keep].reshape(keep, levels - 1, grid, grid)
    attrs = {"stage": "evaluate", "key": layout.keys.evaluate, "run_id": run_id,
             "encoder_weights": latents.weights_label}
    write_trajectories(out / "trajectories.zarr", ids[:keep], seeds[:keep], label[:keep].cpu().numpy(),
                       stacked_canvas, stacked_images, stacked_regions, attrs)
    edit_ids = [new_edit_id() for _ in specs]
    edit_records = [{"edit_id": e, "parent": ids[s["parent"]], "donor": ids[s["donor"]], "level": s["level"],
                     "region": s["region"], "source": s["kind"], "result": f"{e}-traj", "run_id": run_id}
                    for e, s in zip(edit_ids, specs)]
    write_edits(out / "edits.parquet", edit_records)
    edited_levels = [torch.cat([batch[level] for batch in edited]) for level in range(levels)]
    write_trajectories(out / "edits.zarr", [r["result"] for r in edit_records],
                       np.asarray([seeds[s["parent"]] for s in specs]),
                       np.asarray([int(label[s["parent"]]) for s in specs]),
                       np.stack([c.float().cpu().numpy() for c in edited_levels], 1).reshape(len(specs), levels, grid, grid, dim),
                       np.stack([decode(c) for c in edited_levels], 1),
                       np.stack([regions[l][[s["parent"] for s in specs]] for l in range(levels - 1)], 1)
                       .reshape(len(specs), levels - 1, grid, grid),
                       attrs, parents=[r["parent"] for r in edit_records])
    rows_to_show = min(ev.grid_rows, ev.num_samples)
    write_grid(out / "grid.png", np.stack(level_images, 1)[:rows_to_show])
    publish_artifacts(run_id, rows, out, table)
    zarr_store.mark_complete(out, {"run_id": run_id, "metrics_rows": len(rows), "table": str(table)})
    return stage_result("evaluate", layout.keys.evaluate, out, True, started, metrics_table=str(table),
                        grid_png=str(out / "grid.png"), rows=len(rows))
