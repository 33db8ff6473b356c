"""End to end: the pipeline flow on tiny.yaml writes every store and table, and a re-run reuses them."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from storage import zarr_store
from storage.checkpoints import is_complete
from storage.config import load_config
from tasks import plan
from storage.tables import load_metrics, load_runs

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_staged_run, copy_root):
    """The session's tiny run "first" (every stage computed there), in a copy these tests may extend."""
    root = copy_root(tmp_path_factory.mktemp("pipeline") / "root")
    return load_config(CONFIG), root, tiny_staged_run[1]


def test_every_stage_was_computed_and_stores_are_complete(tiny_run):
    cfg, root, first = tiny_run
    assert [s["status"] for s in first["stages"]] == ["computed"] * len(first["stages"])
    layout = plan.layout(root, cfg)
    for path in (layout.images(), layout.latents(), layout.teacher(), layout.evaluation()):
        assert zarr_store.is_complete(path), path
    assert is_complete(layout.judge()) and (layout.judge() / "judge.safetensors").exists()
    tokens = zarr_store.open_dataset(layout.latents())
    assert tokens.attrs["encoder_weights"] == "random-init"
    assert tokens["tokens"].shape == (cfg.source.num_images, 4, 4, 384)
    regions = zarr_store.open_dataset(layout.teacher())["regions"].values
    assert regions.shape == (cfg.source.num_images, 3, 4, 4)
    for level in range(cfg.hierarchy.generator_levels):
        assert (layout.generator(level) / "generator.safetensors").exists()
        assert (layout.generator(level) / "generator.json").exists()


def test_the_run_record_is_a_row_per_stage_and_one_for_the_run(tiny_run):
    """tables/runs: 1 + stages rows; the run's total is its stages' seconds plus its overhead; times are
    timestamps; run.json holds the config behind every key."""
    from storage.tables import load_run_config, run_summaries

    cfg, root, first = tiny_run
    runs = load_runs(root)
    mine = runs[runs.run_id == "first"]
    assert len(mine) == 1 + len(first["stages"]) and list(mine.kind).count("run") == 1
    total = mine[mine.kind == "run"].iloc[0]
    stages = mine[mine.kind == "stage"]
    assert total.status == "completed" and total.error == "" and total.flow == "pipeline"
    assert total.duration_s == pytest.approx(stages.duration_s.sum() + total.overhead_s, abs=2e-3)
    assert total.overhead_s >= 0 and first["total"]["duration_s"] == total.duration_s
    assert (stages.started_at >= total.started_at).all() and (stages.ended_at <= total.ended_at).all()
    assert (stages.started_at.diff().dropna() >= pd.Timedelta(0)).all()   # in the order they ran
    spans = (stages.ended_at - stages.started_at).dt.total_seconds()
    assert spans.to_numpy() == pytest.approx(stages.duration_s.to_numpy(), abs=1e-3)
    assert set(stages.parent_run_id) == {""} and (stages.encoder_weights == "random-init").all()
    summary = run_summaries(root).set_index("run_id").loc["first"]
    assert summary.stage_s == pytest.approx(stages.duration_s.sum()) and summary.reused == ""
    assert load_run_config(root, "first")["config"] == cfg.model_dump(mode="json")


def test_metric_table_has_every_group_level_and_metric(tiny_run):
    cfg, root, _ = tiny_run
    frame = load_metrics(root, run_id="first")
    assert (frame.encoder_weights == "random-init").all()
    groups = set(frame.group)
    assert {"quality", "per_level", "structure", "control", "alignment", "decoder"} <= groups
    fid = frame[frame.metric == "fid"].iloc[0]
    assert fid.status == "skipped" and "Inception" in fid.reason and np.isnan(fid.value)
    fd = frame[frame.metric == "fd_dinov2"].iloc[0]
    assert fd.status == "ok" and np.isfinite(fd.value)
    assert set(frame[frame.metric == "fd_level"].level) == {0, 1, 2, 3}
    assert set(frame[frame.metric == "nesting"].level) == {0, 1}
    assert set(frame[frame.metric == "plan_adherence"].level) == {0, 1, 2}
    assert set(frame[frame.metric == "reencode_ari"].level) == {0, 1, 2}
    assert set(frame[frame.metric == "ari"].level) == {0, 1, 2}
    for metric in ("locality_latent", "locality_pixel", "adherence", "preservation_coarse_identical",
                   "preservation_psnr_outside"):
        assert set(frame[frame.metric == metric].level) == {0, 1, 2, 3}, metric
    coarse = frame[frame.metric == "preservation_coarse_identical"]
    assert (coarse.value == 1.0).all()  # edits never touch coarser levels


