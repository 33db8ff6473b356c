"""Per-level quality (DESIGN §4): Frechet distance between generated level-l canvases and the teacher
canvases of real images, in two variants.

"mean_pooled": one feature per image, the canvas mean over tokens. "tokens": `plan.tokens_per_sample`
tokens per sample, every token a feature, which sees the piecewise-constant structure that mean
pooling averages away. The tokens are picked by a hash of the sample index (`token_subsample`), so
sample i contributes the same tokens in any batch. The flat baseline has the final level only.
"""
from __future__ import annotations

import numpy as np

from models.evaluation.registry import (FLAT_REASON, EvalSetting, Metric, MetricValues, RowKey, Scored, frechet_value,
                                    pooled, register)

VARIANTS = ("mean_pooled", "tokens")
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


class LevelFd(Metric):
    name, order, group = "fd_level", 30, "per_level"
    needs = frozenset({"canvases"})
    headline = (("fd_level (mean)", "fd_level"),)
    units = (("fd_level", "Fréchet distance (squared feature units); lower is better"),)
    plots = (("per-level FD", "fd_level"),)
    summary = ("fd_level",)

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        return [RowKey("per_level", "fd_level", level, variant) for level in range(setting.levels) for variant in VARIANTS]

    def skip_reason(self, setting: EvalSetting, key: RowKey) -> str | None:
        return FLAT_REASON if setting.flat and key.level < setting.levels - 1 else None

    def fold_generated(self, state, batch) -> None:
        per_sample = state.plan.tokens_per_sample
        for level, canvas in enumerate(batch.canvases, start=batch.first_level):
            canvas = state.as_device(canvas).float()
            state.moments(level_key(level, "mean_pooled"), canvas.double().mean(1))
            if per_sample > 0:
                rows = state.as_device(np.arange(len(canvas))[:, None])
                picks = state.as_device(token_subsample(batch.sample_index, canvas.shape[1], per_sample,
                                                        state.plan.token_seed))
                state.moments(level_key(level, "tokens"), canvas[rows, picks].reshape(-1, canvas.shape[-1]))

    fold_real = fold_generated

    def values(self, scored: Scored) -> list[MetricValues]:
        out = []
        for level in range(scored.result.num_levels):
            for variant in VARIANTS:
                name = level_key(level, variant)
                value = frechet_value(scored, name)
                if value is not None:
                    out.append(pooled("per_level", "fd_level", value, scored.result.stats[name].count, level, variant))
        return out


register(LevelFd())
