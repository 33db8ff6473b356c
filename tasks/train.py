"""Train: the decoder (tokens -> pixels), one mean-flow generator per level, and the flat baseline.

Every training task resumes: each `checkpoint_every` steps the whole training state (weights,
optimisers, EMAs, RNGs, step) is snapshotted into the stage folder, and a re-run after a kill
continues from the latest snapshot, reaching the same weights as an unbroken run. The end of a
run writes the final checkpoints, then the `_COMPLETE` marker, then drops the snapshots.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.decoder import DecoderConfig, TokenDecoder, images_to_tensor, tensor_to_images
from models.dit import TrajectoryDiT
from models.image_metrics import psnr, ssim
from models.train_loop import OptimConfig, train_decoder, train_generator
from models.train_state import ema_name
from storage import zarr_store
from storage.checkpoints import clear_train_state, is_complete, load_checkpoint, load_train_state, mark_complete, \
    save_checkpoint
from storage.config import TFConfig
from storage.files import remove_tree
from storage.keys import Layout
from tasks.generator_job import (SHARED, finish_generator, flat_generator_dir, generator_config,  # noqa: F401
                                 generator_folder, generator_job, num_classes, objective_config,
                                 snapshotter)
from tasks.level_data import load_latents
from tasks.progress import Progress
from tasks.stage import STAGE_RETRIES, cpu_threads, pick_device, stage_lock, stage_result


DECODER_EMA_KIMG = 500.0


def decoder_config(cfg: TFConfig, grid: int, dim: int) -> DecoderConfig:
    d = cfg.decoder
    return DecoderConfig(token_dim=dim, grid=grid, patch=cfg.source.image_size // grid,
                         width=d.width, depth=d.depth, heads=d.heads)


def run_with_progress(description: str, total: int, start: int, train):
    """`train(on_step)` under a progress bar that starts at the resumed step."""
    with Progress(total, description, unit="step") as bar:
        if start:
            bar.advance(start)
        return train(lambda step, stats: bar.advance(1, loss=f"{stats['loss']:.4f}"))


@task(name="train-decoder", cache_policy=NO_CACHE, **STAGE_RETRIES)
def train_decoder_task(cfg: TFConfig, root: str, force: bool = False) -> dict:
    with stage_lock(cfg, Layout(root, cfg).decoder()):   # a second run on this folder waits or fails here
        return _train_decoder(cfg, root, force)


def _train_decoder(cfg: TFConfig, root: str, force: bool) -> dict:
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
        # EDM EMA: its half-life ramps up with the images seen, so a short run is not its random init
        optim = OptimConfig(steps=d.steps, batch_size=d.batch_size, lr=d.lr, warmup_steps=20, ema_decays=[],
                            ema_halflives_kimg=[DECODER_EMA_KIMG], checkpoint_every=d.checkpoint_every, seed=d.seed)
        resume = load_train_state(folder, "decoder")
        with cpu_threads(device):
            state = run_with_progress("train decoder", optim.steps, resume[1]["step"] if resume else 0, lambda on_step:
                                      train_decoder(decoder, latents.tokens[train_idx], images[train_idx], optim,
                                                    device, on_step, resume=resume,
                                                    on_checkpoint=snapshotter(folder, "decoder")))
        decoder, history = state.ema(ema_name(halflife_kimg=DECODER_EMA_KIMG)), state.history
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


def _train_generator_stage(cfg: TFConfig, root: str, which: int | str | None, force: bool, stage: str) -> dict:
    started = time.monotonic()
    layout = Layout(root, cfg)
    folder, key = generator_folder(layout, which)
    if force:
        remove_tree(folder)
    if is_complete(folder):
        return stage_result(stage, key, folder, False, started)
    device = pick_device(cfg.device)
    job = generator_job(cfg, root, which)
    resume = load_train_state(folder, "generator")   # a killed run continues from its latest snapshot
    start = resume[1]["step"] if resume else 0
    with cpu_threads(device):
        state = run_with_progress(f"train {stage}", job["optim"].steps, start, lambda on_step: train_generator(
            job["model"], job["data"], job["level"], job["objective"], job["optim"], device, on_step,
            resume=resume, on_checkpoint=snapshotter(folder, "generator")))
    meta = finish_generator(job, state, resumed_from_step=start)
    return stage_result(stage, key, folder, True, started, final_loss=meta["final_loss"], resumed_from_step=start)


@task(name="train-level", cache_policy=NO_CACHE, **STAGE_RETRIES, task_run_name="train-level-{level}")
def train_level_task(cfg: TFConfig, root: str, level: int, force: bool = False) -> dict:
    with stage_lock(cfg, Layout(root, cfg).generator(level)):
        return _train_generator_stage(cfg, root, level, force, f"train-L{level}")


@task(name="train-shared", cache_policy=NO_CACHE, **STAGE_RETRIES)
def train_shared_task(cfg: TFConfig, root: str, force: bool = False) -> dict:
    """One generator for every level (generator.sharing: shared), level-conditioned."""
    with stage_lock(cfg, Layout(root, cfg).shared_generator()):
        return _train_generator_stage(cfg, root, SHARED, force, "train-shared")


@task(name="train-flat", cache_policy=NO_CACHE, **STAGE_RETRIES)
def train_flat_task(cfg: TFConfig, root: str, force: bool = False) -> dict:
    """The flat baseline: one one-step model to the full latent, same backbone and step budget."""
    with stage_lock(cfg, Layout(root, cfg).flat_generator()):
        return _train_generator_stage(cfg, root, None, force, "train-flat")


def load_flat_generator(cfg: TFConfig, root: str, grid: int, dim: int, device: str = "cpu") -> TrajectoryDiT:
    layout = Layout(root, cfg)
    model = TrajectoryDiT(generator_config(cfg, grid, dim, num_classes(layout)))
    tensors, _ = load_checkpoint(layout.flat_generator() / "generator", device)
    model.load_state_dict(tensors)
    return model.to(device).eval()
