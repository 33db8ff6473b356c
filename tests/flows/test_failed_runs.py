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
    assert list(runs.run_id) == ["broken"] and list(runs.status) == ["failed"] and list(runs.stage) == ["encode"]
    assert runs.error.iloc[0] == f"{type(raised.value).__name__}: {raised.value}"[:2000] and runs.error.iloc[0]
    assert "FAILED at encode" in status_text(root, None)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["run-failure"])))
    assert any("broken failed at encode" in (a.data or "") for a in artifacts)
