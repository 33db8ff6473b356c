"""generator.sharing: shared through the same flows: one generator trained for every level (each batch
from one level), its own key and folder, evaluated at every level, and reused by a re-run."""
from pathlib import Path

import pytest

from storage import zarr_store
from storage.checkpoints import load_checkpoint
from storage.config import load_config
from tasks import plan
from storage.tables import load_metrics

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory, copy_root):
    from flows.stages import pipeline_flow

    root = copy_root(tmp_path_factory.mktemp("shared") / "root", upstream_only=True)   # no per-level models
    cfg = load_config(CONFIG, ["generator.sharing=shared"])
    first = pipeline_flow(config=cfg, root=str(root), run_id="shared")
    again = pipeline_flow(config=cfg, root=str(root), run_id="shared-again")
    return root, cfg, first, again


def test_one_model_is_trained_for_every_level_and_reused(shared_runs):
    root, cfg, first, again = shared_runs
    computed = {s["stage"]: s["status"] for s in first["stages"]}
    assert computed["train-shared"] == "computed" and not any(s.startswith("train-L") for s in computed)
    assert {s["stage"]: s["status"] for s in again["stages"]}["train-shared"] == "reused"
    layout = plan.layout(root, cfg)
    folder = layout.shared_generator()
    assert folder.name == f"generator-shared-{layout.keys.shared_generator}"
    assert not any(layout.generator(level).exists() for level in range(cfg.hierarchy.generator_levels))
    _, meta = load_checkpoint(folder / "generator")
    levels = cfg.hierarchy.generator_levels
    assert meta["shared"] and meta["trained_level"] == list(range(levels))
    assert meta["steps"] == cfg.generator.steps * levels   # the per-level models' budget together
    assert meta["sampled_ema"] == "edm500kimg"


def test_shared_evaluation_scores_every_level(shared_runs):
    root, cfg, *_ = shared_runs
    layout = plan.layout(root, cfg)
    assert zarr_store.is_complete(layout.evaluation())
    trajectories = zarr_store.open_dataset(layout.evaluation() / "trajectories.zarr")
    assert trajectories["level"].values.tolist() == list(range(cfg.hierarchy.generator_levels))
    ok = load_metrics(root, run_id="shared")
    ok = ok[ok.status == "ok"]
    assert set(ok[ok.metric == "fd_level"].level) == set(range(cfg.hierarchy.generator_levels))
    assert set(ok[ok.metric == "nesting"].level) == {0, 1}
    assert not ok[ok.group == "control"].empty


def test_dashboard_loads_the_shared_model_at_every_level(shared_runs):
    from dashboards.data import run_folders
    from dashboards.edit_service import load_models

    root, cfg, *_ = shared_runs
    folders = run_folders(root, "shared")
    assert folders.generators == (plan.layout(root, cfg).shared_generator(),) * cfg.hierarchy.generator_levels
    models = load_models(folders, "cpu")
    assert len(models.generators) == cfg.hierarchy.generator_levels and len({id(m) for m in models.generators}) == 1
