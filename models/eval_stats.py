"""Feature statistics of the evaluation, real and generated side alike (DESIGN §4).

Named running Gaussian statistics ("fd_dinov2", "fid", "level{l}.mean_pooled",
"level{l}.tokens") are folded batch by batch on a torch device (float64). `reference_stats`
streams the real set through the same features; `metric_values` turns a generated-side
result and a reference into models.trajectory_metrics.MetricValues. Pure torch / numpy.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from models.metrics import StreamingStats, frechet_distance
from models.trajectory_metrics import MetricValues

if TYPE_CHECKING:
    from models.streaming_eval import StreamingEvalResult


DINOV2, FID = "fd_dinov2", "fid"
JUDGE = "fd_scenes"   # Frechet distance on the scenes judge's penultimate features (models.judge)
KID_FEATURES = "kid.features"
# (per_sample key, metric, variant) of the per-sample structure values
STRUCTURE_VALUES = (("nesting", "nesting", ""), ("plan_adherence", "plan_adherence", ""),
                    ("reencode_ari", "reencode_ari", ""), ("reencode_miou", "reencode_miou", ""),
                    ("reencode_ari_final", "reencode_ari", "final_hierarchy"),
                    ("reencode_miou_final", "reencode_miou", "final_hierarchy"),
                    ("judge_plan_ari", "judge_plan_ari", ""), ("judge_plan_miou", "judge_plan_miou", ""))
_U64 = np.uint64


def level_key(level: int, variant: str) -> str:
    """Statistics name of a per-level FD feature, variant "mean_pooled" or "tokens"."""
    return f"level{level}.{variant}"


def token_subsample(sample_index: np.ndarray, tokens: int, per_sample: int, seed: int = 0) -> np.ndarray:
    """Token positions [n, per_sample] (with replacement) for the "tokens" FD variant.

    A hash (splitmix64) of (seed, sample index, draw), so sample i gets the same tokens in any batch.
    """
    index = np.asarray(sample_index, dtype=np.uint64).reshape(-1, 1)
    draw = np.arange(per_sample, dtype=np.uint64)[None, :]
    key = np.full(1, int(seed) % 2**64, dtype=np.uint64) * _U64(0x9E3779B97F4A7C15)   # arrays wrap silently
    x = key ^ (index << _U64(20)) ^ draw
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    x = x ^ (x >> _U64(31))
    return (x % _U64(tokens)).astype(np.int64)


class RunningMoments:
    """Count, mean and M2 of features on a torch device (float64), the StreamingStats update."""

    def __init__(self, dim: int, device: torch.device):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x: Tensor) -> None:
        x = x.to(self.mean.device, torch.float64).reshape(len(x), -1)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(0)
        centred = x - batch_mean
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += centred.T @ centred + torch.outer(delta, delta) * (self.count * n / total)
        self.count = total

    def stats(self) -> StreamingStats:
        return StreamingStats.from_moments(self.count, self.mean.cpu().numpy(), self.m2.cpu().numpy())



def autocast_for(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for `dtype` on `device` (none for float32 / None)."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def as_device_tensor(x, device: torch.device) -> Tensor:
    return x.to(device) if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x)).to(device)


def moment_folder(moments: dict[str, RunningMoments], device: torch.device) -> Callable[[str, object], None]:
    """fold(name, features [n, ...]): update (creating on first use) the named running statistics."""
    def fold(name: str, x) -> None:
        x = as_device_tensor(x, device)
        x = x.reshape(len(x), -1)
        if name not in moments:
            moments[name] = RunningMoments(x.shape[1], device)
        moments[name].update(x)

    return fold



@torch.no_grad()
def reference_stats(
    batches: Iterable[tuple[np.ndarray, Sequence[np.ndarray | Tensor]]],
    dinov2_fn: Callable[[np.ndarray], np.ndarray] | None,
    *,
    inception_fn: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokens_per_sample: int = 4,
    token_seed: int = 0,
    kid_reservoir: int = 10_000,
    feature_fns: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Real-side statistics, streamed like evaluate_streaming's generated side.

    batches yield (images uint8 [b,H,W,3], canvases: L arrays [b,T,C], the teacher canvases of
    those images in the generators' normalised space, the last level the latent itself; may be
    empty). dinov2_fn / inception_fn may be None to leave that feature out. feature_fns: more
    extractors, {name: uint8 images -> [b, D]}, folded under their name (e.g. JUDGE).
    Returns a flat dict of arrays: "<name>.mean" [D], "<name>.cov" [D,D], "<name>.count" (int64
    scalar) for DINOV2, FID (with inception_fn) and level_key(l, "mean_pooled" | "tokens"), and
    KID_FEATURES [min(M, kid_reservoir), 2048] (the first real pool vectors).
    """
    device = torch.device(device)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    autocast = autocast_for(device, dtype)
    moments: dict[str, RunningMoments] = {}
    fold = moment_folder(moments, device)
    kid, kid_kept, seen = [], 0, 0

    for images, canvases in batches:
        n = len(images)
        with autocast:
            if dinov2_fn is not None:
                fold(DINOV2, dinov2_fn(images))
            inception = inception_fn(images) if inception_fn is not None else None
            for name, fn in (feature_fns or {}).items():
                fold(name, fn(images))
        if inception is not None:
            fold(FID, inception["pool"])
            take = max(0, min(kid_reservoir - kid_kept, n))
            if take:
                kid.append(np.asarray(inception["pool"][:take], dtype=np.float32))
                kid_kept += take
        rows = torch.arange(n, device=device)[:, None]
        for level, canvas in enumerate(canvases):
            canvas = as_device_tensor(canvas, device).float()
            if len(canvas) != n:
                raise ValueError(f"level {level}: {len(canvas)} canvases for {n} images")
            fold(level_key(level, "mean_pooled"), canvas.mean(1, dtype=torch.float64))
            if tokens_per_sample > 0:
                picks = torch.from_numpy(token_subsample(np.arange(seen, seen + n), canvas.shape[1],
                                                         tokens_per_sample, token_seed)).to(device)
                fold(level_key(level, "tokens"), canvas[rows, picks].reshape(-1, canvas.shape[-1]))
        seen += n
    out: dict[str, np.ndarray] = {}
    for name, m in moments.items():
        stats = m.stats()
        out[f"{name}.mean"], out[f"{name}.cov"] = stats.mean, stats.cov
        out[f"{name}.count"] = np.asarray(stats.count, dtype=np.int64)
    if kid:
        out[KID_FEATURES] = np.concatenate(kid)
    return out


