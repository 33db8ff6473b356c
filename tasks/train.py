"""Train: the decoder (tokens -> pixels), one mean-flow generator per level, and the flat baseline.

Every training task resumes: each `checkpoint_every` steps the whole training state (weights,
optimisers, EMAs, RNGs, step) is snapshotted into the stage folder, and a re-run after a kill
continues from the latest snapshot, reaching the same weights as an unbroken run. The end of a
run writes the final checkpoints, then the `_COMPLETE` marker, then drops the snapshots.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.decoder import DecoderConfig, TokenDecoder, images_to_tensor, tensor_to_images
from models.dit import TrajectoryDiT, dit_config
from models.flat import flat_level, flat_level_data
from models.image_metrics import psnr, ssim
from models.meanflow import MeanFlowConfig
from models.train_loop import LevelData, OptimConfig, TrainState, train_decoder, train_generator
from models.train_state import export_state
from storage import zarr_store
from storage.checkpoints import (clear_train_state, is_complete, load_checkpoint, load_train_state, mark_complete,
                                 save_checkpoint, save_train_state)
from storage.config import TFConfig
from storage.files import remove_tree
from storage.keys import CODE_VERSIONS, Layout, stable_hash
from tasks.level_data import level_data, load_latents, load_regions
from tasks.progress import Progress
from tasks.stage import pick_device, stage_result


def decoder_config(cfg: TFConfig, grid: int, dim: int) -> DecoderConfig:
    d = cfg.decoder
    return DecoderConfig(token_dim=dim, grid=grid, patch=cfg.source.image_size // grid,
                         width=d.width, depth=d.depth, heads=d.heads)


def generator_config(cfg: TFConfig, grid: int, dim: int, num_classes: int):
    g = cfg.generator
    overrides = {k: v for k, v in (("width", g.width), ("depth", g.depth), ("head_depth", g.head_depth),
                                   ("heads", g.heads)) if v is not None}
    return dit_config(g.preset, token_dim=dim, grid=grid, num_classes=num_classes,
                      num_levels=cfg.hierarchy.num_levels, **overrides)


def objective_config(cfg: TFConfig) -> MeanFlowConfig:
    g = cfg.generator
    return MeanFlowConfig(time_shift=g.time_shift, uniform_share=g.uniform_share, equal_share=g.equal_share,
                          t_floor=g.t_floor, adaptive_eps=g.adaptive_eps, v_weight=g.v_weight,
                          region_weight=g.region_weight, label_dropout=g.label_dropout)


def generator_optim(cfg: TFConfig, seed: int) -> OptimConfig:
    g = cfg.generator
    return OptimConfig(steps=g.steps, batch_size=g.batch_size, lr=g.lr, weight_decay=g.weight_decay,
                       warmup_steps=g.warmup_steps, grad_clip=g.grad_clip,
                       ema_decays=sorted(set(g.ema_decays) | {g.ema_decay}), optimizer=g.optimizer,
                       checkpoint_every=g.checkpoint_every, compile=g.compile, seed=seed)


def num_classes(layout: Layout) -> int:
    return len(zarr_store.store_attrs(layout.images())["classes"])


def flat_generator_dir(layout: Layout, cfg: TFConfig) -> Path:
    """The flat baseline's own stage folder: keyed by the generator config and the latents only."""
    key = stable_hash({"generator": cfg.generator.model_dump(), "latents": layout.keys.latents, "flat": True,
                       "v": CODE_VERSIONS["generator"]})
    return layout.root / f"generator-flat-{key}"


def ema_file(decay: float, chosen: float) -> str:
    """The sampled EMA is `generator`; the other tracked decays sit beside it."""
    return "generator" if decay == chosen else f"generator-ema{decay!r}"


