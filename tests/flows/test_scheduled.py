"""The scheduled evaluation (tf-evaluate's `score_new`): it scores what changed since its last run, writes a
`nothing new` row when nothing did, and on a fresh root waits for the models instead of failing.
(tests/flows/test_deployments.py runs the deployment itself on a real server.)"""
from pathlib import Path

from flows.stages import evaluate_flow, train_flow
from storage.config import load_config
from storage.tables import NOTHING_NEW, load_metrics, load_runs
from tasks import plan

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


def _stages(root, run_id):
    runs = load_runs(root)
    assert (runs[runs.run_id == run_id].query("kind == 'run'").status == "completed").all()
    return runs[(runs.run_id == run_id) & (runs.kind == "stage")]


def test_on_a_fresh_root_it_waits_for_the_models_and_says_so(tmp_path):
    root = tmp_path / "fresh"
    evaluate_flow(config=load_config(CONFIG), root=str(root), run_id="nightly", score_new=True)
    (row,) = _stages(root, "nightly").itertuples()
    assert (row.stage, row.status) == ("evaluate", NOTHING_NEW) and "waiting for its models" in row.note
    assert "train-decoder" in row.note and not (root / "tables" / "metrics").exists()


def test_it_scores_what_runs_since_its_last_run_trained_and_says_when_nothing_changed(tmp_path, copy_root):
    root = copy_root(tmp_path / "root")   # the session's tiny run "first": everything computed and scored
    cfg = load_config(CONFIG)
    evaluate_flow(config=cfg, root=str(root), run_id="nightly-1", score_new=True)
    (row,) = _stages(root, "nightly-1").itertuples()
    assert row.status == NOTHING_NEW and "already scored by run first" in row.note
    assert row.key == plan.layout(root, cfg).keys.evaluate

    # A run trains a new decoder and evaluates nothing: the next scheduled evaluation scores it.
    changed = load_config(CONFIG, ["decoder.steps=6"])
    train_flow(config=changed, root=str(root), run_id="new-decoder")
    evaluate_flow(config=cfg, root=str(root), run_id="nightly-2", score_new=True)
    rows = _stages(root, "nightly-2").set_index("stage")
    assert list(rows.index) == ["evaluate", "judge", "evaluate"]   # nothing new for its own config, then scored
    scored = rows[rows.status == "computed"].loc["evaluate"]
    assert scored.key == plan.layout(root, changed).keys.evaluate and rows.loc["judge", "status"] == "reused"
    assert set(load_metrics(root, run_id="nightly-2").model_key) != set(load_metrics(root, run_id="first").model_key)

    # Nothing trained since nightly-2 began: one row, nothing new.
    evaluate_flow(config=cfg, root=str(root), run_id="nightly-3", score_new=True)
    (row,) = _stages(root, "nightly-3").itertuples()
    assert row.status == NOTHING_NEW and "already scored by run first" in row.note
