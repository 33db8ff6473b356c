"""Image quality of the decoded finals (DESIGN §4): FD-DINOv2, and FID / KID / IS on Inception features.

FD-DINOv2 and FID fold running Gaussian statistics of their features, generated and real alike.
KID keeps the first `plan.kid_reservoir` Inception pool vectors of each side, IS the first
`plan.is_reservoir` generated logit vectors (samples are i.i.d., so the first k are a uniform
subset and the result does not depend on the batch size). The Inception rows are skipped, with the
reason, when no Inception weights are configured.
"""
from __future__ import annotations

from models.evaluation.registry import (EvalSetting, Metric, MetricValues, RowKey, Scored, frechet_value, pooled,
                                    register)

DINOV2, FID = "fd_dinov2", "fid"
KID_FEATURES = "kid.features"   # reservoir of Inception pool vectors, generated and real side alike
IS_LOGITS = "is.logits"         # reservoir of generated Inception logits


def _isc_splits(num_images: int, splits: int) -> int:
    """At most `splits`, at least 2 images per split (a 1-image split always scores IS = 1)."""
    return max(1, min(splits, num_images // 2))


class FdDinov2(Metric):
    name, order, group, extractor = DINOV2, 10, "quality", "dinov2"
    needs = frozenset({"dinov2"})
    headline = (("fd_dinov2", DINOV2),)
    units = ((DINOV2, "Fréchet distance (squared feature units); lower is better"),)
    summary = (DINOV2,)

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        return [RowKey("quality", DINOV2)]

    def fold_generated(self, state, batch) -> None:
        state.moments(DINOV2, batch.features["dinov2"])

    fold_real = fold_generated

    def values(self, scored: Scored) -> list[MetricValues]:
        value = frechet_value(scored, DINOV2)
        return [] if value is None else [pooled("quality", DINOV2, value, scored.result.stats[DINOV2].count)]


class _InceptionMetric(Metric):
    group, extractor = "quality", "inception"
    needs = frozenset({"inception"})
    names: tuple[str, ...] = ()

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        return [RowKey("quality", name) for name in self.names]

    def skip_reason(self, setting: EvalSetting, key: RowKey) -> str | None:
        return setting.inception_reason


class Fid(_InceptionMetric):
    name, order, names = FID, 20, (FID,)
    headline = (("fid", FID),)
    units = ((FID, "Fréchet distance (squared feature units); lower is better"),)
    summary = (FID,)

    def fold_generated(self, state, batch) -> None:
        state.moments(FID, batch.features["inception"]["pool"])

    fold_real = fold_generated

    def values(self, scored: Scored) -> list[MetricValues]:
        value = frechet_value(scored, FID)
        return [] if value is None else [pooled("quality", FID, value, scored.result.stats[FID].count)]


class Kid(_InceptionMetric):
    name, order, names = "kid", 21, ("kid_mean", "kid_std")
    units = (("kid_mean", "kernel distance (squared MMD); lower is better"), ("kid_std", "kernel distance (squared MMD)"))

    def fold_generated(self, state, batch) -> None:
        state.keep_first(KID_FEATURES, batch.features["inception"]["pool"], state.plan.kid_reservoir)

    fold_real = fold_generated

    def values(self, scored: Scored) -> list[MetricValues]:
        generated, real = scored.result.reservoirs.get(KID_FEATURES), scored.reference.get(KID_FEATURES)
        if generated is None or real is None or min(len(generated), len(real)) < 2:
            return []
        from models.evaluation.fidelity import kid_from_features   # torch-fidelity only where Inception is used

        options = scored.options   # kid_from_features draws subsets no larger than either side
        mean, std = kid_from_features(generated, real, subsets=options.kid_subsets,
                                      subset_size=options.kid_subset_size, seed=options.kid_seed)
        return [pooled("quality", "kid_mean", mean, len(generated)), pooled("quality", "kid_std", std, len(generated))]


class InceptionScore(_InceptionMetric):
    name, order, names = "is", 22, ("is_mean", "is_std")
    units = (("is_mean", "Inception score (1 to classes); higher is better"), ("is_std", "Inception score"))

    def fold_generated(self, state, batch) -> None:
        state.keep_first(IS_LOGITS, batch.features["inception"]["logits"], state.plan.is_reservoir)

    def values(self, scored: Scored) -> list[MetricValues]:
        logits = scored.result.reservoirs.get(IS_LOGITS)
        if logits is None or len(logits) < 2:
            return []
        from models.evaluation.fidelity import inception_score_from_logits

        splits = _isc_splits(len(logits), scored.options.is_splits)
        mean, std = inception_score_from_logits(logits, splits=splits)
        return [pooled("quality", "is_mean", mean, len(logits), splits=splits),
                pooled("quality", "is_std", std, len(logits))]


for entry in (FdDinov2(), Fid(), Kid(), InceptionScore()):
    register(entry)
