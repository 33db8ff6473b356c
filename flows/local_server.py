"""A Prefect server and its workers on loopback, started and stopped by PID: what the deployment test and
bench/launch_overhead.py run (the README's "Prefect server with cpu and gpu workers" lines, on a free port
with their own PREFECT_HOME, so nothing of the user's Prefect is touched).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


# The server streams flow run logs to `prefect deployment run --watch` only with these on (Prefect's default is
# off: --watch then shows state events and no log line, the stage table included).
LOG_STREAM = {"PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true", "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def server_env(home: Path, port: int, worker_query_s: float | None = 1) -> dict[str, str]:
    """The environment of the server, its workers and its clients. worker_query_s: how often a worker asks
    for new runs (Prefect's default, 10 s, when None)."""
    # No scheduler: the deployments keep their schedules, but a test or bench that spans 02:00 UTC (or Sunday
    # 03:00) would otherwise start tf-evaluate (tf-pipeline) with their default root, the checkout's ./data.
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO",
               PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false", **LOG_STREAM)
    if worker_query_s is not None:
        env["PREFECT_WORKER_QUERY_SECONDS"] = str(worker_query_s)
    return env


def tails(*logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in logs if p.exists())


@contextmanager
def started(cmd: list[str], env: dict, log: Path, cwd: Path):
    """A child in its own process group, stopped by its pid on exit (SIGINT, SIGTERM, SIGKILL)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left in its group
        except ProcessLookupError:
            pass


def kill_run_process(pid: int) -> None:
    """An unfinished flow run's process (the worker may have started it in its own session)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_answers(url: str, process: subprocess.Popen, what: str, timeout: float, poll_s: float = 0.5) -> None:
    """Until GET `url` answers 200 (TimeoutError after `timeout` s), failing at once if `process` exits; `what`
    names it in the errors, e.g. with the tail of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{what} did not answer {url} in {timeout:.0f} s")


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    try:
        wait_answers(f"{url}/health", server, "prefect server", timeout, poll_s=1)
    except (RuntimeError, TimeoutError) as error:
        raise type(error)(f"{error}:\n{log.read_text()[-3000:]}") from None


def final_run(client, flow_run_id, workers: list, logs: list[Path], limit: float):
    """The flow run once it is final, checking the workers stay up meanwhile."""
    deadline = time.monotonic() + limit
    while not (run := client.read_flow_run(flow_run_id)).state.is_final():
        for worker in workers:
            if worker.poll() is not None:
                raise RuntimeError(f"a worker exited\n{tails(*logs)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"run still {run.state} after {limit:.0f} s\n{tails(*logs)}")
        time.sleep(0.5)
    return run


@contextmanager
def server_with_workers(folder: Path, code: Path, pools: tuple[str, ...] = ("cpu", "gpu"),
                        worker_query_s: float | None = 1):
    """`prefect server start` on a free loopback port, the work pools (python -m flows.deploy --pools-only, run
    in `code`) and one process worker per pool, all run from `code` and logged under `folder`; yields
    (env, url, workers, logs). Everything is stopped by its PID on exit."""
    from contextlib import ExitStack

    port = free_port()
    env = server_env(folder / "prefect-home", port, worker_query_s)
    url = env["PREFECT_API_URL"]
    logs = {name: folder / f"{name}.log" for name in ("server", "pools", *(f"worker-{p}" for p in pools))}
    with ExitStack() as stack:
        server = stack.enter_context(started(
            prefect_command("server", "start", "--host", "127.0.0.1", "--port", str(port)), env, logs["server"],
            folder))
        wait_healthy(url, server, logs["server"])
        with open(logs["pools"], "w") as out:
            done = subprocess.run([sys.executable, "-m", "flows.deploy", "--pools-only"], env=env, cwd=code,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=240)
        if done.returncode:
            raise RuntimeError(tails(logs["pools"]))
        workers = [stack.enter_context(started(
            prefect_command("worker", "start", "--pool", pool, "--name", f"tf-{pool}-{port}"), env,
            logs[f"worker-{pool}"], folder)) for pool in pools]
        yield env, url, workers, logs
