"""Structural consistency of generated trajectories (DESIGN §4), per sample and per level.

- nesting: for generated levels l and l+1, the share of level-(l+1) regions inside one level-l region;
- plan_adherence: cosine between the level-l canvas and the level-l region means of the final latent;
- re-encode agreement (reencode_ari / reencode_miou): the decoded final image encoded again and its
  hierarchy rebuilt, against the trajectory's own regions (variant "") and against the hierarchy
  rebuilt on its final latent (variant "final_hierarchy", which the flat baseline has too).

They are computed on CPU over blocks of samples (models.evaluation.structure_stream.StructureChunk, in worker
processes at scale), for the first `structure_samples` samples (re-encode: the first `reencode_samples`).
The flat baseline has no plan: no nesting, plan adherence or own-region agreement.
"""
from __future__ import annotations

import numpy as np

from models.evaluation.registry import (FLAT_REASON, NO_STRUCTURE, EvalSetting, Metric, MetricValues, RowKey, Scored,
                                    level_rows, per_level_values, register)

NO_REENCODE = "no re-encoded samples (evaluate.reencode_samples = 0, or no encoder)"
AGREEMENT = (("reencode_ari", "ari"), ("reencode_miou", "miou"))


def _stack(columns: list[np.ndarray], rows: int) -> np.ndarray:
    return np.stack(columns, 1).astype(np.float64) if columns else np.empty((rows, 0))


class _PlanMetric(Metric):
    """Scored on the staged plan (the generated regions): skipped for the flat baseline."""
    group = "structure"

    def skip_reason(self, setting: EvalSetting, key: RowKey) -> str | None:
        return FLAT_REASON if setting.flat else None

    def missing_reason(self, setting: EvalSetting, key: RowKey) -> str:
        return NO_STRUCTURE if setting.structure_samples == 0 else super().missing_reason(setting, key)

    def values(self, scored: Scored) -> list[MetricValues]:
        return per_level_values("structure", self.name, scored.result.per_sample.get(self.name))


class Nesting(_PlanMetric):
    name, order = "nesting", 40
    headline = (("nesting (mean)", "nesting"),)
    units = (("nesting", "share of regions (0-1); higher is better"),)
    plots = (("structural consistency", "nesting"),)
    summary = ("nesting",)

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        return level_rows("structure", ["nesting"], range(setting.levels - 2))

    def score_chunk(self, chunk) -> dict[str, np.ndarray]:
        if chunk.flat:
            return {}
        from models.evaluation.trajectory_metrics import nesting_values

        return {"nesting": _stack([v.values for v in nesting_values(chunk.regions)], chunk.n)}


class PlanAdherence(_PlanMetric):
    name, order = "plan_adherence", 41
    units = (("plan_adherence", "cosine similarity (-1 to 1); higher is better"),)
    plots = (("structural consistency", "plan_adherence"),)
    summary = ("plan_adherence",)

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        return level_rows("structure", ["plan_adherence"], range(setting.levels - 1))

    def score_chunk(self, chunk) -> dict[str, np.ndarray]:
        if chunk.flat:
            return {}
        from models.evaluation.trajectory_metrics import plan_adherence_values

        if chunk.adherence is not None:   # found with the regions, on the device
            return {"plan_adherence": np.asarray(chunk.adherence, np.float64).reshape(chunk.n, -1)}
        values = plan_adherence_values(chunk.levels, chunk.regions)
        return {"plan_adherence": _stack([v.values for v in values], chunk.n)}


class ReencodeAgreement(Metric):
    name, order, group = "reencode", 42, "structure"
    version = "2"   # 2: a pair of single-region partitions is NaN, not a trivial 1.0
    headline = (("reencode_ari (mean)", "reencode_ari"),)
    units = (("reencode_ari", "adjusted Rand index (-1 to 1; 0 chance); higher is better"),
             ("reencode_miou", "mean IoU (0-1); higher is better"))
    plots = (("structural consistency", "reencode_ari"),)
    summary = ("reencode_ari",)
    references = (("", ""), ("_final", "final_hierarchy"))   # (per_sample key suffix, row variant)

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        metrics = [metric for metric, _ in AGREEMENT]
        return [key for _, variant in self.references
                for key in level_rows("structure", metrics, range(setting.levels - 1), variant)]

    def skip_reason(self, setting: EvalSetting, key: RowKey) -> str | None:
        return FLAT_REASON if setting.flat and key.variant == "" else None

    def missing_reason(self, setting: EvalSetting, key: RowKey) -> str:
        return NO_REENCODE if setting.reencode_samples == 0 else super().missing_reason(setting, key)

    def score_chunk(self, chunk) -> dict[str, np.ndarray]:
        if not chunk.r:
            return {}
        from models.evaluation.trajectory_metrics import reencode_agreement

        out = {}
        if not chunk.flat:
            own = reencode_agreement([ids[:chunk.r] for ids in chunk.regions], chunk.reencoded_regions)
            out.update(self._arrays(own, "", chunk.r))
        final_ids = chunk.final_regions[:chunk.r]
        final = reencode_agreement([final_ids[:, level] for level in range(final_ids.shape[1])],
                                   chunk.reencoded_regions)
        out.update(self._arrays(final, "_final", chunk.r))
        return out

    @staticmethod
    def _arrays(values: list[MetricValues], suffix: str, rows: int) -> dict[str, np.ndarray]:
        return {metric + suffix: _stack([v.values for v in values if v.metric == metric], rows)
                for metric, _ in AGREEMENT}

    def values(self, scored: Scored) -> list[MetricValues]:
        out = []
        for suffix, variant in self.references:
            for metric, _ in AGREEMENT:
                out += per_level_values("structure", metric, scored.result.per_sample.get(metric + suffix), variant)
        return out


for entry in (Nesting(), PlanAdherence(), ReencodeAgreement()):
    register(entry)