def _isc_splits(num_images: int, splits: int) -> int:
    """At most `splits`, at least 2 images per split (a 1-image split always scores IS = 1)."""
    return max(1, min(splits, num_images // 2))


def metric_values(
    result: StreamingEvalResult,
    reference: dict[str, np.ndarray],
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 0,
    is_splits: int = 10,
) -> list[MetricValues]:
    """Metric values of a streamed evaluation against real reference statistics.

    Pooled (one number, extra["n"] = generated count): quality fd_dinov2, fid, fd_scenes, kid (extra "std"),
    is (extra "std", "splits"); per_level fd_level, variants "mean_pooled" and "tokens". Per sample:
    structure nesting (levels 0..L-3), plan_adherence (0..L-2), reencode_ari / reencode_miou
    (0..L-2) against the trajectory's own regions (variant "") and against the hierarchy rebuilt on
    its final latent (variant "final_hierarchy"); with the scenes judge, quality class_accuracy (per
    sample 0/1 against the conditioning label) and judge_plan_ari / judge_plan_miou (0..L-2). A
    metric whose inputs are missing (no Inception features, no reference entry, no samples) is left
    out; the caller writes it as skipped.
    """
    out: list[MetricValues] = []

    def fd(name: str) -> float | None:
        stats = result.stats.get(name)
        if stats is None or stats.count < 2 or f"{name}.mean" not in reference:
            return None
        return frechet_distance(stats.mean, stats.cov, reference[f"{name}.mean"], reference[f"{name}.cov"])

    for name in (DINOV2, FID, JUDGE):
        value = fd(name)
        if value is not None:
            out.append(MetricValues("quality", name, np.array([value]), pooled=True,
                                    extra={"n": result.stats[name].count}))
    if result.inception_pool is not None and KID_FEATURES in reference:
        from models.fidelity import kid_from_features   # torch-fidelity only where Inception is used

        mean, std = kid_from_features(result.inception_pool, reference[KID_FEATURES], subsets=kid_subsets,
                                      subset_size=kid_subset_size, seed=kid_seed)
        out.append(MetricValues("quality", "kid", np.array([mean]), pooled=True,
                                extra={"n": len(result.inception_pool), "std": std}))
    if result.inception_logits is not None and len(result.inception_logits) >= 2:
        from models.fidelity import inception_score_from_logits

        splits = _isc_splits(len(result.inception_logits), is_splits)
        mean, std = inception_score_from_logits(result.inception_logits, splits=splits)
        out.append(MetricValues("quality", "is", np.array([mean]), pooled=True,
                                extra={"n": len(result.inception_logits), "std": std, "splits": splits}))
    for level in range(result.num_levels):
        for variant in ("mean_pooled", "tokens"):
            name = level_key(level, variant)
            value = fd(name)
            if value is not None:
                out.append(MetricValues("per_level", "fd_level", np.array([value]), level, variant, pooled=True,
                                        extra={"n": result.stats[name].count}))
    correct = result.per_sample.get("class_correct")
    if correct is not None and len(correct):
        out.append(MetricValues("quality", "class_accuracy", np.asarray(correct, np.float64)))
    for key, metric, variant in STRUCTURE_VALUES:
        values = result.per_sample.get(key)
        if values is None or len(values) == 0:
            continue
        for level in range(values.shape[1]):
            out.append(MetricValues("structure", metric, values[:, level].copy(), level, variant))
    return out