def snapshotter(folder: Path, name: str, enabled: bool = True):
    """on_checkpoint callback: export the TrainState and commit it as the stage's latest snapshot."""
    def on_checkpoint(state: TrainState) -> None:
        if enabled:
            tensors, meta = export_state(state)
            save_train_state(folder, name, state.step, tensors, meta)
    return on_checkpoint


def run_with_progress(description: str, total: int, start: int, train):
    """`train(on_step)` under a progress bar that starts at the resumed step."""
    with Progress(total, description, unit="step") as bar:
        if start:
            bar.advance(start)
        return train(lambda step, stats: bar.advance(1, loss=f"{stats['loss']:.4f}"))


@task(name="train-decoder", cache_policy=NO_CACHE)
def train_decoder_task(cfg: TFConfig, root: str, force: bool = False) -> dict:
    started = time.monotonic()
    layout = Layout(root, cfg)
    folder = layout.decoder()
    if force:
        remove_tree(folder)
    if is_complete(folder):
        return stage_result("train-decoder", layout.keys.decoder, folder, False, started)
    device = pick_device(cfg.device)
    latents = load_latents(layout.latents())
    images = images_to_tensor(zarr_store.open_array(layout.images(), "image").oindex[latents.index])
    d = cfg.decoder
    torch.manual_seed(d.seed)
    decoder = TokenDecoder(decoder_config(cfg, latents.grid, latents.tokens.shape[-1]))
    held = max(1, int(round(d.holdout * len(images))))
    train_idx, test_idx = np.arange(len(images) - held), np.arange(len(images) - held, len(images))
    history: dict[str, list[float]] = {}
    if d.checkpoint:  # a given decoder is validated here, not trained
        tensors, _ = load_checkpoint(d.checkpoint.removesuffix(".safetensors"))
        decoder.load_state_dict(tensors)
    else:
        optim = OptimConfig(steps=d.steps, batch_size=d.batch_size, lr=d.lr, warmup_steps=20, ema_decays=[0.99],
                            checkpoint_every=d.checkpoint_every, seed=d.seed)
        resume = load_train_state(folder, "decoder")
        state = run_with_progress("train decoder", optim.steps, resume[1]["step"] if resume else 0, lambda on_step:
                                  train_decoder(decoder, latents.tokens[train_idx], images[train_idx], optim, device,
                                                on_step, resume=resume, on_checkpoint=snapshotter(folder, "decoder")))
        decoder, history = state.ema(0.99), state.history
    with torch.no_grad():
        recon = tensor_to_images(decoder.to(device).eval()(latents.tokens[test_idx].to(device)).cpu())
    truth = tensor_to_images(images[test_idx])
    quality = {"holdout_psnr": float(np.mean([psnr(a, b) for a, b in zip(recon, truth)])),
               "holdout_ssim": float(np.mean([ssim(a, b) for a, b in zip(recon, truth)])),
               "holdout_n": int(held)}
    meta = {"stage": "decoder", "key": layout.keys.decoder, "latents_key": layout.keys.latents,
            "config": asdict(decoder.config), "encoder_weights": latents.weights_label,
            "final_loss": history["loss"][-1] if history else None, **quality}
    save_checkpoint(folder / "decoder", dict(decoder.cpu().state_dict()), meta)
    mark_complete(folder, {"stage": "decoder", "key": layout.keys.decoder})
    clear_train_state(folder, "decoder")
    return stage_result("train-decoder", layout.keys.decoder, folder, True, started, **quality)


