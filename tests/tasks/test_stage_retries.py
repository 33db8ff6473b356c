"""Stage tasks retry transient errors only: an I/O hiccup runs the stage again (it resumes from its
markers), while bad input, a missing file, a held lock, a lost Dask cluster, a full disk or a read-only
file system fail at once, a full disk naming the path and the space left."""
import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

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
    (OSError(errno.ENOSPC, "No space left on device"), False),        # issue 31: was retried for 70 s
    (OSError(errno.EDQUOT, "Disk quota exceeded"), False),
    (OSError(errno.EROFS, "Read-only file system"), False),
    (OSError(errno.EACCES, "Permission denied"), False),             # a plain OSError, as zarr may raise it
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


REPO = Path(__file__).parents[2]
FULL_DISK = """
import json, sys, time
from prefect.states import Failed
from storage.config import load_config
from tasks.ingest.stage import ingest_images
from tasks.stage import retry_transient
disk, tree = sys.argv[1], sys.argv[2]
with open(disk + "/filler", "wb", buffering=0) as filler:   # the file system is full before the stage starts
    try:
        while True:
            filler.write(b"x" * 4096)
    except OSError:
        pass
cfg = load_config(None, ["source.kind=imagefolder", "source.path=" + tree, "source.num_images=0",
                         "source.image_size=28", "device=cpu"])
started = time.monotonic()
try:
    ingest_images.fn(cfg, disk + "/root", False)
except Exception as error:
    print(json.dumps({"type": type(error).__name__, "errno": getattr(error, "errno", None), "message": str(error),
                      "retried": retry_transient(None, None, Failed(data=error)),
                      "seconds": time.monotonic() - started}))
"""


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    done = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs a private mount namespace (root with CAP_SYS_ADMIN) for a small tmpfs")
def test_a_full_disk_fails_at_once_naming_the_path_and_the_space_left(tmp_path):
    from PIL import Image

    tree = tmp_path / "src" / "n01"
    tree.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (40, 36), (10 * i, 20, 30)).save(tree / f"{i}.JPEG")
    disk = tmp_path / "disk"
    disk.mkdir()
    # a 256 KiB tmpfs in a mount namespace of the child's own: it vanishes with the child
    script = (f'mount -t tmpfs -o size=256k tmpfs "{disk}" && '
              f'exec "{sys.executable}" -c "$0" "{disk}" "{tree.parent}"')
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, FULL_DISK], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{out['type']} after {out['seconds']:.2f} s: {out['message']}")
    assert out["errno"] == errno.ENOSPC and out["type"] == "StorageFailure"
    assert out["retried"] is False
    assert f"no space left on device: {disk}/root/" in out["message"]
    assert f"free of 256.0 KiB on {disk}" in out["message"]
