"""The Streamlit pages through AppTest: empty or missing roots, and each page's content on a tiny-pipeline root."""
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from dashboards import data
from models.evaluation.registry import unit_of

APP = str(Path(__file__).parents[2] / "dashboards" / "app.py")
PAGES = ["runs", "trajectories", "hierarchy", "edit"]


def open_page(monkeypatch, root, page: str) -> AppTest:
    monkeypatch.setenv("TF_DASHBOARD_ROOT", str(root))
    app = AppTest.from_file(APP, default_timeout=120)
    app.query_params["page"] = page
    return app.run()


@pytest.mark.parametrize("page", PAGES)
def test_missing_or_empty_root_gives_a_message(monkeypatch, tmp_path, page):
    for root, words in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "no runs yet"), ("", "No store root")):
        app = open_page(monkeypatch, root, page)
        assert not app.exception, app.exception
        assert any(words in w.value for w in app.warning), [w.value for w in app.warning]


def test_runs_page_lists_runs_and_compares_two(monkeypatch, tiny_root):
    app = open_page(monkeypatch, tiny_root, "runs")
    assert not app.exception
    runs = app.dataframe[0].value
    assert list(runs.columns[:5]) == ["status", "run_id", "started", "duration_s", "error"]
    assert set(runs.run_id) == {"first", "second"} and (runs.encoder_weights == "random-init").all()
    assert runs.set_index("run_id").loc["second", "metrics_from"] == "first"
    # the comparison starts with two different runs; the newest run's details show its stages and its grid
    assert (app.selectbox(key="run_a").value, app.selectbox(key="run_b").value) == ("first", "second")
    assert app.selectbox(key="detail_run").value == "second"
    assert any("grid.png of evaluate-" in i.proto.imgs[0].caption for i in app.image)
    app.selectbox(key="detail_key_stage").select("hierarchy").run()
    assert any('"cuts"' in c.value for c in app.code)   # the settings behind the hierarchy's key
    table = next(d.value for d in app.dataframe if "difference" in d.value.columns)
    assert {"first", "second", "unit"} <= set(table.columns) and table.unit.str.len().gt(0).all()
    # the metric trends, then one chart per group (per-level FD, consistency, controllability), a panel per
    # measured metric, every y axis titled with its unit
    charts = [json.loads(chart.proto.spec) for chart in app.get("vega_lite_chart")]
    assert len(charts) == 1 + len(data.PLOTS)
    trend, bars = charts[0], charts[1:]
    trend_panels = [panel for row in trend["vconcat"] for panel in row["hconcat"]]
    assert [panel["transform"][0]["filter"]["equal"] for panel in trend_panels] == list(dict.fromkeys(
        m for _, m in data.HEADLINE if m != "fid"))
    for chart, metrics in zip(bars, data.PLOTS.values()):   # the tiny run measures them all
        assert [panel["transform"][0]["filter"]["equal"] for panel in chart["hconcat"]] == metrics
    for panel in trend_panels + [p for chart in bars for p in chart["hconcat"]]:
        metric = panel["transform"][0]["filter"]["equal"]
        assert unit_of(metric).startswith(panel["encoding"]["y"]["title"]) and panel["encoding"]["y"]["title"]
        assert panel["title"].startswith(metric)


def test_a_failed_run_is_marked_with_its_error(monkeypatch, tmp_path):
    """A real failure (encode before any ingest): the runs table marks it, its details say where and why."""
    from flows.stages import encode_flow
    from storage.config import load_config

    with pytest.raises(RuntimeError, match="incomplete"):
        encode_flow(config=load_config(Path(__file__).parents[2] / "configs" / "tiny.yaml"), root=str(tmp_path),
                    run_id="broken")
    app = open_page(monkeypatch, tmp_path, "runs")
    assert not app.exception
    (row,) = app.dataframe[0].value.itertuples()
    assert row.status == data.STATUS_MARK["failed"] and "RuntimeError" in row.error and row.duration_s > 0
    assert [e.value for e in app.error] == [f"Failed at encode: {row.error}"]


def test_trajectory_viewer_levels_overlays_and_pca(monkeypatch, tiny_root):
    app = open_page(monkeypatch, tiny_root, "trajectories")
    assert not app.exception
    urls = [i.proto.imgs[0].url for i in app.image]
    assert len(urls) == 8                                 # 4 levels decoded + 4 PCA views
    assert sum("canvas PCA" in i.proto.imgs[0].caption for i in app.image) == 4
    app.toggle(key="traj_pca").set_value(False).run()
    assert len(app.image) == 4
    plain = [i.proto.imgs[0].url for i in app.image]
    app.toggle(key="traj_overlay").set_value(True).run()
    overlaid = [i.proto.imgs[0].url for i in app.image]
    assert all(a != b for a, b in zip(plain, overlaid))   # every level shows its partition in colours


