"""The evaluation's metric registry (DESIGN §4): one entry per metric or metric family.

An entry (a `Metric`) holds everything the evaluation knows about its metric:

- the rows it writes (`row_keys`) and why a row is skipped: the whole metric does not apply to this
  evaluation (`skip_reason`: flat mode has no levels, no judge off the scenes, no Inception weights)
  or it applies but produced no value (`missing_reason`: too few samples, nothing re-encoded);
- how it folds one batch of generated samples (`fold_generated`) and of real ones (`fold_real`) into
  the shared running state (models.evaluation.eval_stats.FoldState: named Gaussian moments, first-k reservoirs,
  per-sample values), given the batch inputs it `needs`;
- per-sample values computed on CPU over blocks of trajectories (`score_chunk`, which
  models.evaluation.structure_stream runs inline or in worker processes);
- its values (`values`: MetricValues, from which the row writer makes rows);
- which extractor's labels its rows carry, and where the dashboard and the run summary show it.

models.evaluation.streaming_eval, models.evaluation.eval_stats, models.evaluation.structure_stream, tasks.evaluate.stage and
dashboards.data iterate over `registered()`. The entries live in the package models.evaluation.entries,
one module per family, and register themselves on import: adding a metric is one module there
(plus its test). An entry registered elsewhere (a test) takes part in everything that runs in this
process; `score_chunk` also runs in structure worker processes, which see the package's entries only.

Pure numpy: no torch, no I/O.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOO_FEW = "too few samples for this metric"
FLAT_REASON = "flat baseline: one step straight to the latent, no staged canvas / plan at this level"
NO_STRUCTURE = "no structure-scored samples (evaluate.structure_samples = 0)"
FEATURE_SOURCES = frozenset({"dinov2", "inception"})   # extracted in the engine's feature thread


@dataclass
class MetricValues:
    group: str
    metric: str
    values: np.ndarray                 # per-sample values, or a single pooled value
    level: int = -1
    variant: str = ""
    pooled: bool = False               # True: `values` holds one distribution-level number (no CI)
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> RowKey:
        return RowKey(self.group, self.metric, self.level, self.variant)


@dataclass(frozen=True)
class RowKey:
    """One row of the metrics table: (group, metric, level, variant)."""
    group: str
    metric: str
    level: int = -1
    variant: str = ""


@dataclass(frozen=True)
class EvalSetting:
    """What decides which rows an evaluation writes and why some of them are skipped."""
    levels: int
    mode: str = "staged"                  # "flat": the one-step baseline, the final latent alone
    inception_reason: str | None = None   # why Inception cannot be used; None: it can
    judge_reason: str | None = None       # why there is no scenes judge; None: there is one
    structure_samples: int = 1
    reencode_samples: int = 1

    @property
    def flat(self) -> bool:
        return self.mode == "flat"


@dataclass
class Batch:
    """One batch of samples to fold, generated or real. canvases: level canvases [n, T, C] (torch
    tensors, or arrays on the real side) from level `first_level` on (flat: the final alone);
    features: extractor outputs by source ("dinov2", "inception", "judge"); `images` the decoded
    (generated) or real uint8 images [n, H, W, 3] where the batch holds them."""
    sample_index: np.ndarray
    labels: np.ndarray | None = None
    canvases: Sequence = ()
    first_level: int = 0
    images: np.ndarray | None = None
    features: dict[str, Any] = field(default_factory=dict)

    def offers(self) -> frozenset[str]:
        """The inputs this batch can hand a metric (what `Metric.needs` names)."""
        have = set(self.features)
        if len(self.canvases):
            have.add("canvases")
        if self.images is not None:
            have.add("images")
        if self.labels is not None:
            have.add("labels")
        return frozenset(have)


@dataclass
class ValueOptions:
    """Settings of the pooled metrics' final computation."""
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    kid_seed: int = 0
    is_splits: int = 10


@dataclass
class Scored:
    """What a metric's values are computed from: the streamed result (stats, reservoirs, per_sample),
    the real reference statistics, and values computed outside the engine (edit suite, teacher
    alignment, decoder holdout, the judge on real scenes), by metric entry name."""
    result: Any
    reference: dict[str, np.ndarray]
    options: ValueOptions = field(default_factory=ValueOptions)
    supplied: dict[str, list[MetricValues]] = field(default_factory=dict)


