"""The judge stage: trained once on the real scenes of the image store, reused after, keyed by its own config."""
from pathlib import Path

import numpy as np
import pytest

from storage import zarr_store
from storage.config import load_config
from storage.files import read_json
from storage.keys import Layout
from storage.scenes import SCENE_CLASSES, render_scenes
from tasks.ingest.stage import image_store_arrays

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


def _image_store(path: Path, cfg) -> None:
    """The image store ingest writes for tiny scenes, written directly (no Dask)."""
    n, size = cfg.source.num_images, cfg.source.image_size
    scenes = render_scenes(range(n), cfg.source.seed, size)
    zarr_store.create_store(path, image_store_arrays(n, size, with_masks=True), n,
                            {"stage": "images", "classes": list(SCENE_CLASSES)})
    for name, values in (("image", scenes["image"]), ("label", scenes["label"]), ("masks", scenes["masks"]),
                         ("valid", np.ones(n, bool)), ("sample", np.array([f"scene-{i}" for i in range(n)]))):
        zarr_store.write_array(path, name, values)
    zarr_store.mark_complete(path, {"samples": n})


def test_judge_stage_is_trained_once_then_reused_and_keyed_by_its_config(tmp_path):
    from tasks.judge.stage import ensure_judge

    cfg = load_config(CONFIG)
    layout = Layout(tmp_path, cfg)
    _image_store(layout.images(), cfg)
    first = ensure_judge(cfg, str(tmp_path))
    assert first["status"] == "computed" and first["stage"] == "judge" and Path(first["path"]) == layout.judge()
    meta = read_json(layout.judge() / "judge.json")
    held = round(cfg.judge.holdout * cfg.source.num_images)
    assert meta["holdout"]["n"] == len(meta["holdout_index"]) == held
    assert meta["holdout_index"] == list(range(cfg.source.num_images - held, cfg.source.num_images))
    assert 0.0 <= meta["holdout"]["accuracy"] <= 1.0 and len(meta["holdout"]["miou"]) == 3
    assert len(meta["holdout"]["miou_grid"]) == 3 and meta["train_seconds"] > 0
    weights = layout.judge() / "judge.safetensors"
    written = weights.stat().st_mtime_ns

    again = ensure_judge(cfg, str(tmp_path))
    assert again["status"] == "reused" and weights.stat().st_mtime_ns == written   # not retrained
    assert again["holdout_accuracy"] == meta["holdout"]["accuracy"]

    # its own config and the image store move the key; the generators, hierarchy and evaluation do not
    assert Layout(tmp_path, load_config(CONFIG, ["judge.steps=31"])).judge() != layout.judge()
    assert Layout(tmp_path, load_config(CONFIG, ["source.seed=1"])).judge() != layout.judge()
    for other in (["generator.steps=9"], ["hierarchy.cuts=[0.6,0.3]"], ["evaluate.num_samples=9"]):
        assert Layout(tmp_path, load_config(CONFIG, other)).judge() == layout.judge(), other


def test_judge_needs_scenes(tmp_path):
    from tasks.judge.stage import ensure_judge

    cfg = load_config(CONFIG, ["source.kind=imagefolder", f"source.path={tmp_path}"])
    assert Layout(tmp_path, cfg).keys.judge == ""
    with pytest.raises(ValueError, match="scenes"):
        ensure_judge(cfg, str(tmp_path))


def test_other_sources_get_every_judge_row_as_skipped_with_the_reason(tmp_path):
    from models.evaluation.registry import EvalSetting
    from tasks.evaluate.judge import judge_labels
    from tasks.evaluate.rows import registry_rows
    from tasks.judge.stage import NOT_SCENES

    cfg = load_config(CONFIG, ["source.kind=imagefolder", f"source.path={tmp_path}"])
    setting = EvalSetting(levels=4, judge_reason=NOT_SCENES + " (source.kind is 'imagefolder')")
    rows = [r for r in registry_rows(setting, {}, {"judge": judge_labels(Layout(tmp_path, cfg))}, n_boot=10)
            if r["feature_extractor"] == "scenes-judge"]
    assert {r["metric"] for r in rows} == {"fd_scenes", "class_accuracy", "judge_plan_ari", "judge_plan_miou"}
    assert all(r["status"] == "skipped" and "scenes" in r["reason"] and np.isnan(r["value"]) for r in rows)
    plan = [(r["variant"], r["level"]) for r in rows if r["metric"] == "judge_plan_miou"]
    assert sorted(plan) == [(v, level) for v in ("", "real_holdout") for level in range(3)]