def test_hierarchy_browser_shows_teacher_truth_and_ari(monkeypatch, tiny_root):
    app = open_page(monkeypatch, tiny_root, "hierarchy")
    assert not app.exception
    captions = [i.proto.imgs[0].caption for i in app.image]
    assert len(captions) == 4   # one picture per row: the image, teacher L0-L2, truth L0-L2 titled inside it
    assert all(": teacher L0-L2; truth L0-L2, ARI " in c for c in captions), captions
    assert all(len(c.split("ARI ")[1].split(", ")) == 3 for c in captions)   # the per-image ARI of every level


def test_edit_playground_click_run_and_save(monkeypatch, tiny_root):
    app = open_page(monkeypatch, tiny_root, "edit")
    assert not app.exception
    parent_id = app.selectbox(key="edit_parent").value
    level = app.selectbox(key="edit_level").value
    store = data.run_folders(tiny_root, app.selectbox(key="edit_run_id").value).evaluation / "trajectories.zarr"
    partition = data.partition_of_level(data.load_trajectory(store, parent_id).regions, level)
    grid = json.loads(app.get("bidi_component")[0].proto.json)   # the token grid (clicked in test_browser.py)
    assert grid == {"ids": partition.tolist(), "selected": app.selectbox(key="edit_region").value}
    regions = data.load_trajectory(store, parent_id).regions   # by default the object (its largest part at l*)
    assert app.selectbox(key="edit_region").value == data.region_labels(regions, level)[1]
    app.radio(key="edit_source").set_value("region_mean").run()   # the caption names a mean, not a trajectory
    app.selectbox(key="edit_donor").select(parent_id).run()
    assert any("the mean of the trajectory's own level-" in c.value for c in app.caption)
    app.radio(key="edit_source").set_value("token_exchange").run()
    app.selectbox(key="edit_region").select(int(partition[3, 0])).run()   # a region picked by its id
    assert json.loads(app.get("bidi_component")[0].proto.json)["selected"] == int(partition[3, 0])
    before = len(data.load_edits(tiny_root))
    app.button(key="edit_run").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    numbers = {m.label: m.value for m in app.metric}
    assert list(numbers) == ["locality, latent", "locality, pixels", "PSNR outside (dB)", "SSIM outside",
                             "coarser levels kept", "adherence", "adherence, unedited", "adherence gain"]
    assert numbers["coarser levels kept"] == "yes" and all(m.proto.help for m in app.metric)   # what each means
    gain = float(numbers["adherence"]) - float(numbers["adherence, unedited"])
    assert float(numbers["adherence gain"]) == pytest.approx(gain, rel=1e-3, abs=1e-3)   # 4 shown digits
    edits = data.load_edits(tiny_root)
    assert len(edits) == before + 1
    newest = edits.iloc[0]
    captions = [i.proto.imgs[0].caption for i in app.image]
    assert f"edited (final image) {newest.edit_id}" in captions and "original (final image)" in captions
    assert newest.parent == parent_id and newest.region == int(partition[3, 0]) and newest.level == level
    assert np.isfinite(newest.preservation_psnr_outside)
    app.session_state["edit_saved"] = True                # the saved edits, once their expander opens
    app.run()
    assert newest.edit_id in set(app.dataframe[0].value.edit_id)


def test_a_root_whose_runs_wrote_nothing_to_show(monkeypatch, tmp_path):
    """Runs exist (e.g. only ingest ran) but no teacher, checkpoints or evaluation: messages, not stack traces."""
    from storage.tables import write_run_report

    write_run_report(tmp_path, "only-ingest", [{
        "run_id": "only-ingest", "timestamp": "2026-01-01T00:00:00+00:00", "flow": "ingest", "stage": "ingest",
        "key": "abc", "status": "computed", "duration_s": 1.0, "path": "data/images-abc", "encoder_weights": ""}])
    for page in PAGES:
        app = open_page(monkeypatch, tmp_path, page)
        assert not app.exception, (page, app.exception)
        if page == "runs":
            assert list(app.dataframe[0].value.run_id) == ["only-ingest"]
        else:
            assert app.warning, page
