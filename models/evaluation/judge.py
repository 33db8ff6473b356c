"""The scenes judge (DESIGN §4): a small CNN trained on real scenes, used to score generated ones.

What Inception is to FID on ImageNet, this network is to the built-in scenes: its penultimate
features give FD-scenes, its class head the class accuracy of generated images against their
conditioning label, and its segmentation heads a partition of the image at levels 0..2 to
compare with a trajectory's own region maps (pixel-space plan adherence).

Network: a four-stage conv encoder (strides 1, 2, 4, 8 after a stride-`stem_stride` first
conv on an `input_size` resize of the image) with an FPN-style decoder back to stride 2 of the
first stage. The class head pools the deepest stage (features = its hidden layer); one 1x1
segmentation head per level predicts, per pixel, one of `slots[l]` region slots. Sized to train
in about a minute on one CPU core at the scenes config (tasks.judge.stage): an FPN-style decoder, not a
U-Net's concatenating convs, which cost as much as the encoder for no better held-out mIoU.

Id-free targets: ground-truth ids are only defined up to renaming, so the targets are made
canonical. The scenes number regions in draw order (storage.scene_objects: background 0, then
every part / subpart as it is painted, the far second object first and the main object last,
ids compacted after occlusion). Counted from the last one drawn, object region k is the same
part of the same class in every image (the main object's parts come in a fixed order per class),
so slot k = max_id + 1 - id; the background keeps slot 0. The trained heads thus give a partition
of any image, scored against a reference partition with Hungarian mIoU / ARI (models.evaluation.metrics),
which ignore the ids.

Pure torch / numpy: no I/O.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.evaluation.metrics import adjusted_rand, matched_miou
from models.nonfinite import DivergenceWatch

EXTRACTOR = "scenes-judge"   # the feature_extractor column of the judge's metric rows


@dataclass
class SceneJudgeConfig:
    num_classes: int
    slots: tuple[int, ...]       # region slots per level (level 0: background / object = 2)
    input_size: int = 112        # images are resized to this before the network
    stem_stride: int = 2         # stride of the first conv: the first stage works at input_size / stem_stride
    width: int = 16              # channels of the first stage (then 2x, 4x, 8x)
    feature_dim: int = 128       # the penultimate layer: FD-scenes features

    def __post_init__(self) -> None:
        self.slots = tuple(int(s) for s in self.slots)
        if self.stem_stride not in (1, 2) or self.input_size % (8 * self.stem_stride):
            raise ValueError(f"judge: stem_stride must be 1 or 2 and input_size a multiple of 8 * stem_stride, "
                             f"got {self.stem_stride}, {self.input_size}")
        if self.num_classes < 2 or not self.slots or min(self.slots) < 2:
            raise ValueError(f"judge needs >= 2 classes and >= 2 slots per level, got {self.num_classes}, {self.slots}")

    @property
    def segment_size(self) -> int:
        """Side of the segmentation maps: half the first stage's."""
        return self.input_size // self.stem_stride // 2


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SceneJudge(nn.Module):
    """images [B, 3, R, R] (judge_input) -> {"features" [B, D], "logits" [B, classes],
    "segments": one [B, slots[l], S, S] logit map per level, S = config.segment_size}."""

    def __init__(self, config: SceneJudgeConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.stages = nn.ModuleList([
            nn.Sequential(_conv(3, w, config.stem_stride), _conv(w, w)),
            nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w)),
            nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w)),
            nn.Sequential(_conv(4 * w, 8 * w, 2), _conv(8 * w, 8 * w)),
        ])
        self.laterals = nn.ModuleList([nn.Conv2d(c, 2 * w, 1) for c in (2 * w, 4 * w, 8 * w)])
        self.smooth = nn.ModuleList([_conv(2 * w, 2 * w) for _ in range(2)])
        self.segment = nn.Conv2d(2 * w, sum(config.slots), 1)
        self.embed = nn.Sequential(nn.Linear(8 * w, config.feature_dim), nn.ReLU(inplace=True))
        self.classify = nn.Linear(config.feature_dim, config.num_classes)

    def forward(self, x: Tensor) -> dict:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        features = self.embed(x.mean((2, 3)))
        y = self.laterals[2](x)
        for scale in (1, 0):   # stride 8 -> 4 -> 2 of the first stage
            y = self.smooth[scale](F.interpolate(y, scale_factor=2.0) + self.laterals[scale](skips[scale + 1]))
        return {"features": features, "logits": self.classify(features),
                "segments": list(self.segment(y).split(self.config.slots, 1))}


