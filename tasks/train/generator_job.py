"""One generator's training job (a level l, or the flat baseline), shared by the Prefect task
(tasks/train/stage.py) and the torchrun entry point (tasks/train/ddp.py). No Prefect here, so DDP ranks
import it cheaply: building the job from the stores, snapshot callbacks, and the final write
(one checkpoint per EMA decay, `generator` being the sampled one, then `_COMPLETE`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.generator.dit import TrajectoryDiT
from models.generator.flat import flat_level
from models.generator.meanflow import MeanFlowConfig
from models.generator.train_loop import LevelData, OptimConfig, TrainState
from models.generator.train_state import export_state
from storage import zarr_store
from storage.checkpoints import clear_train_state, mark_complete, save_checkpoint, save_train_state
from storage.config import TFConfig
from storage.keys import Layout
from tasks.encode.phase_clock import Laps
from tasks.train.level_data import load_latents, regions_of
from tasks.plan import generator_config, generator_optim, objective_config, sampled_ema


def num_classes(layout: Layout) -> int:
    return len(zarr_store.store_attrs(layout.images())["classes"])


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


@dataclass
class GeneratorJob:
    """Everything to train one generator (the Prefect task and each torchrun rank build the same)."""
    model: TrajectoryDiT
    data: LevelData | list[LevelData]
    level: int | list[int]          # the level it trains: l, every level (shared) or the flat target
    objective: MeanFlowConfig
    optim: OptimConfig
    ema: str                        # the sampled EMA's name
    folder: Path
    key: str
    meta: dict                      # the checkpoints' sidecar


def generator_job(cfg: TFConfig, root: str, which: int | str | None, laps: Laps | None = None) -> GeneratorJob:
    """Level l (an int), the flat baseline (None) or the model shared by every level ("shared"): the
    data, a freshly seeded model, the optimiser and objective configs, the stage folder, key and
    metadata. The shared model gets steps x levels, the budget of the per-level models together. `laps`
    (the stage's) gets the seconds of reading the latents, the teacher's regions and building the model."""
    layout = Layout(root, cfg)
    laps = laps or Laps()
    latents = load_latents(layout.latents())
    laps.lap("load_latents")
    num_levels = cfg.hierarchy.generator_levels
    steps = None
    if which is None:
        data: LevelData | list[LevelData] = latents.level_data(None, None)
        seed, trained_level = cfg.generator.seed, flat_level(num_levels)
    elif which == SHARED:
        regions = regions_of(layout.teacher(), latents)
        trained_level = list(range(num_levels))
        data = [latents.level_data(regions, level) for level in trained_level]
        seed = cfg.generator.seed
        steps = cfg.generator.steps * num_levels
    else:
        data = latents.level_data(regions_of(layout.teacher(), latents), which)
        seed, trained_level = cfg.generator.seed + which, which
    laps.lap("load_teacher_regions")
    folder, key = generator_folder(layout, which)
    torch.manual_seed(seed)
    model = TrajectoryDiT(generator_config(cfg, latents.grid, latents.dim, num_classes(layout)))
    laps.lap("build_model")
    objective = objective_config(cfg)
    meta = {"stage": "generator", "level": which if isinstance(which, int) else None, "flat": which is None,
            "shared": which == SHARED, "trained_level": trained_level, "num_levels": num_levels,
            "key": key, "latents_key": layout.keys.latents,
            "teacher_key": None if which is None else layout.keys.teacher, "config": asdict(model.config),
            "objective": asdict(objective), "encoder_weights": latents.weights_label,
            "optimizer": cfg.generator.optimizer, "sampled_ema": sampled_ema(cfg)}
    return GeneratorJob(model, data, trained_level, objective, generator_optim(cfg, seed, steps), sampled_ema(cfg),
                        folder, key, meta)


def finish_generator(job: GeneratorJob, state: TrainState, **extra_meta) -> dict:
    """Final checkpoints (one per EMA decay; `generator` is the sampled one; `generator-raw` the
    un-averaged weights), then the `_COMPLETE` marker, then the snapshots go."""
    losses = state.history.get("loss", [])
    tail = losses[-max(1, len(losses) // 10):]
    meta = {**job.meta, **extra_meta, "steps": state.step, "first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(tail)) if tail else None}
    for ema in state.emas:
        save_checkpoint(job.folder / ema_file(ema.name, job.ema),
                        dict(ema.shadow.state_dict()), {**meta, "ema": ema.name})   # checked where they are
    save_checkpoint(job.folder / "generator-raw", dict(state.model.state_dict()), meta)
    mark_complete(job.folder, {"stage": "generator", "key": job.key, "steps": state.step})
    clear_train_state(job.folder, "generator")
    return meta
