"""The row writer iterates the metric registry: skips come from the entries, values become rows."""
import numpy as np

from models.evaluation.registry import FLAT_REASON, EvalSetting, MetricValues, registered
from tasks.evaluate.rows import registry_rows

LABELS = {"dinov2": {"feature_extractor": "dinov2"}, "inception": {"feature_extractor": "inception"},
          "judge": {"feature_extractor": "judge"}, "encoder": {"feature_extractor": "encoder"}}


def _by_key(rows):
    return {(r["group"], r["metric"], r["level"], r["variant"]): r for r in rows}


def test_flat_mode_writes_what_needs_a_plan_as_skipped_and_keeps_the_final_level():
    setting = EvalSetting(levels=4, mode="flat", inception_reason="no Inception weights", judge_reason=None)
    final_fd = MetricValues("per_level", "fd_level", np.array([2.5]), 3, "mean_pooled", pooled=True, extra={"n": 8})
    rows = _by_key(registry_rows(setting, {"fd_level": [final_fd]}, LABELS, n_boot=10))
    assert rows[("per_level", "fd_level", 3, "mean_pooled")]["value"] == 2.5
    assert rows[("per_level", "fd_level", 3, "tokens")]["reason"] == "too few samples for this metric"
    for key in [("per_level", "fd_level", 2, "tokens"), ("structure", "nesting", 1, ""),
                ("structure", "plan_adherence", 2, ""), ("structure", "reencode_miou", 0, "")]:
        assert rows[key]["status"] == "skipped" and rows[key]["reason"] == FLAT_REASON, key
    assert rows[("structure", "reencode_ari", 0, "final_hierarchy")]["status"] == "skipped"   # applies, no value here
    assert rows[("structure", "reencode_ari", 0, "final_hierarchy")]["reason"] != FLAT_REASON
    assert rows[("control", "locality_pixel", 3, "")]["reason"] == "flat baseline: no levels to edit"
    assert rows[("structure", "judge_plan_ari", 0, "")]["reason"].startswith("flat baseline")
    assert rows[("quality", "fid", -1, "")]["reason"] == "no Inception weights"
    assert rows[("quality", "fid", -1, "")]["feature_extractor"] == "inception"
    assert ("structure", "nesting", 2, "") not in rows   # L-2 nestings of L-1 partitions


def test_per_sample_values_get_their_mean_and_an_interval_and_the_entries_keep_their_order():
    setting = EvalSetting(levels=3)
    nesting = MetricValues("structure", "nesting", np.array([0.5, 1.0, np.nan, 1.0]), 0)
    row = _by_key(registry_rows(setting, {"nesting": [nesting]}, LABELS, n_boot=50))[("structure", "nesting", 0, "")]
    assert row["value"] == 2.5 / 3 and row["n"] == 3 and row["ci_low"] <= row["value"] <= row["ci_high"]
    assert row["feature_extractor"] == "encoder"
    orders = [m.order for m in registered()]
    assert orders == sorted(orders) and len({m.name for m in registered()}) == len(orders)