class Metric:
    """A registry entry. Subclasses set the class attributes and override what they use."""
    name: str = ""                          # registry key (one entry may write several metric names)
    version: str = "1"                      # bump when its values change for the same inputs: it enters the evaluate key
    order: int = 100                        # position among the entries (rows, dashboard columns)
    group: str = ""
    extractor: str = "encoder"              # whose labels its rows carry: dinov2 | inception | judge | encoder | none
    needs: frozenset[str] = frozenset()     # batch inputs it folds (Batch.offers)
    headline: tuple[tuple[str, str], ...] = ()   # dashboard runs page: (column label, metric name)
    plots: tuple[tuple[str, str], ...] = ()      # dashboard per-level plots: (plot title, metric name)
    summary: tuple[str, ...] = ()                # metric names in the run's headline artifact
    units: tuple[tuple[str, str], ...] = ()      # (metric name, unit and reading): chart axes, tables, docs

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        """Rows written whether or not a value came out (a missing one is written as skipped)."""
        return []

    def skip_reason(self, setting: EvalSetting, key: RowKey) -> str | None:
        """Why this row does not apply to this evaluation at all; None when it does."""
        return None

    def missing_reason(self, setting: EvalSetting, key: RowKey) -> str:
        """Why an applicable row has no value."""
        return TOO_FEW

    def fold_generated(self, state, batch: Batch) -> None:
        """Fold one batch of generated samples into `state` (models.evaluation.eval_stats.FoldState)."""

    def fold_real(self, state, batch: Batch) -> None:
        """Fold one batch of real samples (the reference side) into `state`."""

    def score_chunk(self, chunk) -> dict[str, np.ndarray]:
        """Per-sample values [n, ...] of one block of trajectories (models.evaluation.structure_stream.StructureChunk),
        by per_sample key; {} when the block has nothing for this metric."""
        return {}

    def values(self, scored: Scored) -> list[MetricValues]:
        """Its values; by default those handed in from outside the engine."""
        return list(scored.supplied.get(self.name, ()))


_REGISTRY: dict[str, Metric] = {}
_loaded = False


def unit_of(metric: str) -> str:
    """What a metric's numbers are, as its entry says ("" for a metric no entry gives a unit)."""
    for entry in registered():
        for name, unit in entry.units:
            if name == metric:
                return unit
    return ""


def register(metric: Metric) -> Metric:
    if not metric.name:
        raise ValueError(f"{type(metric).__name__} has no name")
    if metric.name in _REGISTRY and type(_REGISTRY[metric.name]) is not type(metric):
        raise ValueError(f"metric {metric.name!r} is registered twice ({type(_REGISTRY[metric.name]).__name__})")
    _REGISTRY[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


class EntryImportError(ImportError):
    """A module of models.evaluation.entries failed to import: its metrics would be missing from the run."""


def _load_entries() -> None:
    """Import every module of models.evaluation.entries: each registers its entries. Done once all of them
    imported; a module that fails stops every caller, naming it, rather than leaving a registry without
    its metrics (and an evaluate key and a run that silently lack them)."""
    global _loaded
    if _loaded:
        return
    package = importlib.import_module("models.evaluation.entries")
    for module in pkgutil.iter_modules(package.__path__):
        name = f"{package.__name__}.{module.name}"
        try:
            importlib.import_module(name)
        except Exception as error:
            raise EntryImportError(f"metric entry module {name} failed to import ({type(error).__name__}: "
                                   f"{error}); the evaluation cannot run without its metrics", name=name) from error
    _loaded = True


def registered() -> list[Metric]:
    """Every entry, in (order, name) order."""
    _load_entries()
    return sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))


def signature() -> tuple[str, ...]:
    """`name@version` of every entry: what the evaluation's stage key hashes (storage.keys.stage_keys),
    so adding, removing or revising a metric moves the key and a stale evaluation is never reused."""
    return tuple(sorted(f"{metric.name}@{metric.version}" for metric in registered()))


def folding(batch: Batch, among: frozenset[str] | None = None) -> list[Metric]:
    """The entries that fold this batch: all they need is in it (and, given `among`, some of it is there)."""
    offered = batch.offers()
    return [metric for metric in registered() if metric.needs and metric.needs <= offered
            and (among is None or metric.needs & among)]


# --- helpers the entries share -------------------------------------------------------------------

def level_rows(group: str, metrics: Iterable[str], levels: Iterable[int], variant: str = "") -> list[RowKey]:
    return [RowKey(group, metric, level, variant) for metric in metrics for level in levels]


def per_level_values(group: str, metric: str, array: np.ndarray | None, variant: str = "") -> list[MetricValues]:
    """One per-sample MetricValues per column (level) of [n, levels]; none when there are no samples."""
    if array is None or len(array) == 0:
        return []
    return [MetricValues(group, metric, array[:, level].copy(), level, variant) for level in range(array.shape[1])]


def frechet_value(scored: Scored, name: str) -> float | None:
    """Frechet distance of the generated statistics `name` against the reference's; None when either is missing."""
    from models.evaluation.metrics import frechet_distance   # scipy: only where a value is computed

    stats = scored.result.stats.get(name)
    if stats is None or stats.count < 2 or f"{name}.mean" not in scored.reference:
        return None
    return frechet_distance(stats.mean, stats.cov, scored.reference[f"{name}.mean"], scored.reference[f"{name}.cov"])


def pooled(group: str, metric: str, value: float, n: int, level: int = -1, variant: str = "",
           **extra) -> MetricValues:
    return MetricValues(group, metric, np.array([value], dtype=np.float64), level, variant, pooled=True,
                        extra={"n": int(n), **extra})
