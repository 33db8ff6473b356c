"""The dashboard's non-UI logic on a tiny-pipeline root: runs, folders, metrics, trajectories, pictures."""
from pathlib import Path

import numpy as np
import pytest

from dashboards import data, visuals
from storage.tables import load_metrics

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


def test_root_problems_are_sentences_not_errors(tmp_path):
    assert "No store root" in data.root_problem("")
    assert "does not exist" in data.root_problem(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    assert "not a folder" in data.root_problem(tmp_path / "file")
    assert "no runs yet" in data.root_problem(tmp_path)


def test_runs_overview_has_keys_weights_stages_and_headline_metrics(tiny_root):
    assert data.root_problem(tiny_root) is None
    overview = data.runs_overview(tiny_root).set_index("run_id")
    assert set(overview.index) == {"first", "second"}
    assert (overview.encoder_weights == "random-init").all()
    assert "train-L3" in overview.loc["first", "computed"] and overview.loc["first", "reused"] == ""
    assert overview.loc["second", "computed"] == "" and "evaluate" in overview.loc["second", "reused"]
    assert overview.loc["first", "key:evaluate"] == overview.loc["second", "key:evaluate"]
    # the reusing run shows the numbers of the run that computed its evaluation
    assert overview.loc["second", "metrics_from"] == "first"
    fd = load_metrics(tiny_root, run_id="first", metric="fd_dinov2").value.iloc[0]
    assert overview.loc["second", "fd_dinov2"] == pytest.approx(fd)
    assert np.isnan(overview.loc["first", "fid"])     # skipped without Inception weights: no number


def test_per_level_comparison_and_side_by_side_table(tiny_root):
    frame = data.per_level_comparison(tiny_root, ["first", "second"], "fd_level")
    assert list(frame.index) == [0, 1, 2, 3] and list(frame.columns) == ["first", "second"]
    assert np.allclose(frame["first"], frame["second"])
    table = data.comparison_table(tiny_root, "first", "second")
    assert {"first", "second", "difference"} <= set(table.columns)
    assert {"fd_level", "nesting", "locality_pixel"} <= set(table.metric)
    assert np.allclose(table.difference.dropna(), 0.0)
    assert data.per_level_comparison(tiny_root, ["first"], "no_such_metric").empty


def test_run_folders_are_found_under_the_root(tiny_root):
    folders = data.run_folders(tiny_root, "first")
    assert len(folders.generators) == 4 and all(p.parent == tiny_root for p in folders.generators)
    assert folders.evaluation.exists() and folders.teacher.exists() and folders.images.exists()
    with pytest.raises(KeyError):
        data.run_folders(tiny_root, "nope")


def test_trajectory_load_and_pictures(tiny_root):
    sources = data.trajectory_sources(tiny_root)
    store = next(p for name, p in sources.items() if "trajectories" in name)
    ids = data.trajectory_ids(store)
    assert len(ids) == 4   # tiny.yaml keep_trajectories
    trajectory = data.load_trajectory(store, ids[0])
    assert trajectory.images.shape == (4, 56, 56, 3) and trajectory.canvas.shape == (4, 4, 4, 384)
    assert trajectory.regions.shape == (3, 4, 4)
    pca = visuals.pca_rgb(trajectory.canvas, 56)
    assert pca.shape == (4, 56, 56, 3) and pca.dtype == np.uint8 and pca.max() == 255 and pca.min() == 0
    ids_grid = np.array([[0, 1], [1, 2]])
    coloured = visuals.colour_partition(ids_grid, 4)
    assert (coloured[0, 0] == visuals.PALETTE[0]).all() and (coloured[3, 3] == visuals.PALETTE[2]).all()
    assert (coloured[0, 2] == coloured[2, 0]).all()    # the same region gets the same colour
    blended = visuals.overlay(np.zeros((4, 4, 3), np.uint8), ids_grid)
    assert blended[3, 3].tolist() != blended[0, 0].tolist()


def test_hierarchy_rows_carry_truth_and_per_image_ari(tiny_root):
    folders = data.run_folders(tiny_root, "first")
    rows = visuals.hierarchy_rows(folders.images, folders.teacher, 2, 3)
    assert [r["index"] for r in rows] == [2, 3, 4]
    for row in rows:
        assert row["teacher"].shape == (3, 4, 4) and row["truth"].shape == (3, 4, 4)
        assert len(row["ari"]) == 3 and all(-1.0 <= a <= 1.0 for a in row["ari"])
        assert row["truth"][0].max() <= 1    # level 0 of the ground truth is object vs background
    assert visuals.hierarchy_rows(folders.images, folders.teacher, 10_000, 3) == []


def test_hierarchy_strip_is_one_titled_picture_per_row(tiny_root):
    folders = data.run_folders(tiny_root, "first")
    row = visuals.hierarchy_rows(folders.images, folders.teacher, 0, 1)[0]
    strip = visuals.hierarchy_strip(row, 168, gap=12)
    size = 168   # a multiple of the 4 x 4 token grid
    assert strip.dtype == np.uint8 and strip.shape[1] == 7 * size + 6 * 12
    panels = strip[-size:]   # below the titles: image, teacher L0..L2, truth L0..L2
    assert (panels[:, size + 12:2 * size + 12] == visuals.colour_partition(row["teacher"][0], size)).all()
    assert (panels[:, -size:] == visuals.colour_partition(row["truth"][2], size)).all()
    assert (strip[:-size] != 255).any()   # the titles
    # many levels: narrower panels (still whole tokens), never wider than what st.image shows unchanged
    deep = dict(row, teacher=np.zeros((6, 4, 4), int), truth=np.zeros((6, 4, 4), int), ari=[0.5] * 6)
    wide = visuals.hierarchy_strip(deep, 168, gap=12)
    assert wide.shape[1] <= visuals.STREAMLIT_MAX_IMAGE_PX and (wide.shape[1] - 12 * 12) % (13 * 4) == 0


def test_runs_lead_with_status_and_time_and_compare_two_different_runs(tiny_root):
    overview = data.runs_overview(tiny_root)
    assert list(overview.columns[:5]) == ["status", "run_id", "started", "duration_s", "error"]
    assert list(overview.run_id) == ["second", "first"]   # newest first
    assert set(overview.status) == {data.STATUS_MARK["completed"]} and (overview.duration_s > 0).all()
    assert (overview.encoder_weights == "random-init").all()   # a row without weights adds no ", "
    assert data.default_pair(overview) == ("first", "second")
    trends = data.metric_trends(tiny_root, overview)
    # "second" reused the evaluation of "first": one point per evaluation, with its unit
    assert set(trends.run_id) == {"first"} and set(trends.metric) == {m for _, m in data.headline()} - {"fid"}
    assert trends.unit.str.len().gt(0).all()


def test_every_metric_written_has_a_unit(tiny_root):
    from models.evaluation.registry import unit_of

    assert {m for m in load_metrics(tiny_root).metric if not unit_of(m)} == set()


def test_a_run_links_its_folders_grid_and_the_config_behind_each_key(tiny_root):
    from storage.config import load_config

    cfg = load_config(CONFIG)
    links = data.run_links(tiny_root, "first")
    assert links["grid"].name == "grid.png" and links["grid"].exists()
    assert all(Path(folder).is_absolute() and Path(folder).exists() for folder in links["folders"].values())
    assert links["prefect"] == ""   # the ephemeral API has no UI page to link
    assert data.key_config(tiny_root, "first", "hierarchy") == {"hierarchy": cfg.hierarchy.model_dump(mode="json")}
    assert set(data.key_config(tiny_root, "first", "train-L2")) == {"generator", "hierarchy"}


def test_the_default_region_is_the_object():
    # level 0: an object (1) in the middle of a background (0); level 1: the background, and the object in two parts
    level0 = np.zeros((6, 6), int)
    level0[1:5, 2:5] = 1
    level1 = np.where(level0 == 1, 2, 0)
    level1[1:3, 2:5] = 5   # the object's top part, 6 tokens; 2 is its lower part, 6 tokens
    level1[5, 5] = 7       # a corner of the background: the highest id
    regions = np.stack([level0, level1])
    assert data.object_region(regions) == 1
    labels, default = data.region_labels(regions, 1)
    assert default == 2 and labels[7] == "7: background, 1 tokens" and labels[5] == "5: part of the object, 6 tokens"
    assert data.region_labels(regions, 0) == ({0: "0: background, 24 tokens", 1: "1: the object, 12 tokens"}, 1)