def judge_input(images: np.ndarray | Tensor, input_size: int) -> Tensor:
    """uint8 images [N, H, W, 3] -> float [N, 3, R, R], resized (antialiased) and centred."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.5) / 0.25


def canonical_regions(masks: np.ndarray) -> np.ndarray:
    """Ground-truth ids [N, L, H, W] -> slot targets (int16): background 0, object region k of an
    image at a level -> max_id + 1 - k (counted from the last drawn; see the module docstring)."""
    ids = np.asarray(masks).astype(np.int16)   # 8-bit ids: int16 holds top + 1 - id, at a quarter of int64's traffic
    top = ids.reshape(*ids.shape[:2], -1).max(-1)[..., None, None]
    return np.where(ids > 0, top + 1 - ids, 0).astype(np.int16)


def mode_pool(ids: Tensor, size: int, slots: int, chunk: int = 512) -> Tensor:
    """Majority vote of each (H/size x W/size) block: ids [N, H, W] -> [N, size, size] (ties: lower id;
    blocks of uneven size where `size` does not divide H)."""
    if ids.shape[-1] == size:
        return ids.clone()
    out = []
    for part in ids.split(chunk):
        best = torch.full((len(part), size, size), -1.0, device=part.device)
        votes = torch.zeros((len(part), size, size), dtype=torch.int64, device=part.device)
        for value in range(slots):   # one id at a time: no one-hot of every id in memory
            share = F.adaptive_avg_pool2d((part == value).float().unsqueeze(1), size).squeeze(1)
            better = share > best
            best = torch.where(better, share, best)
            votes[better] = value
        out.append(votes)
    return torch.cat(out) if out else ids.new_zeros((0, size, size))


def partition(segments: list[Tensor], size: int, grid: int | None = None) -> Tensor:
    """Region ids [B, L, size, size] from segment logits (bilinear to `size` px, argmax), or with
    `grid` the majority vote of each token's pixels [B, L, grid, grid] (how storage.scenes.masks_to_grid
    puts ground truth on the token grid)."""
    out = []
    for logits in segments:
        ids = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False).argmax(1)
        out.append(ids if grid is None else mode_pool(ids, grid, logits.shape[1]))
    return torch.stack(out, 1)


@dataclass
class JudgeTraining:
    steps: int = 512
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    level_weights: tuple[float, ...] = (1.0, 1.0, 0.5)   # per segmentation level (the class loss has 1); the
                                                         # last repeats for further levels
    dice_weight: float = 1.0     # soft Dice per present region: every region counts alike, as in mIoU
    seed: int = 0


def judge_targets(masks: np.ndarray, size: int, slots: tuple[int, ...]) -> Tensor:
    """Slot targets [N, L, size, size] at the segmentation heads' resolution (majority vote);
    a region beyond the last slot is ignored (-1)."""
    canonical = torch.from_numpy(canonical_regions(masks))
    levels = []
    for level, count in enumerate(slots):
        ids = canonical[:, level]
        pooled = mode_pool(ids, size, int(ids.max()) + 1 if ids.numel() else 1)
        levels.append(torch.where(pooled < count, pooled, torch.full_like(pooled, -1)))
    return torch.stack(levels, 1)


def train_judge(model: SceneJudge, images: np.ndarray, labels: np.ndarray, masks: np.ndarray, train: JudgeTraining,
                device: str | torch.device = "cpu", on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train in place on real scenes: images uint8 [N, H, W, 3], labels [N], masks [N, L, H, W].

    Cross-entropy on the class and on every level's slot targets (plus soft Dice on the regions:
    pixel cross-entropy alone neglects the small parts that mIoU counts like the large ones),
    AdamW with a one-cycle schedule, random horizontal flips (the scenes are mirrored at random
    anyway). Returns the history {"loss": [...], "class_loss": [...], "seconds": s}.
    """
    started = time.monotonic()
    device = torch.device(device)
    config = model.config
    generator = torch.Generator().manual_seed(train.seed)
    pixels = torch.as_tensor(np.asarray(images))   # uint8; made float per batch (50k scenes as float: 7.5 GB)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    targets = judge_targets(masks, config.segment_size, config.slots)
    weights = list(train.level_weights) + [train.level_weights[-1]] * len(config.slots)
    model.to(device, memory_format=torch.channels_last).train()   # channels-last convs: ~15% faster on CPU
    optim = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optim, train.lr, total_steps=train.steps, pct_start=0.15)
    history: dict = {"loss": [], "class_loss": []}
    params = [p for p in model.parameters() if p.requires_grad]
    watch = DivergenceWatch(device)   # a NaN loss, gradient or weight raises NonFiniteTraining
    n = len(pixels)
    order, cursor = torch.randperm(n, generator=generator), 0
    for step in range(train.steps):
        if cursor + train.batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        pick = order[cursor:cursor + train.batch_size]
        cursor += train.batch_size
        xb, tb = judge_input(pixels[pick], config.input_size), targets[pick]
        flip = torch.rand(len(pick), generator=generator) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb).to(device, memory_format=torch.channels_last)
        tb = torch.where(flip[:, None, None, None], tb.flip(-1), tb).to(device)
        out = model(xb)
        class_loss = F.cross_entropy(out["logits"], y[pick].to(device))
        loss = class_loss
        for level, logits in enumerate(out["segments"]):
            loss = loss + weights[level] * F.cross_entropy(logits, tb[:, level], ignore_index=-1)
            if train.dice_weight:
                loss = loss + weights[level] * train.dice_weight * region_dice_loss(logits, tb[:, level])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        watch.observe(loss, torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        optim.step()
        schedule.step()
        if watch.due(step + 1):
            watch.check()
        stats = {"loss": float(loss.detach()), "class_loss": float(class_loss.detach())}
        history["loss"].append(stats["loss"])
        history["class_loss"].append(stats["class_loss"])
        if on_step is not None:
            on_step(step, stats)
    watch.check(model.parameters())
    model.eval()
    history["seconds"] = time.monotonic() - started
    return history


def region_dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """1 - soft Dice, averaged over the (image, slot) pairs present in the target ([B, K, H, W], [B, H, W];
    -1 ignored)."""
    valid = (target >= 0).unsqueeze(1).float()
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2).float() * valid
    inter, total = (probs * onehot).sum((2, 3)), (probs + onehot).sum((2, 3))
    present = onehot.sum((2, 3)) > 0
    return (1 - 2 * inter[present] / total[present].clamp(min=1e-6)).mean()


