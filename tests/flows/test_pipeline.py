"""End to end: the pipeline flow on tiny.yaml writes every store and table, and a re-run reuses them."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage import zarr_store
from storage.config import load_config
from storage.keys import Layout
from storage.tables import load_metrics, load_runs

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from flows.stages import pipeline_flow

    root = tmp_path_factory.mktemp("root")
    cfg = load_config(CONFIG)
    first = pipeline_flow(config=cfg, root=str(root), run_id="first")
    return cfg, root, first


def test_every_stage_was_computed_and_stores_are_complete(tiny_run):
    cfg, root, first = tiny_run
    assert [s["status"] for s in first["stages"]] == ["computed"] * len(first["stages"])
    layout = Layout(root, cfg)
    for path in (layout.images(), layout.latents(), layout.teacher(), layout.evaluation()):
        assert zarr_store.is_complete(path), path
    tokens = zarr_store.open_dataset(layout.latents())
    assert tokens.attrs["encoder_weights"] == "random-init"
    assert tokens["tokens"].shape == (cfg.source.num_images, 4, 4, 384)
    regions = zarr_store.open_dataset(layout.teacher())["regions"].values
    assert regions.shape == (cfg.source.num_images, 3, 4, 4)
    for level in range(cfg.hierarchy.num_levels):
        assert (layout.generator(level) / "generator.safetensors").exists()
        assert (layout.generator(level) / "generator.json").exists()


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


def test_grid_png_has_one_column_per_level(tiny_run):
    cfg, root, first = tiny_run
    grid = np.asarray(Image.open(first["outputs"]["grid"]))
    size, pad = cfg.source.image_size, 2
    assert grid.shape[1] == cfg.hierarchy.num_levels * (size + pad) + pad
    assert grid.shape[0] == cfg.evaluate.grid_rows * (size + pad) + pad


def test_rerun_reuses_everything(tiny_run):
    from flows.stages import pipeline_flow

    cfg, root, _ = tiny_run
    again = pipeline_flow(config=cfg, root=str(root), run_id="second")
    assert {s["status"] for s in again["stages"]} == {"reused"}
    runs = load_runs(root)
    assert set(runs.run_id) == {"first", "second"}
