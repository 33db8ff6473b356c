"""Feature statistics of the evaluation, real and generated side alike (DESIGN §4).

The registered metrics (models.evaluation.registry) fold batches into a `FoldState`: named running
Gaussian statistics ("fd_dinov2", "fid", "level{l}.mean_pooled", ...) kept on a torch device in
float64, first-k reservoirs and per-sample values. `reference_stats` streams the real set through
the same folds; `metric_values` asks every entry for its values against a reference. Pure torch /
numpy.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from models.evaluation.entries.image_quality import DINOV2, FID, KID_FEATURES  # noqa: F401  (re-exported)
from models.evaluation.entries.judge import JUDGE  # noqa: F401
from models.evaluation.entries.level_fd import level_key, token_subsample  # noqa: F401
from models.evaluation.plan import EvalPlan
from models.evaluation.registry import Batch, MetricValues, Scored, ValueOptions, folding, registered
from models.evaluation.metrics import REGION_THRESHOLD, StreamingStats

if TYPE_CHECKING:
    from models.evaluation.streaming_eval import StreamingEvalResult


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


class FoldState:
    """What metrics fold batches into: named running moments on `device` (float64), first-k
    reservoirs and per-sample values. `plan` carries the sizes the folds read (token picks, caps)."""

    def __init__(self, device: torch.device, plan: EvalPlan):
        self.device, self.plan = device, plan
        self._moments: dict[str, RunningMoments] = {}
        self._reservoirs: dict[str, list[np.ndarray]] = {}
        self._kept: dict[str, int] = {}
        self._samples: dict[str, list[np.ndarray]] = {}

    def as_device(self, x) -> Tensor:
        return as_device_tensor(x, self.device)

    def moments(self, name: str, x) -> None:
        """Update (creating on first use) the running statistics `name` with features [n, ...]."""
        x = self.as_device(x)
        x = x.reshape(len(x), -1)
        if name not in self._moments:
            self._moments[name] = RunningMoments(x.shape[1], self.device)
        self._moments[name].update(x)

    def keep_first(self, name: str, x, cap: int) -> None:
        """Keep the first `cap` rows ever folded under `name` (float32 on the host)."""
        kept = self._kept.get(name, 0)
        take = max(0, min(cap - kept, len(x)))
        if take:
            self._reservoirs.setdefault(name, []).append(np.asarray(x[:take], dtype=np.float32))
            self._kept[name] = kept + take

    def append(self, name: str, values) -> None:
        """Per-sample values of this batch, in sample order."""
        self._samples.setdefault(name, []).append(np.asarray(values))

    def stats(self) -> dict[str, StreamingStats]:
        return {name: m.stats() for name, m in self._moments.items()}

    def reservoirs(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self._reservoirs.items()}

    def samples(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self._samples.items()}


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
    extractors by source name, {source: uint8 images -> [b, D]} (e.g. "judge": the scenes judge's
    features). Every registered metric whose inputs the batch offers folds it (Metric.fold_real).
    Returns a flat dict of arrays: "<name>.mean" [D], "<name>.cov" [D,D], "<name>.count" (int64
    scalar) per running statistics (DINOV2, FID with inception_fn, level_key(l, "mean_pooled" |
    "tokens"), ...) and each reservoir under its name (KID_FEATURES: the first real pool vectors).
    """
    device = torch.device(device)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    extractors = dict(feature_fns or {})
    if dinov2_fn is not None:
        extractors["dinov2"] = dinov2_fn
    if inception_fn is not None:
        extractors["inception"] = inception_fn
    # The real side's folds read the token picks and the reservoir caps; the sampling fields play no part.
    state = FoldState(device, EvalPlan(tokens_per_sample=tokens_per_sample, token_seed=token_seed,
                                       kid_reservoir=kid_reservoir, batch_size=1, keep=0, structure_samples=0,
                                       reencode_samples=0, label_seed=0, region_threshold=REGION_THRESHOLD,
                                       snap_threshold=None, mode="staged"))
    seen = 0
    for images, canvases in batches:
        n = len(images)
        for level, canvas in enumerate(canvases):
            if len(canvas) != n:
                raise ValueError(f"level {level}: {len(canvas)} canvases for {n} images")
        with autocast_for(device, dtype):
            features = {source: fn(images) for source, fn in extractors.items()}
        batch = Batch(np.arange(seen, seen + n), canvases=canvases, features=features)
        for metric in folding(batch):
            metric.fold_real(state, batch)
        seen += n
    out: dict[str, np.ndarray] = {}
    for name, stats in state.stats().items():
        out[f"{name}.mean"], out[f"{name}.cov"] = stats.mean, stats.cov
        out[f"{name}.count"] = np.asarray(stats.count, dtype=np.int64)
    out.update(state.reservoirs())
    return out


def metric_values_by_entry(result: StreamingEvalResult, reference: dict[str, np.ndarray], *,
                           options: ValueOptions | None = None,
                           supplied: dict[str, list[MetricValues]] | None = None) -> dict[str, list[MetricValues]]:
    """Every registered entry's values, by entry name (entries with none map to [])."""
    scored = Scored(result, reference, options or ValueOptions(), supplied or {})
    return {metric.name: metric.values(scored) for metric in registered()}


def metric_values(result: StreamingEvalResult, reference: dict[str, np.ndarray], *, kid_subsets: int = 100,
                  kid_subset_size: int = 1000, kid_seed: int = 0, is_splits: int = 10,
                  supplied: dict[str, list[MetricValues]] | None = None) -> list[MetricValues]:
    """Metric values of a streamed evaluation against real reference statistics, entry by entry.

    Pooled values (one number, extra["n"]) for the distribution metrics (fd_dinov2, fid, kid_mean /
    kid_std, is_mean / is_std, fd_scenes, fd_level per level and variant), per-sample values for the
    rest (structure per level, class_accuracy). A metric whose inputs are missing (no Inception
    features, no reference entry, no samples) has no values; the row writer writes it as skipped.
    supplied: values computed outside the engine, by entry name (passed through).
    """
    options = ValueOptions(kid_subsets, kid_subset_size, kid_seed, is_splits)
    by_entry = metric_values_by_entry(result, reference, options=options, supplied=supplied)
    return [v for values in by_entry.values() for v in values]
