"""generator.mode: flat through the same flows: the pipeline trains the flat baseline, evaluate scores
it into its own folder beside the staged evaluation, and the two runs give one comparison table."""
from pathlib import Path

import numpy as np
import pytest

from storage import zarr_store
from storage.config import load_config
from tasks import plan
from storage.tables import compare_runs, load_metrics

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, copy_root):
    from flows.stages import pipeline_flow

    root = copy_root(tmp_path_factory.mktemp("flat") / "root")   # the staged run "first", already done
    staged, flat = load_config(CONFIG), load_config(CONFIG, ["generator.mode=flat"])
    first = None
    second = pipeline_flow(config=flat, root=str(root), run_id="flat")
    return root, staged, flat, first, second


def test_flat_pipeline_trains_the_flat_model_and_reuses_the_rest(two_runs):
    root, staged, flat, _, second = two_runs
    status = {s["stage"]: s["status"] for s in second["stages"]}
    assert status == {"ingest": "reused", "encode": "reused", "hierarchy": "reused", "train-decoder": "reused",
                      "train-flat": "computed", "judge": "reused", "evaluate": "computed"}
    layout = plan.layout(root, flat)
    flat_dir, staged_dir = layout.mode_evaluation()[0], plan.layout(root, staged).mode_evaluation()[0]
    assert flat_dir.name.startswith("evaluate-flat-") and staged_dir == layout.evaluation()
    assert zarr_store.is_complete(flat_dir) and zarr_store.is_complete(staged_dir)
    trajectories = zarr_store.open_dataset(flat_dir / "trajectories.zarr")
    assert trajectories["level"].values.tolist() == [flat.hierarchy.generator_levels - 1]   # the final alone
    assert trajectories.attrs["mode"] == "flat"


def test_flat_rows_carry_the_mode_and_skip_what_needs_staged_canvases(two_runs):
    root, *_ = two_runs
    frame = load_metrics(root, run_id="flat")
    assert (frame["mode"] == "flat").all() and (load_metrics(root, run_id="first")["mode"] == "staged").all()
    ok = frame[frame.status == "ok"]
    skipped = frame[frame.status == "skipped"]
    assert skipped.value.isna().all() and (skipped.reason != "").all()
    fd = ok[ok.metric == "fd_level"]
    assert set(fd.level) == {3} and set(skipped[skipped.metric == "fd_level"].level) == {0, 1, 2}
    assert {"fd_dinov2", "holdout_psnr"} <= set(ok.metric)
    assert ok[ok.metric.isin(["nesting", "plan_adherence"])].empty
    assert set(skipped[skipped.metric == "nesting"].level) == {0, 1}
    reencode = ok[ok.metric == "reencode_ari"]
    assert set(reencode.variant) == {"final_hierarchy"} and set(reencode.level) == {0, 1, 2}
    assert ok[ok.group == "control"].empty and not skipped[skipped.group == "control"].empty
    # the judge scores the flat model's images too; its partition has no staged plan to be compared with
    assert {"fd_scenes", "class_accuracy"} <= set(ok[ok.variant == ""].metric)
    plan = frame[frame.metric.isin(["judge_plan_ari", "judge_plan_miou"]) & (frame.variant == "")]
    assert (plan.status == "skipped").all() and set(plan.level) == {0, 1, 2}


def test_one_comparison_table_for_both_runs(two_runs):
    root, *_ = two_runs
    table = compare_runs(root, ["first", "flat"], by="mode")
    assert list(table.columns[-2:]) == ["staged", "flat"]
    row = lambda metric, level, variant: table[(table.metric == metric) & (table.level == level)  # noqa: E731
                                               & (table.variant == variant)].iloc[0]
    for metric, level, variant in (("fd_dinov2", -1, ""), ("fd_level", 3, "mean_pooled"),
                                   ("reencode_ari", 1, "final_hierarchy"), ("holdout_psnr", -1, "")):
        both = row(metric, level, variant)
        assert np.isfinite(both.staged) and np.isfinite(both.flat), (metric, level, variant)
    assert np.isnan(row("fd_level", 0, "mean_pooled").flat)   # staged only
