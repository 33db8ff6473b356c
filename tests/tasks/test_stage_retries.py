"""Stage tasks retry transient errors only: an I/O hiccup runs the stage again (it resumes from its
markers), while bad input, a missing file, a held lock or a lost Dask cluster fail at once."""
import errno

import pytest
from prefect import flow, task
from prefect.states import Failed

from storage.locks import StageLocked
from tasks.dask_chunks import NoWorkers
from tasks.stage import STAGE_RETRIES, is_transient, retry_transient


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.EIO, "Input/output error"), True),
    (TimeoutError("read timed out"), True),
    (ConnectionResetError("peer reset"), True),
    (FileNotFoundError(errno.ENOENT, "missing", "/x/weights.safetensors"), False),
    (PermissionError(errno.EACCES, "denied"), False),
    (ValueError("hierarchy.cuts must be in [0, 1]"), False),
    (StageLocked("teacher-abc is locked by host:1"), False),
    (NoWorkers("no Dask worker left on scheduler tcp://127.0.0.1:8786"), False),
])
def test_only_transient_errors_are_retried(error, expected):
    assert is_transient(error) is expected
    assert retry_transient(None, None, Failed(data=error)) is expected


def test_a_stage_task_runs_again_after_an_io_error_and_not_after_a_value_error():
    calls = {"io": 0, "value": 0}
    fast = {**STAGE_RETRIES, "retry_delay_seconds": 0}

    @task(**fast)
    def flaky_io() -> str:
        calls["io"] += 1
        if calls["io"] == 1:
            raise OSError(errno.EIO, "Input/output error")
        return "done"

    @task(**fast)
    def bad_input() -> None:
        calls["value"] += 1
        raise ValueError("bad config")

    @flow
    def stages() -> str:
        out = flaky_io()
        with pytest.raises(ValueError):
            bad_input()
        return out

    assert stages() == "done"
    assert calls == {"io": 2, "value": 1}
