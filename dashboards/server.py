"""`tf dashboard --root R [--host 127.0.0.1] [--port 8501]`: start the Streamlit server for one root.

The server replaces the `tf` process (exec), so the PID that started it is the server's PID and
stopping that PID stops the dashboard.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

APP = Path(__file__).with_name("app.py")
DEFAULT_HOST = "127.0.0.1"   # loopback only unless asked: the dashboard can write edits under the root
DEFAULT_PORT = 8501


def streamlit_argv(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.address", host, "--server.port", str(port), "--server.headless", "true",
            # no file watcher (it polls the tree and costs CPU) and no usage statistics (offline machines)
            "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
            "--global.developmentMode", "false", "--client.toolbarMode", "minimal"]


def dashboard_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TF_DASHBOARD_ROOT"] = str(Path(root).resolve())
    env.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    # Edits are batches of two trajectories; next to the browser and other work on the same cores, more
    # intra-op threads only spin against each other (measured on 2 busy cores: about 0.3 s per edit with
    # 1 thread, 1.5-6 s with 2). Set TF_DASHBOARD_TORCH_THREADS to change it.
    env.setdefault("TF_DASHBOARD_TORCH_THREADS", "1")
    return env


def serve(root: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """Exec the Streamlit server (does not return when it starts)."""
    argv = streamlit_argv(host, port)
    print(f"tf dashboard: root {Path(root).resolve()} on http://{host}:{port}", flush=True)
    os.execve(argv[0], argv, dashboard_env(root))
    return 0  # unreachable; keeps the CLI's return type
