"""Judge: the scenes judge (DESIGN §4) trained on the real scenes of the image store -> judge-<key>/.

Only real images enter: the image store's uint8 scenes, class labels and ground-truth masks. The
last `judge.holdout` share of the valid samples is held out; the sidecar records their store
indices, the class accuracy and the per-level Hungarian mIoU / ARI on them (at pixel level and on
the 14 px token grid of DINOv2), and the training time. Reused when `_COMPLETE` exists.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from models.evaluation.judge import (JudgeTraining, SceneJudge, SceneJudgeConfig, class_slots, holdout_scores,
                          train_judge)
from storage import zarr_store
from storage.checkpoints import load_checkpoint, save_checkpoint
from storage.config import TFConfig
from storage.files import read_json
from storage.keys import Layout
from storage.scenes import masks_to_grid
from tasks.progress import Progress
from tasks.stage import Done, Stage, cpu_threads, divergence_named, pick_device, run_stage, stage_task

TOKEN_PATCH = 14   # the sidecar's token-grid scores use DINOv2's patch (the evaluation scores at its own grid)
NOT_SCENES = "the scenes judge needs source.kind 'scenes' (class labels and ground-truth masks of real scenes)"


def load_real_scenes(images_store: Path, index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{"index", "image" [N,H,W,3] uint8, "label" [N], "masks" [N,L,H,W]} of the valid samples (or `index`)."""
    if index is None:
        index = np.flatnonzero(zarr_store.open_array(images_store, "valid")[:])
    if not zarr_store.has_array(images_store, "masks"):
        raise ValueError(f"{images_store} holds no ground-truth masks: {NOT_SCENES}")
    return {"index": index, "image": np.asarray(zarr_store.open_array(images_store, "image").oindex[index]),
            "label": np.asarray(zarr_store.open_array(images_store, "label").oindex[index]),
            "masks": np.asarray(zarr_store.open_array(images_store, "masks").oindex[index])}


def holdout_split(count: int, share: float) -> int:
    """How many of `count` samples (the last ones) are held out: at least one, never all."""
    if count < 2:
        raise ValueError(f"the judge needs at least 2 real scenes, got {count}")
    return min(count - 1, max(1, int(round(share * count))))


@stage_task("train-judge")
def train_judge_task(cfg: TFConfig, root: str, force: bool = False) -> dict:
    return ensure_judge(cfg, root, force)


def ensure_judge(cfg: TFConfig, root: str, force: bool = False) -> dict:
    """The judge stage: trained unless complete (also what evaluate calls when it finds none)."""
    if cfg.source.kind != "scenes":
        raise ValueError(NOT_SCENES + f", got source.kind {cfg.source.kind!r}")
    layout = Layout(root, cfg)
    stage = Stage("judge", layout.keys.judge, layout.judge(), output="folder", needs=[(layout.images(), "ingest")])
    return run_stage(cfg, stage, force, lambda: _train_judge(cfg, layout),
                     reused=lambda: _summary(read_json(layout.judge() / "judge.json")))


def _summary(meta: dict) -> dict:
    return {"holdout_accuracy": meta["holdout"]["accuracy"], "holdout_miou": meta["holdout"]["miou"],
            "train_seconds": meta["train_seconds"]}


def _train_judge(cfg: TFConfig, layout: Layout) -> Done:
    folder, key = layout.judge(), layout.keys.judge
    j = cfg.judge
    real = load_real_scenes(layout.images())
    held = holdout_split(len(real["index"]), j.holdout)
    train, test = slice(0, len(real["index"]) - held), slice(len(real["index"]) - held, None)
    classes = list(zarr_store.store_attrs(layout.images()).get("classes", []))
    device = pick_device(cfg.device)
    torch.manual_seed(j.seed)
    model = SceneJudge(SceneJudgeConfig(num_classes=max(len(classes), int(real["label"].max()) + 1),
                                        slots=class_slots(real["masks"][train]), input_size=j.input_size,
                                        stem_stride=j.stem_stride, width=j.width))
    training = JudgeTraining(steps=j.steps, batch_size=j.batch_size, lr=j.lr, dice_weight=j.dice_weight, seed=j.seed)
    with Progress(j.steps, "train judge", unit="step") as bar, cpu_threads(device), divergence_named("judge"):
        history = train_judge(model, real["image"][train], real["label"][train], real["masks"][train], training,
                              device, lambda step, stats: bar.advance(1, loss=f"{stats['loss']:.3f}"))
    grid = cfg.source.image_size // TOKEN_PATCH if cfg.source.image_size % TOKEN_PATCH == 0 else None
    scores = holdout_scores(model, real["image"][test], real["label"][test], real["masks"][test],
                            None if grid is None else masks_to_grid(real["masks"][test], grid), grid, device=device)
    meta = {"stage": "judge", "key": key, "images_key": layout.keys.images, "config": asdict(model.config),
            "training": asdict(training), "classes": classes, "train_n": int(train.stop),
            "holdout_index": real["index"][test].tolist(), "holdout": scores,
            "train_seconds": round(history["seconds"], 2), "final_loss": history["loss"][-1],
            "device": device}
    save_checkpoint(folder / "judge", dict(model.cpu().state_dict()), meta)
    return Done({"stage": "judge", "key": key}, _summary(meta))


def load_judge(folder: Path, device: str = "cpu") -> tuple[SceneJudge, dict]:
    """The trained judge (eval mode, on `device`) and its sidecar."""
    tensors, meta = load_checkpoint(Path(folder) / "judge", device)
    model = SceneJudge(SceneJudgeConfig(**meta["config"]))
    model.load_state_dict(tensors)
    return model.to(device, memory_format=torch.channels_last).eval(), meta
