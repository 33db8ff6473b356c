"""Two runs on one root: the second waits or fails clearly (concurrency.on_locked), and a lock left by a
SIGKILLed run is taken over. Every case uses real processes holding the real lock."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from storage.config import load_config
from storage.keys import Layout
from storage.locks import StageLocked, lock_path, read_holder, stage_lock

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny.yaml"
HOLDER = """
import sys, time
from storage.locks import StageLocked, stage_lock
stage, mode, hold = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    with stage_lock(stage, mode, timeout_s=60, poll_s=0.05):
        print("GOT", time.time(), flush=True)
        if hold == "stdin":   # held until the test writes a line: no race with the other process's start-up
            sys.stdin.readline()
        else:
            time.sleep(float(hold))
except StageLocked as error:
    print(error, file=sys.stderr, flush=True)
    sys.exit(3)
print("RELEASED", time.time(), flush=True)
"""


def holder(stage: Path, mode: str, hold: float | str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(stage), mode, str(hold)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_held(proc: subprocess.Popen) -> float:
    line = proc.stdout.readline()
    assert line.startswith("GOT"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return float(line.split()[1])


def test_second_run_fails_clearly_when_configured_to(tmp_path):
    stage = tmp_path / "images-abc"
    first = holder(stage, "wait", hold=30)
    try:
        wait_held(first)
        second = holder(stage, "fail", hold=0)
        out, err = second.communicate(timeout=60)
        print(f"\nsecond run (on_locked=fail): exit {second.returncode}: {err.strip()}")
        assert second.returncode == 3 and "GOT" not in out
        assert f"images-abc is locked by PID {first.pid} on this host" in err
        assert "concurrency.on_locked=wait" in err
    finally:
        first.kill()
        first.wait()


def test_second_run_waits_with_a_message_then_runs(tmp_path):
    stage = tmp_path / "images-abc"
    # The first run holds the lock until the second has said it waits: a fixed hold would race with the
    # second interpreter's start-up on a loaded machine (it would then find the lock already free).
    first = holder(stage, "wait", hold="stdin")
    wait_held(first)
    second = holder(stage, "wait", hold=0)
    waiting = second.stderr.readline()
    assert f"waiting for images-abc: locked by PID {first.pid} on this host" in waiting, waiting
    assert second.poll() is None   # still waiting: the first holds the lock until told
    out_first, _ = first.communicate("release\n", timeout=60)
    released = float(out_first.split("RELEASED")[1].split()[0])
    out, err = second.communicate(timeout=60)
    print(f"\nsecond run (on_locked=wait): exit {second.returncode}: {waiting.strip()} {err.strip()}")
    assert second.returncode == 0
    got = float(out.split("GOT")[1].split()[0])
    assert got >= released - 0.05   # it ran only after the first let go
    assert not lock_path(stage).exists()   # a clean release leaves no lock file


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    stage = tmp_path / "images-abc"
    first = holder(stage, "wait", hold=30)
    wait_held(first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert read_holder(lock_path(stage))["pid"] == first.pid   # the dead run's record is still there
    second = holder(stage, "fail", hold=0)   # even `fail` proceeds: nobody holds the lock any more
    out, err = second.communicate(timeout=60)
    print(f"\nafter SIGKILL of PID {first.pid}: {err.strip()}")
    assert second.returncode == 0 and "GOT" in out
    assert f"taking over the stale lock of images-abc: PID {first.pid} on this host" in err
    assert "process is dead" in err


def test_ingest_refuses_before_any_work_while_another_run_holds_its_store(tmp_path):
    from tasks.ingest.stage import ingest_images

    cfg = load_config(CONFIG, ["concurrency.on_locked=fail"])
    stage = Layout(tmp_path, cfg).images()
    first = holder(stage, "wait", hold=30)
    try:
        wait_held(first)
        with pytest.raises(StageLocked, match=f"locked by PID {first.pid}"):
            ingest_images.fn(cfg, str(tmp_path))
        assert not stage.exists()   # nothing was written
    finally:
        first.kill()
        first.wait()


def test_lock_in_one_process_is_reentrant_free_and_validates_mode(tmp_path):
    with pytest.raises(ValueError, match="on_locked"):
        with stage_lock(tmp_path / "x", "maybe"):
            pass
    with stage_lock(tmp_path / "x", "fail") as info:
        assert info["stale"] is None
    with stage_lock(tmp_path / "x", "fail"):   # released: can be taken again at once
        pass
