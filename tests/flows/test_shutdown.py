"""SIGTERM to `tf pipeline` mid-run: the process ends, and so do the ephemeral Prefect server and the
local Dask cluster it started (Python's default SIGTERM would end the process alone and leave them)."""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def test_sigterm_stops_the_run_with_its_prefect_server_and_dask_cluster(tmp_path, migrated_prefect_home):
    home = migrated_prefect_home(tmp_path / "prefect")   # its server starts without migrating a new database
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "INFO"}   # the server's port is in an INFO line
    command = [sys.executable, "-m", "flows.cli", "pipeline", "--config", str(REPO / "configs" / "tiny.yaml"),
               "--root", str(tmp_path / "root")]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline, port, children = time.monotonic() + 120, None, []
        while time.monotonic() < deadline and proc.poll() is None:
            text = "".join(lines)
            found = re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", text)
            port = int(found.group(1)) if found else None
            children = psutil.Process(proc.pid).children(recursive=True)
            # mid-run: the server is up and a stage's Dask cluster is running (server + workers)
            if port and len(children) >= 3:
                break
            time.sleep(0.2)
        assert port and proc.poll() is None, "".join(lines)[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) != 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
        with socket.socket() as sock:   # nothing listens on the server's port any more
            assert sock.connect_ex(("127.0.0.1", port)) != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        print("".join(lines)[-3000:])
