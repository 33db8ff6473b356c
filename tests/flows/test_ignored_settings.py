"""A setting the config does not use is named in one line before any work and builds nothing new: the
cuts of the ground-truth teacher (the scenes' masks), through `tf hierarchy` on a tiny root."""
from pathlib import Path

from flows.cli import main
from storage.tables import load_runs

TINY = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
GROUND_TRUTH = ["--set", "hierarchy.source=ground_truth"]


def _notes(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "ignored" in record.getMessage()]


def test_cuts_the_ground_truth_teacher_ignores_are_named_and_build_no_store(tmp_path, copy_root, caplog):
    root = copy_root(tmp_path / "root", upstream_only=True)
    assert main(["hierarchy", "--config", TINY, "--root", str(root), *GROUND_TRUTH, "--run-id", "oracle"]) == 0
    teachers = sorted(p.name for p in root.glob("teacher-*"))   # the clustered one and the ground-truth one
    assert len(teachers) == 2
    assert _notes(caplog) == []

    assert main(["hierarchy", "--config", TINY, "--root", str(root), *GROUND_TRUTH,
                 "--set", "hierarchy.cuts=[0.6, 0.3]", "--run-id", "cuts"]) == 0
    (note,) = _notes(caplog)   # one line, a warning of the run (in its logs and on the terminal)
    assert "\n" not in note and note.startswith("config: ignored")
    assert "hierarchy.cuts=[0.6, 0.3]" in note and "hierarchy.source is ground_truth" in note
    assert sorted(p.name for p in root.glob("teacher-*")) == teachers   # no new teacher store
    runs = load_runs(root)
    assert runs[(runs.run_id == "cuts") & (runs.stage == "hierarchy")].status.tolist() == ["reused"]
