"""Train: the decoder (tokens -> pixels) and one mean-flow generator per level, as safetensors checkpoints."""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.decoder import DecoderConfig, TokenDecoder, images_to_tensor, tensor_to_images
from models.dit import TrajectoryDiT, dit_config
from models.image_metrics import psnr, ssim
from models.meanflow import MeanFlowConfig
from models.train_loop import OptimConfig, train_decoder, train_generator
from storage import zarr_store
from storage.checkpoints import checkpoint_exists, load_checkpoint, save_module
from storage.config import TFConfig
from storage.files import remove_tree
from storage.keys import Layout
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


def num_classes(layout: Layout) -> int:
    return len(zarr_store.store_attrs(layout.images())["classes"])


def _progress_callback(bar: Progress):
    def on_step(step: int, stats: dict) -> None:
        bar.advance(1, loss=f"{stats['loss']:.4f}")
    return on_step


@task(name="train-decoder", cache_policy=NO_CACHE)
def train_decoder_task(cfg: TFConfig, root: str, force: bool = False) -> dict:
    started = time.monotonic()
    layout = Layout(root, cfg)
    prefix = layout.decoder() / "decoder"
    if force:
        remove_tree(layout.decoder())
    if checkpoint_exists(prefix):
        return stage_result("train-decoder", layout.keys.decoder, layout.decoder(), False, started)
    device = pick_device(cfg.device)
    latents = load_latents(layout.latents())
    images = images_to_tensor(zarr_store.open_array(layout.images(), "image").oindex[latents.index])
    decoder = TokenDecoder(decoder_config(cfg, latents.grid, latents.tokens.shape[-1]))
    if cfg.decoder.checkpoint:  # a given decoder is validated here, not trained
        tensors, _ = load_checkpoint(cfg.decoder.checkpoint.removesuffix(".safetensors"))
        decoder.load_state_dict(tensors)
        history = []
    else:
        torch.manual_seed(cfg.decoder.seed)
        decoder = TokenDecoder(decoder_config(cfg, latents.grid, latents.tokens.shape[-1]))
    held = max(1, int(round(cfg.decoder.holdout * len(images))))
    train_idx, test_idx = np.arange(len(images) - held), np.arange(len(images) - held, len(images))
    d = cfg.decoder
    optim = OptimConfig(steps=d.steps, batch_size=d.batch_size, lr=d.lr, warmup_steps=20, ema_decay=0.99, seed=d.seed)
    if not cfg.decoder.checkpoint:
        with Progress(optim.steps, "train decoder", unit="step") as bar:
            decoder, history = train_decoder(decoder, latents.tokens[train_idx], images[train_idx], optim, device,
                                             _progress_callback(bar))
    with torch.no_grad():
        recon = tensor_to_images(decoder.to(device).eval()(latents.tokens[test_idx].to(device)).cpu())
    truth = tensor_to_images(images[test_idx])
    quality = {"holdout_psnr": float(np.mean([psnr(a, b) for a, b in zip(recon, truth)])),
               "holdout_ssim": float(np.mean([ssim(a, b) for a, b in zip(recon, truth)])),
               "holdout_n": int(held)}
    meta = {"stage": "decoder", "key": layout.keys.decoder, "latents_key": layout.keys.latents,
            "config": asdict(decoder.config), "encoder_weights": latents.weights_label,
            "final_loss": history[-1]["loss"] if history else None, **quality}
    save_module(prefix, decoder.cpu(), meta)
    return stage_result("train-decoder", layout.keys.decoder, layout.decoder(), True, started, **quality)


@task(name="train-level", cache_policy=NO_CACHE, task_run_name="train-level-{level}")
def train_level_task(cfg: TFConfig, root: str, level: int, force: bool = False) -> dict:
    started = time.monotonic()
    layout = Layout(root, cfg)
    prefix = layout.generator(level) / "generator"
    if force:
        remove_tree(layout.generator(level))
    stage = f"train-L{level}"
    if checkpoint_exists(prefix):
        return stage_result(stage, layout.keys.generators[level], layout.generator(level), False, started)
    device = pick_device(cfg.device)
    latents = load_latents(layout.latents())
    regions = load_regions(layout.teacher(), latents.index)
    data = level_data(latents, regions, level)
    g = cfg.generator
    torch.manual_seed(g.seed + level)
    model = TrajectoryDiT(generator_config(cfg, latents.grid, latents.tokens.shape[-1], num_classes(layout)))
    optim = OptimConfig(steps=g.steps, batch_size=g.batch_size, lr=g.lr, weight_decay=g.weight_decay,
                        warmup_steps=g.warmup_steps, grad_clip=g.grad_clip, ema_decay=g.ema_decay, seed=g.seed + level)
    with Progress(optim.steps, f"train level {level}", unit="step") as bar:
        ema, history = train_generator(model, data, level, objective_config(cfg), optim, device,
                                       _progress_callback(bar))
    tail = history[-max(1, len(history) // 10):]
    meta = {"stage": "generator", "level": level, "key": layout.keys.generators[level],
            "latents_key": layout.keys.latents, "teacher_key": layout.keys.teacher,
            "config": asdict(model.config), "objective": asdict(objective_config(cfg)),
            "encoder_weights": latents.weights_label, "steps": len(history),
            "first_loss": history[0]["loss"], "final_loss": float(np.mean([h["loss"] for h in tail]))}
    save_module(prefix, ema.cpu(), meta)
    return stage_result(stage, layout.keys.generators[level], layout.generator(level), True, started,
                        final_loss=meta["final_loss"])
