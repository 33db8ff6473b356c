"""Running Triton kernels on CPU through Triton's interpreter, for the kernel tests.

TRITON_INTERPRET=1 must be set before triton.language is first imported, and the pytest process
has usually imported it already, so the checks run in a subprocess: `run_interpreted` starts it
and reads the JSON object it prints last; `run_checks` is such a script's main (check name ->
"ok" or the failure's traceback). This module imports neither torch nor triton.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(args: list[str], timeout: int = 300) -> dict:
    """`python <args>` with TRITON_INTERPRET=1 from the repository root; its last stdout line as JSON."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_checks(checks: dict[str, Callable[[], None]]) -> None:
    """Runs the checks named on the command line (default: all) and prints name -> "ok" | traceback."""
    import torch

    torch.set_num_threads(1)
    results = {}
    for name in sys.argv[1:] or checks:
        try:
            checks[name]()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    print(json.dumps(results))
