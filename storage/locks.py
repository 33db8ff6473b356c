"""One lock per stage directory, so two runs on one root never write the same store at once.

The lock is `<root>/.locks/<stage folder name>.lock`, held with an exclusive `flock` for as long as
the stage runs. The kernel drops a `flock` when its process dies, so a run killed with SIGKILL can
never block the next one; the file itself stays behind, and its JSON (pid, host, started) lets the
next run say whose lock it took over ("stale lock of PID 123 on this host, process is dead").

A stage that reads a store holds that store's lock shared (`shared=True`) while it runs: readers share
it, and a run that writes the store (a forced rebuild) waits for every reader to finish, or fails at
once naming them. Readers leave their record in `<lock>.readers/` (the lock file itself holds the
writer's), so a waiting writer can say who reads.

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
import uuid
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


def readers_folder(path: Path) -> Path:
    return Path(f"{path}.readers")


def live_readers(path: Path) -> list[dict]:
    """The records of the processes reading the store of lock `path` (dead ones on this host left out)."""
    folder = readers_folder(path)
    records = [read_holder(p) for p in sorted(folder.glob("*.json"))] if folder.exists() else []
    here = socket.gethostname()
    return [r for r in records if r and (r.get("host") != here or pid_alive(int(r.get("pid", 0))))]


def describe_holders(path: Path) -> str:
    """Who holds lock `path`: its writer, else the processes reading that store."""
    writer = read_holder(path)
    here = socket.gethostname()
    if writer and (writer.get("host") != here or pid_alive(int(writer.get("pid", 0)))):
        return describe(writer)
    readers = live_readers(path)
    if not readers:
        return describe({})
    more = f" and {len(readers) - 2} more" if len(readers) > 2 else ""
    return "readers " + "; ".join(describe(r) for r in readers[:2]) + more


def _record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv[:3])[:200]}


def _try_lock(path: Path, shared: bool = False) -> int | None:
    """An fd holding the flock (shared or exclusive) on the file currently at `path`, or None if another
    process holds it in a mode that excludes this one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
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
               log: TextIO | None = None, shared: bool = False) -> Iterator[dict]:
    """Hold the stage's lock for the `with` body: exclusive to write the store, `shared` to read it.
    Yields {'stale': holder dict or None, 'waited_s': ...}."""
    if on_locked not in ("wait", "fail"):
        raise ValueError(f"on_locked must be 'wait' or 'fail', got {on_locked!r}")
    log = log or sys.stderr
    path = lock_path(stage_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    name, doing = Path(stage_dir).name, ("read" if shared else "written")
    started, announced = time.monotonic(), False
    while (fd := _try_lock(path, shared)) is None:
        holders = describe_holders(path)
        if on_locked == "fail":
            raise StageLocked(f"{name} is locked by {holders}; it cannot be {doing} while that run "
                              f"{'writes' if shared else 'uses'} it (set concurrency.on_locked=wait to wait "
                              f"instead). Lock file: {path}")
        if time.monotonic() - started > timeout_s:
            raise StageLocked(f"gave up after {timeout_s:.0f}s waiting for {name}, locked by {holders}. "
                              f"Lock file: {path}")
        if not announced:
            print(f"waiting for {name}: locked by {holders}", file=log, flush=True)
            announced = True
        time.sleep(poll_s)
    waited = round(time.monotonic() - started, 3)
    if shared:
        with _reading(path, fd):
            yield {"stale": None, "waited_s": waited}
        return
    # A file left with someone else's record means its holder died without releasing it.
    previous = read_holder(path)
    stale = previous if previous and previous.get("pid") != os.getpid() else None
    if stale:
        state = "dead" if stale.get("host") == socket.gethostname() and not pid_alive(int(stale["pid"])) \
            else "gone (lock released by the kernel)"
        print(f"taking over the stale lock of {name}: {describe(stale)}, process is {state}",
              file=log, flush=True)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_record()).encode(), 0)
        os.fsync(fd)
    except OSError as error:   # a full disk: nothing is held, and the message names the file
        os.close(fd)
        error.filename = error.filename or str(path)
        raise
    try:
        yield {"stale": stale, "waited_s": waited}
    finally:
        # Unlink while still holding the lock, then close: a waiter that opened the old inode re-checks it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def _reading(path: Path, fd: int) -> Iterator[None]:
    """A reader's stay: its record in the readers folder (for a writer's message), the shared lock on fd.
    The lock file stays: other readers may hold it, and the next writer removes it."""
    record = readers_folder(path) / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}.json"
    try:
        record.parent.mkdir(exist_ok=True)
        record.write_text(json.dumps(_record()))
    except OSError:   # the record only names readers in a message; reading goes on without it
        pass
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            record.unlink()
        os.close(fd)
