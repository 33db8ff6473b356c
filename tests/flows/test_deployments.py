"""Deployments (DESIGN §6): every flow deployed, routed to its work pool, scheduled by cron;
prefect.yaml and flows/deploy.py agree; and, end to end, a real server + process worker runs
the tiny pipeline from its deployment.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import yaml

from storage.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny.yaml"
POOL_OF = {"ingest": "cpu", "hierarchy": "cpu", "encode": "gpu", "train": "gpu", "judge": "gpu", "evaluate": "gpu",
           "pipeline": "gpu"}
CRON_OF = {"evaluate": "0 2 * * *", "pipeline": "0 3 * * 0"}
WORKDIR_STEP = "prefect.deployments.steps.set_working_directory"


def _crons(deployment) -> list[str]:
    return [s.schedule.cron for s in deployment.schedules or []]


def test_every_flow_has_a_deployment_routed_and_scheduled(tmp_path):
    from flows import stages
    from flows.deploy import SPECS, deployments

    assert sorted(s.flow for s in SPECS) == sorted(stages.FLOWS)
    pooled = {d.flow_name: d for d in deployments(CONFIG, str(tmp_path), for_pools=True)}
    served = {d.flow_name: d for d in deployments(CONFIG, str(tmp_path), for_pools=False)}
    assert set(pooled) == set(served) == set(stages.FLOWS)
    config = load_config(CONFIG).model_dump(mode="json")
    for name, flow in stages.FLOWS.items():
        for d in (pooled[name], served[name]):
            assert d.name == f"tf-{name}"
            assert _crons(d) == ([CRON_OF[name]] if name in CRON_OF else [])
            assert d.parameters == {"config": config, "root": str(tmp_path)}
            assert "tf" in d.tags and name in d.tags and d.description
        file, attr = pooled[name].entrypoint.split(":")
        assert file == "flows/stages.py" and getattr(stages, attr) is flow
        assert pooled[name].work_pool_name == POOL_OF[name]
        assert pooled[name].storage.to_pull_step() == {WORKDIR_STEP: {"directory": str(REPO)}}
        assert served[name].work_pool_name is None


def test_prefect_yaml_agrees_with_deploy_py():
    from flows.deploy import SPECS

    data = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in data["deployments"]}
    assert set(by_name) == {s.name for s in SPECS}
    for spec in SPECS:
        d = by_name[spec.name]
        assert d["entrypoint"] == spec.entrypoint
        assert d["work_pool"]["name"] == spec.pool == POOL_OF[spec.flow]
        assert [s["cron"] for s in d.get("schedules") or []] == ([spec.cron] if spec.cron else [])
        assert d["tags"] == spec.tags and d["description"] == spec.description
        assert d["parameters"] == {"root": "data"}
    # pull: change into the directory `prefect deploy` ran in (a build step records it).
    (step,) = data["pull"]
    (build,) = data["build"]
    shell = build["prefect.deployments.steps.run_shell_script"]
    assert shell["script"] == "pwd"
    assert step[WORKDIR_STEP]["directory"] == "{{ %s.stdout }}" % shell["id"]


def test_serve_serves_every_deployment_without_pools(monkeypatch, tmp_path):
    import prefect

    from flows import deploy

    served = []
    monkeypatch.setattr(prefect, "serve", lambda *ds, **kw: served.extend(ds))
    deploy.serve(str(CONFIG), str(tmp_path))
    assert sorted(d.name for d in served) == sorted(s.name for s in deploy.SPECS)
    assert all(d.work_pool_name is None for d in served)


def test_deploy_cli_needs_a_server(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["--config", str(CONFIG)]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err


# ---------------------------------------------------------------- real server, real worker

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


@contextmanager
def _started(cmd: list[str], env: dict, log: Path, cwd: Path):
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


def _kill_run_process(pid: int) -> None:
    """An unfinished flow run's process (the worker may have started it in its own session)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"prefect server not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _tails(*logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in logs if p.exists())


def test_tiny_pipeline_runs_from_its_deployment_on_a_process_worker(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import SPECS, deploy_to_pools
    from storage.tables import load_metrics

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    root = tmp_path / "root"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_LOGGING_LEVEL="INFO")
    logs = [tmp_path / n for n in ("server.log", "worker.log", "deploy-all.log")]
    run = None
    with ExitStack() as stack, temporary_settings(updates={PREFECT_API_URL: url}):
        server = stack.enter_context(_started(
            _prefect("server", "start", "--host", "127.0.0.1", "--port", str(port)), env, logs[0], tmp_path))
        _wait_healthy(url, server, logs[0])

        ids = deploy_to_pools(str(CONFIG), str(root), str(REPO))  # also creates the pools
        assert set(ids) == {f"{s.flow}/{s.name}" for s in SPECS}
        client = stack.enter_context(get_client(sync_client=True))
        assert {p.name: p.type for p in client.read_work_pools()} == {"cpu": "process", "gpu": "process"}
        for spec in SPECS:
            d = client.read_deployment_by_name(f"{spec.flow}/{spec.name}")
            assert (d.work_pool_name, _crons(d)) == (spec.pool, [spec.cron] if spec.cron else [])
            assert d.parameters["root"] == str(root) and d.parameters["config"]["name"] == "tiny"
            assert d.pull_steps == [{WORKDIR_STEP: {"directory": str(REPO)}}]

        worker = stack.enter_context(_started(
            _prefect("worker", "start", "--pool", "gpu", "--name", "tf-test-gpu"), env, logs[1], tmp_path))
        try:
            run = run_deployment("pipeline/tf-pipeline", parameters={"run_id": "deployed"}, timeout=0)
            # While the run goes: `prefect deploy --all` from prefect.yaml must register the same
            # deployments (it overwrites their defaults; the submitted run keeps its own).
            with open(logs[2], "w") as out:
                done = subprocess.run(_prefect("--no-prompt", "deploy", "--all"), env=env, cwd=REPO,
                                      stdout=out, stderr=subprocess.STDOUT, timeout=240)
            assert done.returncode == 0, _tails(logs[2])
            for spec in SPECS:
                d = client.read_deployment_by_name(f"{spec.flow}/{spec.name}")
                assert (d.work_pool_name, _crons(d)) == (spec.pool, [spec.cron] if spec.cron else [])
                assert d.parameters == {"root": "data"} and d.tags == spec.tags
                assert d.pull_steps == [{WORKDIR_STEP: {"directory": str(REPO)}}]

            deadline = time.monotonic() + 420
            while not (run := client.read_flow_run(run.id)).state.is_final():
                assert worker.poll() is None, _tails(logs[1])
                assert time.monotonic() < deadline, f"run still {run.state}\n{_tails(logs[1])}"
                time.sleep(2)
            assert run.state.is_completed(), f"{run.state}\n{_tails(logs[1])}"
        finally:
            if run is not None and not client.read_flow_run(run.id).state.is_final():
                pid = client.read_flow_run(run.id).infrastructure_pid
                if pid and pid.isdigit():
                    _kill_run_process(int(pid))
    metrics = load_metrics(root, run_id="deployed")
    assert len(metrics) > 0
