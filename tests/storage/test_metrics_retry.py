"""A run killed after writing its metrics and retried under the same run id must not double its rows
(the kill-and-resume soak found this: 89 duplicated rows in one evaluate trial)."""
from storage.tables import load_metrics, metric_row, write_metrics

CONTEXT = {"latents_key": "l1", "teacher_key": "t1", "model_key": "m1"}


def _rows(value):
    return [metric_row("quality", "fd_dinov2", value, n=8), metric_row("per_level", "fd_level", value, level=2, n=8)]


def test_retried_write_replaces_the_part_of_the_killed_attempt(tmp_path):
    first = write_metrics(tmp_path, "run-a", _rows(1.0), CONTEXT)
    again = write_metrics(tmp_path, "run-a", _rows(1.0), CONTEXT)
    assert first == again
    frame = load_metrics(tmp_path, run_id="run-a")
    assert len(frame) == 2 and not frame.duplicated(["group", "metric", "level", "variant"]).any()


def test_other_measurements_in_the_same_run_keep_their_own_parts(tmp_path):
    write_metrics(tmp_path, "run-a", _rows(1.0), CONTEXT)
    write_metrics(tmp_path, "run-a", _rows(2.0), {**CONTEXT, "model_key": "m2"})   # another model
    write_metrics(tmp_path, "run-b", _rows(3.0), CONTEXT)                          # another run
    assert len(load_metrics(tmp_path, run_id="run-a")) == 4
    assert len(load_metrics(tmp_path)) == 6
