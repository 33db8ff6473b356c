"""A run that fails still leaves its record: the stages it finished, a `failed` row naming the stage and the
error, a Prefect artifact, and a line in `tf status`."""
import pytest

from flows.stages import encode_flow
from flows.status import status_text
from storage.config import load_config
from storage.tables import load_runs

CONFIG = "configs/tiny.yaml"


def test_a_failed_run_leaves_its_row_its_artifact_and_a_status_line(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    root = tmp_path / "r"
    with pytest.raises(Exception) as raised:   # encode before ingest: there is no image store to read
        encode_flow(config=load_config(CONFIG), root=str(root), run_id="broken")
    runs = load_runs(root)
    assert set(runs.run_id) == {"broken"} and list(runs.kind) == ["run", "stage"]   # oldest first: the run, its stage
    total, stage = runs.iloc[0], runs.iloc[1]
    assert (stage.stage, stage.status, total.status) == ("encode", "failed", "failed")
    assert stage.error == total.error == f"{type(raised.value).__name__}: {raised.value}"[:2000] and stage.error
    # the run's total holds the stage's time and the checks before it; times are timestamps that agree
    assert total.duration_s == pytest.approx(stage.duration_s + total.overhead_s, abs=2e-3)
    assert total.started_at <= stage.started_at <= stage.ended_at <= total.ended_at
    assert (total.ended_at - total.started_at).total_seconds() == pytest.approx(total.duration_s, abs=0.05)
    assert "FAILED at encode" in status_text(root, None)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["run-failure"])))
    assert any("broken failed at encode" in (a.data or "") for a in artifacts)


def test_a_refused_config_fails_before_any_stage_and_is_recorded(tmp_path):
    """Every flow checks its config as `tf` does before any stage starts; a refusal is the run's `config`
    stage, so it has its row. A config_path beside a changed inline config is refused, not half-used."""
    from flows.stages import ingest_flow, pipeline_flow

    root = tmp_path / "r"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nencoder:\n  batch_sise: 8\n")
    with pytest.raises(ValueError, match="encoder.batch_sise"):
        ingest_flow(config_path=str(bad), root=str(root), run_id="typo")
    with pytest.raises(ValueError, match="not both"):
        pipeline_flow(config=load_config(CONFIG), config_path=CONFIG, root=str(root), run_id="both")
    runs = load_runs(root)
    stages = runs[runs.kind == "stage"].set_index("run_id")
    assert list(stages.loc[["typo", "both"], "stage"]) == ["config", "config"]
    assert set(runs.status) == {"failed"} and not (root / "tables" / "metrics").exists()
    assert "encoder.batch_sise" in stages.loc["typo", "error"]
    assert list(runs[runs.kind == "run"].run_id) == ["typo", "both"]   # each run's total: failed, with its error
