"""One generator's training job (a level l, or the flat baseline), shared by the Prefect task
(tasks/train.py) and the torchrun entry point (tasks/train_ddp.py). No Prefect here, so DDP ranks
import it cheaply: building the job from the stores, snapshot callbacks, and the final write
(one checkpoint per EMA decay, `generator` being the sampled one, then `_COMPLETE`).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from models.dit import TrajectoryDiT, dit_config
from models.flat import flat_level, flat_level_data
from models.meanflow import MeanFlowConfig
from models.train_loop import LevelData, OptimConfig, TrainState
from models.train_state import export_state
from storage import zarr_store
from storage.checkpoints import clear_train_state, mark_complete, save_checkpoint, save_train_state
from storage.config import TFConfig
from storage.keys import CODE_VERSIONS, RUN_ONLY, Layout, stable_hash
from tasks.level_data import level_data, load_latents, load_regions


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
                          region_weight=g.region_weight, label_dropout=g.label_dropout,
                          jvp_attention=g.jvp_attention)


def generator_optim(cfg: TFConfig, seed: int) -> OptimConfig:
    g = cfg.generator
    return OptimConfig(steps=g.steps, batch_size=g.batch_size, lr=g.lr, weight_decay=g.weight_decay,
                       warmup_steps=g.warmup_steps, grad_clip=g.grad_clip,
                       ema_decays=sorted(set(g.ema_decays) | {g.ema_decay}), optimizer=g.optimizer,
                       checkpoint_every=g.checkpoint_every, compile=g.compile,
                       compile_tuning=g.compile_tuning, seed=seed)


def num_classes(layout: Layout) -> int:
    return len(zarr_store.store_attrs(layout.images())["classes"])


def flat_generator_dir(layout: Layout, cfg: TFConfig) -> Path:
    """The flat baseline's own stage folder: keyed by the generator config and the latents only."""
    trained = cfg.generator.model_dump(exclude=RUN_ONLY | {"mode"})
    key = stable_hash({"generator": trained, "latents": layout.keys.latents, "flat": True,
                       "v": CODE_VERSIONS["generator"]})
    return layout.root / f"generator-flat-{key}"


def ema_file(decay: float, chosen: float) -> str:
    """The sampled EMA is `generator`; the other tracked decays sit beside it as generator-ema0_9999
    (no dot: checkpoint prefixes take their suffix with Path.with_suffix)."""
    return "generator" if decay == chosen else "generator-ema" + repr(float(decay)).replace(".", "_")


def snapshotter(folder: Path, name: str, enabled: bool = True):
    """on_checkpoint callback: export the TrainState and commit it as the stage's latest snapshot."""
    def on_checkpoint(state: TrainState) -> None:
        if enabled:
            tensors, meta = export_state(state)
            save_train_state(folder, name, state.step, tensors, meta)
    return on_checkpoint


def generator_job(cfg: TFConfig, root: str, level: int | None) -> dict:
    """Everything to train one generator (level l, or the flat baseline for level None): the data, a
    freshly seeded model, the optimiser and objective configs, the stage folder, key and metadata."""
    layout = Layout(root, cfg)
    latents = load_latents(layout.latents())
    if level is None:
        data: LevelData = flat_level_data(latents.tokens, latents.label)
        folder, seed, trained_level = flat_generator_dir(layout, cfg), cfg.generator.seed, \
            flat_level(cfg.hierarchy.num_levels)
        key = folder.name.removeprefix("generator-flat-")
    else:
        data = level_data(latents, load_regions(layout.teacher(), latents.index), level)
        folder, seed, trained_level = layout.generator(level), cfg.generator.seed + level, level
        key = layout.keys.generators[level]
    torch.manual_seed(seed)
    model = TrajectoryDiT(generator_config(cfg, latents.grid, latents.tokens.shape[-1], num_classes(layout)))
    meta = {"stage": "generator", "level": level, "flat": level is None, "trained_level": trained_level,
            "key": key, "latents_key": layout.keys.latents,
            "teacher_key": None if level is None else layout.keys.teacher, "config": asdict(model.config),
            "objective": asdict(objective_config(cfg)), "encoder_weights": latents.weights_label,
            "optimizer": cfg.generator.optimizer}
    return {"data": data, "model": model, "optim": generator_optim(cfg, seed), "objective": objective_config(cfg),
            "ema_decay": cfg.generator.ema_decay, "folder": folder, "key": key, "level": trained_level, "meta": meta}


def finish_generator(job: dict, state: TrainState, **extra_meta) -> dict:
    """Final checkpoints (one per EMA decay; `generator` is the sampled one; `generator-raw` the
    un-averaged weights), then the `_COMPLETE` marker, then the snapshots go."""
    losses = state.history.get("loss", [])
    tail = losses[-max(1, len(losses) // 10):]
    meta = {**job["meta"], **extra_meta, "steps": state.step, "first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(tail)) if tail else None}
    for ema in state.emas:
        save_checkpoint(job["folder"] / ema_file(ema.decay, job["ema_decay"]),
                        dict(ema.shadow.cpu().state_dict()), {**meta, "ema_decay": ema.decay})
    save_checkpoint(job["folder"] / "generator-raw", dict(state.model.cpu().state_dict()), meta)
    mark_complete(job["folder"], {"stage": "generator", "key": job["key"], "steps": state.step})
    clear_train_state(job["folder"], "generator")
    return meta