@torch.no_grad()
def judge_outputs(model: SceneJudge, images: np.ndarray, *, grid: int | None = None, size: int | None = None,
                  device: str | torch.device = "cpu", batch_size: int = 128) -> dict[str, np.ndarray]:
    """{"features" [N, D] float64, "logits" [N, classes], "regions" [N, L, g, g] int64} of uint8
    images [N, H, W, 3]: regions at `size` px (default: the images' size), or per token with `grid`."""
    model.eval()
    size = size or np.asarray(images).shape[1]
    parts: dict[str, list] = {"features": [], "logits": [], "regions": []}
    for start in range(0, len(images), batch_size):
        x = judge_input(images[start:start + batch_size], model.config.input_size)
        x = x.to(device, memory_format=torch.channels_last)
        out = model(x)
        parts["features"].append(out["features"].double().cpu().numpy())
        parts["logits"].append(out["logits"].float().cpu().numpy())
        parts["regions"].append(partition(out["segments"], size, grid).cpu().numpy())
    if not parts["features"]:
        raise ValueError("no images")
    return {k: np.concatenate(v) for k, v in parts.items()}


@torch.no_grad()
def judge_features(model: SceneJudge, images: np.ndarray, *, device: str | torch.device = "cpu",
                   batch_size: int = 128) -> np.ndarray:
    """Penultimate features [N, D] float64 of uint8 images [N, H, W, 3] (FD-scenes)."""
    model.eval()
    out = [model(judge_input(images[start:start + batch_size], model.config.input_size)
                 .to(device, memory_format=torch.channels_last))["features"].double().cpu().numpy()
           for start in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.config.feature_dim))


def judge_fn(model: SceneJudge, grid: int, device: str | torch.device = "cpu",
             batch_size: int = 128) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The evaluation's view of the judge: uint8 images -> features, logits and per-token regions."""
    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        return judge_outputs(model, images, grid=grid, device=device, batch_size=batch_size)

    return run


def partition_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, list[float]]:
    """Per level, the mean Hungarian mIoU and ARI of predicted region ids against reference ids,
    both [N, L, ...]."""
    out: dict[str, list[float]] = {"miou": [], "ari": []}
    for level in range(min(pred.shape[1], truth.shape[1])):
        pairs = list(zip(pred[:, level], truth[:, level]))
        out["miou"].append(float(np.nanmean([matched_miou(p, t) for p, t in pairs])))
        out["ari"].append(float(np.nanmean([adjusted_rand(p, t) for p, t in pairs])))
    return out


def holdout_scores(model: SceneJudge, images: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                   grid_masks: np.ndarray | None = None, grid: int | None = None,
                   device: str | torch.device = "cpu") -> dict:
    """Class accuracy and per-level Hungarian mIoU / ARI on real scenes the judge did not see:
    at pixel level against the full-resolution masks [N, L, H, W], and (with `grid` and
    `grid_masks` [N, L, g, g], the ground truth put on the token grid) per token, which is how the
    evaluation uses the judge's partitions."""
    out = judge_outputs(model, images, device=device)
    scores = {"accuracy": float(np.mean(out["logits"].argmax(1) == np.asarray(labels))), "n": int(len(images))}
    pixel = partition_scores(out["regions"], np.asarray(masks))
    scores.update(miou=pixel["miou"], ari=pixel["ari"])
    if grid is not None and grid_masks is not None:
        regions = torch.from_numpy(out["regions"])
        tokens = torch.stack([mode_pool(regions[:, level], grid, slots)
                              for level, slots in enumerate(model.config.slots)], 1).numpy()
        per_token = partition_scores(tokens, np.asarray(grid_masks))
        scores.update(miou_grid=per_token["miou"], ari_grid=per_token["ari"], grid=int(grid))
    return scores


def class_slots(masks: np.ndarray) -> tuple[int, ...]:
    """Slots per level to hold every region of these masks [N, L, H, W]: max id + 1."""
    top = np.asarray(masks).reshape(len(masks), masks.shape[1], -1).max(axis=(0, 2))
    return tuple(max(2, int(t) + 1) for t in top)



