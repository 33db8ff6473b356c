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
from models.train_state import ema_name, export_state
from storage import zarr_store
from storage.checkpoints import clear_train_state, mark_complete, save_checkpoint, save_train_state
from storage.config import TFConfig
from storage.keys import Layout
from tasks.level_data import level_data, load_latents, load_regions


def generator_config(cfg: TFConfig, grid: int, dim: int, num_classes: int):
    g = cfg.generator
    overrides = {k: v for k, v in (("width", g.width), ("depth", g.depth), ("head_depth", g.head_depth),
                                   ("heads", g.heads)) if v is not None}
    return dit_config(g.preset, token_dim=dim, grid=grid, num_classes=num_classes,
                      num_levels=cfg.hierarchy.num_levels, **overrides)


def objective_config(cfg: TFConfig) -> MeanFlowConfig:
    g = cfg.generator
    return MeanFlowConfig(logit_mean=g.logit_mean, logit_std=g.logit_std, time_shift=g.time_shift,
                          time_dist=g.time_dist, uniform_share=g.uniform_share, equal_share=g.equal_share,
                          t_floor=g.t_floor, adaptive_eps=g.adaptive_eps, v_weight=g.v_weight,
                          region_weight=g.region_weight, label_dropout=g.label_dropout, v_tangent=g.v_tangent,
                          jvp_attention=g.jvp_attention, cond_noise=g.cond_noise)


def sampled_ema(cfg: TFConfig) -> str:
    """The name of the EMA the sampler uses (models.train_state.ema_name)."""
    g = cfg.generator
    return ema_name(halflife_kimg=g.ema_halflife_kimg) if g.ema_kind == "edm" else ema_name(g.ema_decay)


def generator_optim(cfg: TFConfig, seed: int, steps: int | None = None) -> OptimConfig:
    g = cfg.generator
    decays = set(g.ema_decays) | ({g.ema_decay} if g.ema_kind == "constant" else set())
    halflives = set(g.ema_halflives_kimg) | ({g.ema_halflife_kimg} if g.ema_kind == "edm" else set())
    return OptimConfig(steps=steps or g.steps, batch_size=g.batch_size, lr=g.lr, weight_decay=g.weight_decay,
                       warmup_steps=g.warmup_steps, grad_clip=g.grad_clip, ema_decays=sorted(decays),
                       ema_halflives_kimg=sorted(halflives), ema_rampup=g.ema_rampup, optimizer=g.optimizer,
                       checkpoint_every=g.checkpoint_every, compile=g.compile,
                       compile_tuning=g.compile_tuning, seed=seed)


def num_classes(layout: Layout) -> int:
    return len(zarr_store.store_attrs(layout.images())["classes"])


def flat_generator_dir(layout: Layout, cfg: TFConfig) -> Path:
    """The flat baseline's own stage folder: keyed by the generator config, the level count and the latents."""
    return layout.flat_generator()


def ema_file(name: str, chosen: str) -> str:
    """The sampled EMA is `generator`; the other tracked ones sit beside it as generator-ema0_9999 or
    generator-edm1000kimg (no dot: checkpoint prefixes take their suffix with Path.with_suffix)."""
    return "generator" if name == chosen else "generator-" + ("ema" + name if name[0].isdigit() else name).replace(".", "_")


def snapshotter(folder: Path, name: str, enabled: bool = True):
    """on_checkpoint callback: export the TrainState and commit it as the stage's latest snapshot."""
    def on_checkpoint(state: TrainState) -> None:
        if enabled:
            tensors, meta = export_state(state)
            save_train_state(folder, name, state.step, tensors, meta)
    return on_checkpoint


SHARED = "shared"   # generator_job's `which` for the one model of every level (generator.sharing: shared)


def generator_folder(layout: Layout, which: int | str | None) -> tuple[Path, str]:
    """(stage folder, key) of level `which`'s generator, the flat baseline (None) or the shared model."""
    if which is None:
        return layout.flat_generator(), layout.keys.flat_generator
    if which == SHARED:
        return layout.shared_generator(), layout.keys.shared_generator
    return layout.generator(which), layout.keys.generators[which]


def generator_job(cfg: TFConfig, root: str, which: int | str | None) -> dict:
    """Everything to train one generator: level l (an int), the flat baseline (None) or the model shared
    by every level ("shared"): the data, a freshly seeded model, the optimiser and objective configs,
    the stage folder, key and metadata. The shared model gets steps x levels, the budget of the
    per-level models together."""
    layout = Layout(root, cfg)
    latents = load_latents(layout.latents())
    num_levels = cfg.hierarchy.num_levels
    steps = None
    if which is None:
        data: LevelData | list[LevelData] = flat_level_data(latents.tokens, latents.label)
        seed, trained_level = cfg.generator.seed, flat_level(num_levels)
    elif which == SHARED:
        regions = load_regions(layout.teacher(), latents.index)
        trained_level = list(range(num_levels))
        data = [level_data(latents, regions, level) for level in trained_level]
        seed = cfg.generator.seed
        steps = cfg.generator.steps * num_levels
    else:
        data = level_data(latents, load_regions(layout.teacher(), latents.index), which)
        seed, trained_level = cfg.generator.seed + which, which
    folder, key = generator_folder(layout, which)
    torch.manual_seed(seed)
    model = TrajectoryDiT(generator_config(cfg, latents.grid, latents.tokens.shape[-1], num_classes(layout)))
    meta = {"stage": "generator", "level": which if isinstance(which, int) else None, "flat": which is None,
            "shared": which == SHARED, "trained_level": trained_level, "num_levels": num_levels,
            "key": key, "latents_key": layout.keys.latents,
            "teacher_key": None if which is None else layout.keys.teacher, "config": asdict(model.config),
            "objective": asdict(objective_config(cfg)), "encoder_weights": latents.weights_label,
            "optimizer": cfg.generator.optimizer, "sampled_ema": sampled_ema(cfg)}
    return {"data": data, "model": model, "optim": generator_optim(cfg, seed, steps),
            "objective": objective_config(cfg), "ema": sampled_ema(cfg), "folder": folder, "key": key,
            "level": trained_level, "meta": meta}


def finish_generator(job: dict, state: TrainState, **extra_meta) -> dict:
    """Final checkpoints (one per EMA decay; `generator` is the sampled one; `generator-raw` the
    un-averaged weights), then the `_COMPLETE` marker, then the snapshots go."""
    losses = state.history.get("loss", [])
    tail = losses[-max(1, len(losses) // 10):]
    meta = {**job["meta"], **extra_meta, "steps": state.step, "first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(tail)) if tail else None}
    for ema in state.emas:
        save_checkpoint(job["folder"] / ema_file(ema.name, job["ema"]),
                        dict(ema.shadow.cpu().state_dict()), {**meta, "ema": ema.name})
    save_checkpoint(job["folder"] / "generator-raw", dict(state.model.cpu().state_dict()), meta)
    mark_complete(job["folder"], {"stage": "generator", "key": job["key"], "steps": state.step})
    clear_train_state(job["folder"], "generator")
    return meta