def test_scenes_judge_rows_name_the_judge_and_cover_every_level(tiny_run):
    cfg, root, _ = tiny_run
    frame = load_metrics(root, run_id="first")
    judged = frame[frame.metric.isin(["fd_scenes", "class_accuracy", "judge_plan_ari", "judge_plan_miou"])]
    assert (judged.feature_extractor == "scenes-judge").all()
    assert (judged.extractor_weights == f"judge-{plan.layout(root, cfg).keys.judge}").all()
    assert (judged.status == "ok").all(), judged[judged.status != "ok"][["metric", "variant", "reason"]]
    for variant, n in (("", cfg.evaluate.num_samples), ("real_holdout", round(cfg.judge.holdout * cfg.source.num_images))):
        rows = judged[judged.variant == variant]
        assert set(rows[rows.group == "quality"].metric) == {"fd_scenes", "class_accuracy"}
        for metric in ("judge_plan_ari", "judge_plan_miou"):
            assert set(rows[rows.metric == metric].level) == {0, 1, 2}, (variant, metric)
        assert (rows[rows.metric == "class_accuracy"].n == n).all()
    accuracy = judged[judged.metric == "class_accuracy"]
    assert accuracy.value.between(0, 1).all() and np.isfinite(accuracy[accuracy.variant == ""].ci_low).all()
    fd = judged[judged.metric == "fd_scenes"].value
    assert (fd > 0).all() and np.isfinite(fd).all()   # generated scenes are not the real ones: never clamped to 0


def test_grid_png_has_one_column_per_level(tiny_run):
    cfg, root, first = tiny_run
    grid = np.asarray(Image.open(first["outputs"]["grid"]))
    size, pad = cfg.source.image_size, 2
    assert grid.shape[1] == cfg.hierarchy.generator_levels * (size + pad) + pad
    assert grid.shape[0] == cfg.evaluate.grid_rows * (size + pad) + pad


def test_rerun_reuses_everything(tiny_run):
    from flows.stages import pipeline_flow

    cfg, root, _ = tiny_run
    again = pipeline_flow(config=cfg, root=str(root), run_id="second")
    assert {s["status"] for s in again["stages"]} == {"reused"}
    runs = load_runs(root)
    assert set(runs.run_id) == {"first", "second"}
    second = runs[(runs.run_id == "second") & (runs.kind == "stage")]
    assert set(second.status) == {"reused"} and len(second) == len(again["stages"])


def _mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_h_sub_change_recomputes_only_what_reads_the_subpart_cut(tiny_run):
    from flows.stages import pipeline_flow

    cfg, root, _ = tiny_run
    before = plan.layout(root, cfg)
    untouched = {name: _mtimes(path) for name, path in (
        ("images", before.images()), ("latents", before.latents()), ("decoder", before.decoder()),
        ("L0", before.generator(0)), ("L1", before.generator(1)))}
    changed = load_config(CONFIG, ["hierarchy.cuts=[0.65, 0.2]"])
    report = {s["stage"]: s["status"] for s in pipeline_flow(config=changed, root=str(root), run_id="hsub")["stages"]}
    assert report == {"ingest": "reused", "encode": "reused", "hierarchy": "computed", "train-decoder": "reused",
                      "train-L0": "reused", "train-L1": "reused", "train-L2": "computed", "train-L3": "computed",
                      "judge": "reused", "evaluate": "computed"}
    for name, files in untouched.items():   # not only the report: the stores were not rewritten
        assert files == _mtimes({"images": before.images(), "latents": before.latents(), "decoder": before.decoder(),
                                 "L0": before.generator(0), "L1": before.generator(1)}[name]), name
    after = plan.layout(root, changed)
    assert after.teacher() != before.teacher() and before.teacher().exists()   # both hierarchies side by side
    # the real images' FD-DINOv2 statistics were computed by the first run and read back here
    # (and the judge's features of them: the judge is keyed by the images, not the hierarchy)
    assert zarr_store.completion(before.evaluation())["reference_reused"] == {"dinov2": False, "judge": False}
    assert zarr_store.completion(after.evaluation())["reference_reused"] == {"dinov2": True, "judge": True}
    runs = load_runs(root)
    assert set(runs[(runs.run_id == "hsub") & (runs.kind == "stage")].status) == {"computed", "reused"}


def test_force_recomputes_the_stage_and_everything_downstream(tiny_run):
    from flows.stages import pipeline_flow

    cfg, root, _ = tiny_run
    stages = pipeline_flow(config=cfg, root=str(root), run_id="forced", force="train")["stages"]
    report = {s["stage"]: s["status"] for s in stages}
    assert [report[s] for s in ("ingest", "encode", "hierarchy", "judge")] == ["reused"] * 4   # not downstream of train
    assert {report[s] for s in report if s.startswith("train") or s == "evaluate"} == {"computed"}


def test_status_lists_stores_runs_and_what_is_stale(tiny_run, capsys):
    from flows.cli import main

    cfg, root, _ = tiny_run
    assert main(["status", "--root", str(root), "--config", str(CONFIG), "--set", "hierarchy.cuts=[0.65, 0.1]"]) == 0
    out = capsys.readouterr().out
    assert plan.layout(root, cfg).images().name in out and "first" in out
    assert "hierarchy      would compute" in out and "ingest         up to date" in out
