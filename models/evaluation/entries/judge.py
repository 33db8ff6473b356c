"""The scenes judge's metrics (DESIGN §4): FD-scenes, class accuracy, pixel-space plan adherence.

The judge (models.evaluation.judge) is the built-in world's own evaluation network, so these exist only on the
scenes (elsewhere every row is skipped with the reason the evaluation gives, EvalSetting.judge_reason):

- fd_scenes: Frechet distance of the judge's penultimate features, decoded finals against real scenes;
- class_accuracy: per generated final, whether the judge's class is its conditioning label;
- judge_plan_ari / judge_plan_miou per level: the judge's partition of the decoded final, on the token
  grid, against the trajectory's own level-l regions (mirrors re-encode agreement; no plan in flat mode).

Each also has a reference row, variant "real_holdout": the judge on its held-out real scenes, which
the evaluation computes (it reads the store) and hands in as supplied values.
"""
from __future__ import annotations

import numpy as np

from models.evaluation.registry import (NO_STRUCTURE, EvalSetting, Metric, MetricValues, RowKey, Scored, frechet_value,
                                    level_rows, per_level_values, pooled, register)

JUDGE = "fd_scenes"   # the running statistics of the judge's features, generated and real
HOLDOUT = "real_holdout"
FLAT_REASON = "flat baseline: no staged plan (own level regions) to compare the judge's partition with"
NO_PARTITION = "the judge has no partition at this level"
PLAN_METRICS = ("judge_plan_ari", "judge_plan_miou")


class _JudgeMetric(Metric):
    extractor = "judge"

    def skip_reason(self, setting: EvalSetting, key: RowKey) -> str | None:
        return setting.judge_reason


class FdScenes(_JudgeMetric):
    name, order, group = JUDGE, 50, "quality"
    units = ((JUDGE, "Fréchet distance (squared feature units); lower is better"),)
    needs = frozenset({"judge"})

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        return [RowKey("quality", JUDGE), RowKey("quality", JUDGE, variant=HOLDOUT)]

    def fold_generated(self, state, batch) -> None:
        state.moments(JUDGE, batch.features["judge"]["features"])

    def fold_real(self, state, batch) -> None:   # the real side's judge source is its features alone
        state.moments(JUDGE, batch.features["judge"])

    def values(self, scored: Scored) -> list[MetricValues]:
        value = frechet_value(scored, JUDGE)
        own = [] if value is None else [pooled("quality", JUDGE, value, scored.result.stats[JUDGE].count)]
        return own + super().values(scored)


class ClassAccuracy(_JudgeMetric):
    name, order, group = "class_accuracy", 51, "quality"
    units = (("class_accuracy", "share of samples (0-1); higher is better"),)
    needs = frozenset({"judge", "labels"})

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        return [RowKey("quality", self.name), RowKey("quality", self.name, variant=HOLDOUT)]

    def fold_generated(self, state, batch) -> None:
        logits = np.asarray(batch.features["judge"]["logits"])
        state.append("class_correct", logits.argmax(1) == batch.labels)

    def values(self, scored: Scored) -> list[MetricValues]:
        correct = scored.result.per_sample.get("class_correct")
        own = [] if correct is None or not len(correct) else \
            [MetricValues("quality", self.name, np.asarray(correct, np.float64))]
        return own + super().values(scored)


class JudgePlanAgreement(_JudgeMetric):
    name, order, group = "judge_plan", 52, "structure"
    units = (("judge_plan_ari", "adjusted Rand index (-1 to 1; 0 chance); higher is better"),
             ("judge_plan_miou", "mean IoU (0-1); higher is better"))
    version = "2"   # 2: a pair of single-region partitions is NaN, not a trivial 1.0

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        return [key for variant in ("", HOLDOUT)
                for key in level_rows("structure", PLAN_METRICS, range(setting.levels - 1), variant)]

    def skip_reason(self, setting: EvalSetting, key: RowKey) -> str | None:
        if setting.judge_reason:
            return setting.judge_reason
        return FLAT_REASON if setting.flat and key.variant == "" else None

    def missing_reason(self, setting: EvalSetting, key: RowKey) -> str:
        if key.variant == HOLDOUT:
            return NO_PARTITION
        return NO_STRUCTURE if setting.structure_samples == 0 else super().missing_reason(setting, key)

    def score_chunk(self, chunk) -> dict[str, np.ndarray]:
        """The same agreement as re-encoding, the judge's partition in its place (levels it lacks: NaN)."""
        if chunk.judged is None or chunk.flat:
            return {}
        from models.evaluation.trajectory_metrics import reencode_agreement

        regions = chunk.regions
        shared = min(len(regions), chunk.judged.shape[1])
        agreement = reencode_agreement(regions[:shared], np.asarray(chunk.judged))
        out = {}
        for metric, short in zip(PLAN_METRICS, ("reencode_ari", "reencode_miou")):
            array = np.full((chunk.n, len(regions)), np.nan)
            for v in agreement:
                if v.metric == short:
                    array[:, v.level] = v.values
            out[metric] = array
        return out

    def values(self, scored: Scored) -> list[MetricValues]:
        own = [v for metric in PLAN_METRICS for v in per_level_values("structure", metric,
                                                                      scored.result.per_sample.get(metric))]
        return own + super().values(scored)


for entry in (FdScenes(), ClassAccuracy(), JudgePlanAgreement()):
    register(entry)
