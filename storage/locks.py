"""One lock per stage directory, so two runs on one root never write the same store at once.

The lock is `<root>/.locks/<stage folder name>.lock`, held with an exclusive `flock` for as long as
the stage runs. The kernel drops a `flock` when its process dies, so a run killed with SIGKILL can
never block the next one; the file itself stays behind, and its JSON (pid, host, started) lets the
next run say whose lock it took over ("stale lock of PID 123 on this host, process is dead").

A second run either waits (printing once who holds the lock) or fails at once with that holder,
as `concurrency.on_locked` says. Locks rely on `flock`, so they are meant for a local filesystem
(several processes on one host); runs on several hosts sharing NFS need the Prefect server's
concurrency limits instead.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

LOCKS = ".locks"


class StageLocked(RuntimeError):
    """Another live run holds the stage's lock (on_locked: fail, or the wait timed out)."""


def lock_path(stage_dir: Path) -> Path:
    stage_dir = Path(stage_dir)
    return stage_dir.parent / LOCKS / f"{stage_dir.name}.lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def read_holder(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    where = "this host" if holder.get("host") == socket.gethostname() else f"host {holder.get('host')}"
    return f"PID {holder.get('pid')} on {where} (since {holder.get('started')}, {holder.get('command', '?')})"


def _try_lock(path: Path) -> int | None:
    """An fd holding the flock on the file currently at `path`, or None if another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The holder unlinks the file on release; if we locked an unlinked inode, try again.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def stage_lock(stage_dir: Path, on_locked: str = "wait", timeout_s: float = 3600.0, poll_s: float = 0.2,
               log: TextIO | None = None) -> Iterator[dict]:
    """Hold the stage's lock for the `with` body. Yields {'stale': holder dict or None, 'waited_s': ...}."""
    if on_locked not in ("wait", "fail"):
        raise ValueError(f"on_locked must be 'wait' or 'fail', got {on_locked!r}")
    log = log or sys.stderr
    path = lock_path(stage_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    started, announced = time.monotonic(), False
    while (fd := _try_lock(path)) is None:
        holder = read_holder(path)
        if on_locked == "fail":
            raise StageLocked(f"{Path(stage_dir).name} is locked by {describe(holder)}; another run is writing it "
                              f"(set concurrency.on_locked=wait to wait instead). Lock file: {path}")
        if time.monotonic() - started > timeout_s:
            raise StageLocked(f"gave up after {timeout_s:.0f}s waiting for {Path(stage_dir).name}, "
                              f"locked by {describe(holder)}. Lock file: {path}")
        if not announced:
            print(f"waiting for {Path(stage_dir).name}: locked by {describe(holder)}", file=log, flush=True)
            announced = True
        time.sleep(poll_s)
    # A file left with someone else's record means its holder died without releasing it.
    previous = read_holder(path)
    stale = previous if previous and previous.get("pid") != os.getpid() else None
    if stale:
        state = "dead" if stale.get("host") == socket.gethostname() and not pid_alive(int(stale["pid"])) \
            else "gone (lock released by the kernel)"
        print(f"taking over the stale lock of {Path(stage_dir).name}: {describe(stale)}, process is {state}",
              file=log, flush=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": " ".join(sys.argv[:3])[:200]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    try:
        yield {"stale": stale, "waited_s": round(time.monotonic() - started, 3)}
    finally:
        # Unlink while still holding the lock, then close: a waiter that opened the old inode re-checks it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
