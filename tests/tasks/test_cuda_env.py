"""tasks sets CUDA_DEVICE_MAX_CONNECTIONS before any CUDA context exists, and keeps a user's value."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _after_import(value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    if value is not None:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = value
    done = subprocess.run([sys.executable, "-c", "import os, tasks; print(os.environ['CUDA_DEVICE_MAX_CONNECTIONS'])"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_tasks_package_asks_for_32_hardware_queues_unless_the_user_chose():
    assert _after_import(None) == "32"
    assert _after_import("8") == "8"
