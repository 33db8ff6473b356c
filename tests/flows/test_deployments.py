"""Deployments (DESIGN §6): every flow deployed, routed to its work pool, scheduled by cron, its config
named by file; prefect.yaml and flows/deploy.py agree; and, end to end, a real server with a cpu and a gpu
process worker runs the shipped pipeline deployment (each stage on its pool) and refuses bad configs at once.
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

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny.yaml"
POOL_OF = {"ingest": "cpu", "hierarchy": "cpu", "encode": "gpu", "train": "gpu", "judge": "gpu", "evaluate": "gpu",
           "pipeline": "cpu"}   # the pipelines only orchestrate: each stage runs on its own deployment's pool
CRON_OF = {"tf-evaluate": "0 2 * * *", "tf-pipeline": "0 3 * * 0"}
CONFIG_OF = {"tf-pipeline-imagenet": "configs/imagenet.yaml"}   # the rest: the config deployed with
ROUTED = {"tf-pipeline", "tf-pipeline-imagenet"}
WORKDIR_STEP = "prefect.deployments.steps.set_working_directory"


def _crons(deployment) -> list[str]:
    return [s.schedule.cron for s in deployment.schedules or []]


def _expected_parameters(name: str, config_path: str, root: str) -> dict:
    return {"config_path": CONFIG_OF.get(name, config_path), "root": root,
            **({"stages_as_deployments": True} if name in ROUTED else {})}


def test_every_flow_has_a_deployment_routed_and_scheduled(tmp_path):
    from flows import stages
    from flows.deploy import SPECS, deployments

    assert {s.flow for s in SPECS} == set(stages.FLOWS)
    assert sorted(s.name for s in SPECS) == sorted([f"tf-{f}" for f in stages.FLOWS] + ["tf-pipeline-imagenet"])
    pooled = {d.name: d for d in deployments(CONFIG, str(tmp_path), for_pools=True)}
    served = {d.name: d for d in deployments(CONFIG, str(tmp_path), for_pools=False)}
    assert set(pooled) == set(served) == {s.name for s in SPECS}
    for spec in SPECS:
        for d in (pooled[spec.name], served[spec.name]):
            assert d.flow_name == spec.flow
            assert _crons(d) == ([CRON_OF[spec.name]] if spec.name in CRON_OF else [])
            # the config by file, relative to the repository (where workers run the code)
            assert d.parameters == _expected_parameters(spec.name, "configs/tiny.yaml", str(tmp_path))
            assert "tf" in d.tags and spec.flow in d.tags and d.description
        file, attr = pooled[spec.name].entrypoint.split(":")
        assert file == "flows/stages.py" and getattr(stages, attr) is stages.FLOWS[spec.flow]
        assert pooled[spec.name].work_pool_name == POOL_OF[spec.flow]
        assert pooled[spec.name].storage.to_pull_step() == {WORKDIR_STEP: {"directory": str(REPO)}}
        assert served[spec.name].work_pool_name is None
    imagenet = next(s for s in SPECS if s.name == "tf-pipeline-imagenet")
    assert imagenet.cron is None and "/weights/dinov2_vitb14_reg4.safetensors" in imagenet.description


def test_prefect_yaml_agrees_with_deploy_py():
    from flows.deploy import DEFAULT_CONFIG, SPECS

    data = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in data["deployments"]}
    assert set(by_name) == {s.name for s in SPECS}
    for spec in SPECS:
        d = by_name[spec.name]
        assert d["entrypoint"] == spec.entrypoint
        assert d["work_pool"]["name"] == spec.pool == POOL_OF[spec.flow]
        assert [s["cron"] for s in d.get("schedules") or []] == ([spec.cron] if spec.cron else [])
        assert d["tags"] == spec.tags and d["description"] == spec.description
        assert d["parameters"] == spec.parameters(DEFAULT_CONFIG, "data") == _expected_parameters(
            spec.name, "configs/scenes.yaml", "data")
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


def _final(client, flow_run_id, workers: list, logs: list[Path], limit: float):
    """The flow run once it is final, checking the workers stay up meanwhile."""
    deadline = time.monotonic() + limit
    while not (run := client.read_flow_run(flow_run_id)).state.is_final():
        for worker in workers:
            assert worker.poll() is None, _tails(*logs)
        assert time.monotonic() < deadline, f"run still {run.state}\n{_tails(*logs)}"
        time.sleep(0.5)
    return run


def test_shipped_deployments_run_from_prefect_yaml_on_cpu_and_gpu_workers(tmp_path):
    """The README's deployment section, line by line, on loopback: `prefect server start`, `python -m
    flows.deploy --pools-only`, a worker per pool, `prefect --no-prompt deploy --all` (prefect.yaml as
    shipped). Then the shipped pipeline deployment runs to completion, with two of its parameters changed
    per run to keep this test fast: config_path=configs/tiny.yaml (the shipped configs/scenes.yaml takes
    minutes on 2 cores) and a temporary root. Its stages run as deployment runs on their pools (ingest on
    the cpu worker, encode on the gpu worker), each under a global concurrency limit of one slot; its rows
    are in the runs table and its report is an artifact. Meanwhile a config with a misspelt field, and the
    ImageNet deployment on a machine without its weights, each fail in under 10 s from their start, naming
    the field or the file, with a failed-run row at stage `config`."""
    import pandas as pd
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import DEFAULT_CONFIG, SPECS
    from flows.stages import ROUTED, slot_name, stage_slot
    from storage.config import load_config
    from storage.locks import StageLocked
    from storage.tables import load_metrics, load_runs

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    root = tmp_path / "root"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_LOGGING_LEVEL="INFO")
    logs = {n: tmp_path / f"{n}.log" for n in ("server", "pools", "deploy-all", "worker-cpu", "worker-gpu")}

    def step(name: str, command: list[str]) -> None:
        with open(logs[name], "w") as out:
            done = subprocess.run(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=240)
        assert done.returncode == 0, _tails(logs[name])

    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs" / "tiny.yaml").read_text() + "hierarchy:\n  cutz: [0.6, 0.3]\n")
    runs = {}
    with ExitStack() as stack, temporary_settings(updates={PREFECT_API_URL: url}):
        server = stack.enter_context(_started(
            _prefect("server", "start", "--host", "127.0.0.1", "--port", str(port)), env, logs["server"], tmp_path))
        _wait_healthy(url, server, logs["server"])
        step("pools", [sys.executable, "-m", "flows.deploy", "--pools-only"])
        workers = [stack.enter_context(_started(
            _prefect("worker", "start", "--pool", pool, "--name", f"tf-test-{pool}"), env, logs[f"worker-{pool}"],
            tmp_path)) for pool in ("cpu", "gpu")]
        step("deploy-all", _prefect("--no-prompt", "deploy", "--all"))
        client = stack.enter_context(get_client(sync_client=True))
        assert {p.name: p.type for p in client.read_work_pools()} == {"cpu": "process", "gpu": "process"}
        deployed = {}
        for spec in SPECS:
            d = deployed[spec.name] = client.read_deployment_by_name(f"{spec.flow}/{spec.name}")
            assert (d.work_pool_name, _crons(d)) == (spec.pool, [spec.cron] if spec.cron else [])
            assert d.parameters == spec.parameters(DEFAULT_CONFIG, "data") and d.tags == spec.tags
            assert d.pull_steps == [{WORKDIR_STEP: {"directory": str(REPO)}}]
        try:
            runs["deployed"] = run_deployment("pipeline/tf-pipeline", timeout=0, parameters={
                "config_path": "configs/tiny.yaml", "root": str(root), "run_id": "deployed"})
            # Refused at once: a misspelt field, and the ImageNet deployment without its weights.
            runs["hierarchy.cutz"] = run_deployment("pipeline/tf-pipeline", timeout=0, parameters={
                "config_path": str(bad), "root": str(root), "run_id": "bad-config"})
            runs["encoder.weights /weights/dinov2_vitb14_reg4.safetensors does not exist"] = run_deployment(
                "pipeline/tf-pipeline-imagenet", timeout=0, parameters={"root": str(root), "run_id": "no-weights"})
            for named, submitted in list(runs.items())[1:]:
                failed = _final(client, submitted.id, workers, list(logs.values()), limit=120)
                assert failed.state.is_failed() and named in failed.state.message, failed.state
                took = (failed.end_time - failed.start_time).total_seconds()
                assert took < 10, f"{took:.1f} s from start to failure"

            run = _final(client, runs["deployed"].id, workers, list(logs.values()), limit=480)
            assert run.state.is_completed(), f"{run.state}\n{_tails(*logs.values())}"
            assert run.work_pool_name == "cpu"
            # Each stage ran as a run of its deployment, a subflow of the pipeline, on its pool's worker.
            children = {str(r.deployment_id): r for r in client.read_flow_runs()   # not the scheduled ones
                        if r.parent_task_run_id is not None}
            cpu_log, gpu_log = logs["worker-cpu"].read_text(), logs["worker-gpu"].read_text()
            for stage in ROUTED:
                child = children[str(deployed[f"tf-{stage}"].id)]
                assert child.state.is_completed() and child.work_pool_name == POOL_OF[stage], stage
                on, off = (cpu_log, gpu_log) if POOL_OF[stage] == "cpu" else (gpu_log, cpu_log)
                assert str(child.id) in on and str(child.id) not in off, stage
            assert str(run.id) in cpu_log   # the pipeline itself only orchestrates, from the cpu pool
        finally:
            for submitted in runs.values():
                if not client.read_flow_run(submitted.id).state.is_final():
                    pid = client.read_flow_run(submitted.id).infrastructure_pid
                    if pid and pid.isdigit():
                        _kill_run_process(int(pid))
        reports = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        assert any(a.key == "run-report" for a in reports)

        # Every stage ran under its root's global limit, which admits one holder at a time.
        limits = {limit.name: limit.limit for limit in client.read_global_concurrency_limits(limit=100)}
        assert all(limits[slot_name(str(root), stage)] == 1 for stage in ("ingest", "encode", "hierarchy", "evaluate"))
        failing = load_config(CONFIG, ["concurrency.on_locked=fail"])

        @flow
        def second_writer():
            with stage_slot(str(root), "encode", failing):
                try:
                    with stage_slot(str(root), "encode", failing):
                        return "entered twice"
                except StageLocked as error:
                    return str(error)

        assert slot_name(str(root), "encode") in second_writer()

    table = pd.read_parquet(root / "tables" / "runs")   # the runs table reads whole, without the project's code
    pipeline = table[table.run_id == "deployed"]
    assert set(pipeline.status) == {"computed"} and {"ingest", "encode", "hierarchy", "evaluate"} <= set(pipeline.stage)
    for stage in ROUTED:   # each stage run's own record, under <run>-<stage>
        assert (table.run_id == f"deployed-{stage}").any(), stage
    assert len(load_metrics(root, run_id="deployed-evaluate")) > 0
    records = load_runs(root)
    for run_id, named in (("bad-config", "hierarchy.cutz"), ("no-weights", "encoder.weights")):
        (row,) = records[records.run_id == run_id].itertuples()
        assert (row.flow, row.stage, row.status) == ("pipeline", "config", "failed") and named in row.error