def generator_job(cfg: TFConfig, root: str, level: int | None) -> dict:
    """Everything to train one generator (level l, or the flat baseline for level None), shared by the
    Prefect task and the torchrun entry point: data, a seeded fresh model, optimiser config, folder."""
    layout = Layout(root, cfg)
    latents = load_latents(layout.latents())
    num_levels = cfg.hierarchy.num_levels
    if level is None:
        data: LevelData = flat_level_data(latents.tokens, latents.label)
        folder, key, train_level, seed = flat_generator_dir(layout, cfg), None, flat_level(num_levels), cfg.generator.seed
        key = folder.name.removeprefix("generator-flat-")
    else:
        data = level_data(latents, load_regions(layout.teacher(), latents.index), level)
        folder, key, train_level, seed = layout.generator(level), layout.keys.generators[level], level, \
            cfg.generator.seed + level
    torch.manual_seed(seed)
    model = TrajectoryDiT(generator_config(cfg, latents.grid, latents.tokens.shape[-1], num_classes(layout)))
    meta = {"stage": "generator", "level": level, "flat": level is None, "trained_level": train_level, "key": key,
            "latents_key": layout.keys.latents, "teacher_key": None if level is None else layout.keys.teacher,
            "config": asdict(model.config), "objective": asdict(objective_config(cfg)),
            "encoder_weights": latents.weights_label, "optimizer": cfg.generator.optimizer}
    return {"data": data, "model": model, "optim": generator_optim(cfg, seed), "folder": folder, "key": key,
            "level": train_level, "meta": meta}


def finish_generator(cfg: TFConfig, job: dict, state: TrainState) -> dict:
    """Final checkpoints (one per EMA decay; `generator` is the sampled one), marker, snapshot cleanup."""
    losses = state.history.get("loss", [])
    tail = losses[-max(1, len(losses) // 10):]
    meta = {**job["meta"], "steps": state.step, "first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(tail)) if tail else None}
    for ema in state.emas:
        save_checkpoint(job["folder"] / ema_file(ema.decay, cfg.generator.ema_decay),
                        dict(ema.shadow.cpu().state_dict()), {**meta, "ema_decay": ema.decay})
    mark_complete(job["folder"], {"stage": "generator", "key": job["key"], "steps": state.step})
    clear_train_state(job["folder"], "generator")
    return meta


def _train_generator_stage(cfg: TFConfig, root: str, level: int | None, force: bool, stage: str) -> dict:
    started = time.monotonic()
    layout = Layout(root, cfg)
    folder = layout.generator(level) if level is not None else flat_generator_dir(layout, cfg)
    if force:
        remove_tree(folder)
    key = layout.keys.generators[level] if level is not None else folder.name.removeprefix("generator-flat-")
    if is_complete(folder):
        return stage_result(stage, key, folder, False, started)
    device = pick_device(cfg.device)
    job = generator_job(cfg, root, level)
    resume = load_train_state(folder, "generator")
    start = resume[1]["step"] if resume else 0
    state = run_with_progress(f"train {stage}", job["optim"].steps, start, lambda on_step: train_generator(
        job["model"], job["data"], job["level"], objective_config(cfg), job["optim"], device, on_step,
        resume=resume, on_checkpoint=snapshotter(folder, "generator")))
    meta = finish_generator(cfg, job, state)
    return stage_result(stage, key, folder, True, started, final_loss=meta["final_loss"], resumed_from_step=start)


@task(name="train-level", cache_policy=NO_CACHE, task_run_name="train-level-{level}")
def train_level_task(cfg: TFConfig, root: str, level: int, force: bool = False) -> dict:
    return _train_generator_stage(cfg, root, level, force, f"train-L{level}")


@task(name="train-flat", cache_policy=NO_CACHE)
def train_flat_task(cfg: TFConfig, root: str, force: bool = False) -> dict:
    """The flat baseline: one one-step model to the full latent, same backbone and step budget."""
    return _train_generator_stage(cfg, root, None, force, "train-flat")


def load_flat_generator(cfg: TFConfig, root: str, grid: int, dim: int, device: str = "cpu") -> TrajectoryDiT:
    layout = Layout(root, cfg)
    model = TrajectoryDiT(generator_config(cfg, grid, dim, num_classes(layout)))
    tensors, _ = load_checkpoint(flat_generator_dir(layout, cfg) / "generator", device)
    model.load_state_dict(tensors)
    return model.to(device).eval()
