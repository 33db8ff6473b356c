"""Adding a metric is one registry entry: a toy metric registered here (and only here) is folded by the
streaming engine, written by the evaluate stage into the Parquet metrics table, skipped where its entry
says so, and shown by the dashboard's data layer."""
import shutil
from pathlib import Path

import pytest

from models.evaluation.registry import EvalSetting, Metric, MetricValues, RowKey, Scored, register, unregister

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


class FinalBrightness(Metric):
    """Mean brightness of each decoded final image, per sample (a real metric would be a module of
    models/evaluation/entries; this one lives in the test)."""
    name, order, group = "toy_brightness", 99, "quality"
    needs = frozenset({"images"})
    headline = (("toy brightness", "toy_brightness"),)

    def row_keys(self, setting: EvalSetting) -> list[RowKey]:
        return [RowKey("quality", self.name), RowKey("quality", self.name, variant="flat_only")]

    def skip_reason(self, setting: EvalSetting, key: RowKey) -> str | None:
        return "toy: measured on the flat baseline only" if key.variant == "flat_only" and not setting.flat else None

    def fold_generated(self, state, batch) -> None:
        state.append(self.name, batch.images.reshape(len(batch.images), -1).mean(1) / 255.0)

    def values(self, scored: Scored) -> list[MetricValues]:
        return [MetricValues("quality", self.name, scored.result.per_sample[self.name])]


@pytest.fixture
def toy_metric():
    metric = register(FinalBrightness())
    yield metric
    unregister(metric.name)


def test_a_registered_metric_reaches_the_metrics_table_and_the_dashboard(tiny_root, tmp_path, toy_metric):
    from dashboards import data
    from flows.stages import pipeline_flow
    from storage.config import load_config
    from storage.tables import load_metrics

    from tasks.plan import layout

    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)   # every stage done, the evaluation under the registry without the toy
    cfg = load_config(CONFIG)
    unregister(toy_metric.name)
    without = layout(root, cfg).evaluation()
    register(toy_metric)
    # no --force: the new entry moves the evaluation's key, so only the evaluation is recomputed, beside the old one
    result = pipeline_flow(config=cfg, root=str(root), run_id="toy")
    computed = [s["stage"] for s in result["stages"] if s["status"] == "computed"]
    assert computed == ["evaluate"]
    assert layout(root, cfg).evaluation() != without and without.exists()

    table = load_metrics(root, run_id="toy")
    toy = table[table.metric == "toy_brightness"].set_index("variant")
    measured = toy.loc[""]
    assert measured.status == "ok" and measured.n == 8 and 0 < measured.value < 1   # tiny.yaml: 8 samples
    assert measured.ci_low <= measured.value <= measured.ci_high
    assert measured.feature_extractor == "vit_small_patch14_reg4_dinov2"   # the default extractor: the encoder
    assert toy.loc["flat_only"].status == "skipped" and "flat baseline only" in toy.loc["flat_only"].reason
    assert len(table) == len(load_metrics(root, run_id="first")) + 2   # every other row is still there

    assert ("toy brightness", "toy_brightness") in data.HEADLINE
    overview = data.runs_overview(root).set_index("run_id")
    assert overview.loc["toy", "toy brightness"] == pytest.approx(measured.value)
    side_by_side = data.comparison_table(root, "first", "toy")
    assert side_by_side.set_index("metric").loc["toy_brightness", "toy"] == pytest.approx(measured.value)


def test_the_dashboard_lists_follow_the_registry(toy_metric):
    from dashboards import data

    assert data.HEADLINE[-1] == ("toy brightness", "toy_brightness")
    unregister(toy_metric.name)
    assert "toy_brightness" not in [metric for _, metric in data.HEADLINE]
    assert data.PLOTS == {"per-level FD": ["fd_level"],
                          "structural consistency": ["nesting", "plan_adherence", "reencode_ari"],
                          "controllability": ["locality_latent", "locality_pixel", "preservation_psnr_outside"]}
