"""The evaluation's metric rows, written entry by entry of the metric registry (models.evaluation.registry).

For every registered metric: its rows that do not apply to this evaluation (flat mode, no judge, no
Inception weights) are written as skipped with the entry's reason; its values become rows (pooled
values as they are, per-sample values as their mean with a bootstrap interval); and each row it
always writes (`row_keys`) that got no value is written as skipped with the entry's missing reason.
Every row carries the labels of the entry's feature extractor.
"""
from __future__ import annotations

import numpy as np

from models.evaluation.registry import EvalSetting, MetricValues, RowKey, registered
from models.evaluation.metrics import bootstrap_ci
from storage.tables import metric_row

NO_FINITE = "no finite per-sample values (e.g. empty or full regions)"


def values_rows(values: list[MetricValues], n_boot: int, **labels) -> list[dict]:
    """One row per MetricValues: a pooled value as it is, per-sample values as their finite mean with a CI."""
    rows = []
    for v in values:
        where = dict(level=v.level, variant=v.variant, **labels)
        finite = v.values[np.isfinite(v.values)]
        if v.pooled:
            rows.append(metric_row(v.group, v.metric, float(v.values[0]), n=v.extra.get("n", len(v.values)), **where))
        elif len(finite) == 0:
            rows.append(metric_row(v.group, v.metric, None, status="skipped", reason=NO_FINITE, **where))
        else:
            rows.append(metric_row(v.group, v.metric, float(finite.mean()), n=len(finite),
                                   ci=bootstrap_ci(finite, n_boot=n_boot), **where))
    return rows


def _skipped(key: RowKey, reason: str, labels: dict) -> dict:
    return metric_row(key.group, key.metric, None, level=key.level, variant=key.variant, status="skipped",
                      reason=reason, **labels)


def registry_rows(setting: EvalSetting, values: dict[str, list[MetricValues]], labels: dict[str, dict],
                  n_boot: int) -> list[dict]:
    """Every registered metric's rows. values: by entry name (models.evaluation.eval_stats.metric_values_by_entry);
    labels: feature_extractor / extractor_weights by the entries' `extractor` ("none": no labels)."""
    rows = []
    for metric in registered():
        extractor = labels.get(metric.extractor, {})
        keys = metric.row_keys(setting)
        skipped = {key: metric.skip_reason(setting, key) for key in keys}
        own = [v for v in values.get(metric.name, []) if not metric.skip_reason(setting, v.key)]
        rows += values_rows(own, n_boot, **extractor)
        produced = {v.key for v in own}
        for key in keys:
            if skipped[key]:
                rows.append(_skipped(key, skipped[key], extractor))
            elif key not in produced:
                rows.append(_skipped(key, metric.missing_reason(setting, key), extractor))
    return rows
