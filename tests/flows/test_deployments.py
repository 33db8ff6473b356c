"""Deployments (DESIGN §6): every flow deployed, routed to its work pool, scheduled by cron, its config
named by file; prefect.yaml and flows/deploy.py agree; and, end to end, a real server with a cpu and a gpu
process worker runs the shipped pipeline deployment (each stage on its pool), the scheduled evaluation on a
fresh root, and refuses bad configs at once.
"""
from __future__ import annotations

import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from flows.local_server import prefect_command as _prefect

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny.yaml"
POOL_OF = {"ingest": "cpu", "hierarchy": "cpu", "encode": "gpu", "train": "gpu", "judge": "gpu", "evaluate": "gpu",
           "pipeline": "cpu"}   # the pipelines only orchestrate; tf-stages-<pool> runs a pipeline's stages there
CRON_OF = {"tf-evaluate": "0 2 * * *", "tf-pipeline": "0 3 * * 0"}
CONFIG_OF = {"tf-pipeline-imagenet": "configs/imagenet.yaml"}   # the rest: the config deployed with
EXTRA_OF = {"tf-pipeline": {"stages_as_deployments": True}, "tf-pipeline-imagenet": {"stages_as_deployments": True},
            "tf-evaluate": {"score_new": True}}
WORKDIR_STEP = "prefect.deployments.steps.set_working_directory"


def _crons(deployment) -> list[str]:
    return [s.schedule.cron for s in deployment.schedules or []]


def _expected_parameters(name: str, config_path: str, root: str) -> dict:
    return {"config_path": CONFIG_OF.get(name, config_path), "root": root, **EXTRA_OF.get(name, {})}


def _pool(spec) -> str:
    return spec.variant if spec.flow == "stages" else POOL_OF[spec.flow]


def test_every_flow_has_a_deployment_routed_and_scheduled(tmp_path):
    from flows import stages
    from flows.deploy import SPECS, deployments

    assert {s.flow for s in SPECS} == set(stages.FLOWS)
    assert sorted(s.name for s in SPECS) == sorted([f"tf-{f}" for f in stages.FLOWS if f != "stages"] + [
        "tf-pipeline-imagenet", "tf-stages-cpu", "tf-stages-gpu"])
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
        assert pooled[spec.name].work_pool_name == _pool(spec)
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
        assert d["work_pool"]["name"] == spec.pool == _pool(spec)
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


def test_a_routed_pipeline_starts_one_stage_run_per_group_of_its_pool():
    """Consecutive stages of one pool are one stage run: from the pipeline's cpu pool, ingest runs in the
    pipeline and everything after it (the hierarchy too) in one gpu stage run; from a gpu pool, the reverse."""
    from flows.stages import ORDER, stage_groups

    assert stage_groups() == [("cpu", ("ingest",)), ("gpu", ORDER[1:])]


def test_a_stage_run_waits_for_the_stages_before_it_or_stops_when_its_pipeline_ended(tmp_path):
    """What a routed pipeline's stage run waits for: the pipeline's record showing those stages done; it gives
    up with the reason when the pipeline's flow run ended first (failed in one of them)."""
    from flows.report import now, record, run_row, stage_row
    from flows.stages import _wait_for_parent

    def ingest(status: str) -> dict:
        return stage_row("p", "", "pipeline", {"stage": "ingest", "status": status, "started_at": now(),
                                                "ended_at": now(), "duration_s": 1.0}, "", "")

    running = run_row("p", "pipeline", "running", now(), None, 0.0, "", "")
    record(tmp_path, "p", [running])
    ended = iter([None, None, "ended Failed"])   # the pipeline's flow run: running twice, then failed
    reason = _wait_for_parent(str(tmp_path), "p", ["ingest"], lambda: next(ended), poll_s=0)
    assert reason == "pipeline run p ended Failed before ingest could finish"
    record(tmp_path, "p", [running, ingest("failed")])
    assert _wait_for_parent(str(tmp_path), "p", ["ingest"], lambda: "ended Failed", poll_s=0)
    record(tmp_path, "p", [running, ingest("reused")])
    assert _wait_for_parent(str(tmp_path), "p", ["ingest"], lambda: "ended Failed", poll_s=0) is None


# ---------------------------------------------------------------- real server, real worker

def test_shipped_deployments_run_from_prefect_yaml_on_cpu_and_gpu_workers(tmp_path, migrated_prefect_home):
    """The README's deployment section, line by line, on loopback: `prefect server start`, `python -m
    flows.deploy --pools-only`, a worker per pool, `prefect --no-prompt deploy --all` (prefect.yaml as
    shipped). Then the shipped pipeline deployment runs to completion through `prefect deployment run
    --watch`, which shows its stage table, with two of its parameters changed per run to keep this test fast:
    config_path=configs/tiny.yaml (the shipped configs/scenes.yaml takes minutes on 2 cores) and a temporary
    root. It runs ingest itself on the cpu worker and the rest as one stage run of tf-stages-gpu on the gpu
    worker, each stage under a global concurrency limit of one slot; its record is 1 + stages rows with the
    stage run's under the pipeline as parent, its metrics read under its id, its report is an artifact.
    Meanwhile a config with a misspelt field, and the ImageNet deployment on a machine without its weights,
    each fail in under 10 s from their start, naming the field or the file, with a failed-run row at stage
    `config`; and the scheduled evaluation, as its schedule would start it on a fresh root (before any
    pipeline), completes with a `nothing new` row that says it waits for the models. Run again after the
    pipeline, it has nothing new either: the pipeline scored its models."""
    import pandas as pd
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import DEFAULT_CONFIG, SPECS
    from flows.local_server import final_run, kill_run_process, server_with_workers, started, tails
    from flows.stages import ORDER, slot_name, stage_slot
    from storage.config import load_config
    from storage.locks import StageLocked
    from storage.tables import NOTHING_NEW, load_metrics, load_run_config, load_runs, run_summaries

    root, fresh = tmp_path / "root", tmp_path / "fresh"
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs" / "tiny.yaml").read_text() + "hierarchy:\n  cutz: [0.6, 0.3]\n")
    runs = {}
    migrated_prefect_home(tmp_path / "prefect-home")   # the server's home: it starts without migrating
    with ExitStack() as stack:
        env, url, workers, logs = stack.enter_context(server_with_workers(tmp_path, REPO))
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))
        logs = dict(logs, **{name: tmp_path / f"{name}.log" for name in ("deploy-all", "watch")})
        with open(logs["deploy-all"], "w") as out:
            done = subprocess.run(_prefect("--no-prompt", "deploy", "--all"), env=env, cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=240)
        assert done.returncode == 0, tails(logs["deploy-all"])
        client = stack.enter_context(get_client(sync_client=True))
        assert {p.name: p.type for p in client.read_work_pools()} == {"cpu": "process", "gpu": "process"}
        deployed = {}
        for spec in SPECS:
            d = deployed[spec.name] = client.read_deployment_by_name(f"{spec.flow}/{spec.name}")
            assert (d.work_pool_name, _crons(d)) == (spec.pool, [spec.cron] if spec.cron else [])
            assert d.parameters == spec.parameters(DEFAULT_CONFIG, "data") and d.tags == spec.tags
            assert d.pull_steps == [{WORKDIR_STEP: {"directory": str(REPO)}}]
        everything = list(logs.values())
        try:
            watch = stack.enter_context(started(_prefect(
                "deployment", "run", "pipeline/tf-pipeline", "--watch", "--param", "config_path=configs/tiny.yaml",
                "--param", f"root={root}", "--param", "run_id=deployed"), env, logs["watch"], REPO))
            # Refused at once: a misspelt field, and the ImageNet deployment without its weights.
            runs["hierarchy.cutz"] = run_deployment("pipeline/tf-pipeline", timeout=0, parameters={
                "config_path": str(bad), "root": str(root), "run_id": "bad-config"})
            runs["encoder.weights /weights/dinov2_vitb14_reg4.safetensors does not exist"] = run_deployment(
                "pipeline/tf-pipeline-imagenet", timeout=0, parameters={"root": str(root), "run_id": "no-weights"})
            # The nightly evaluation on a fresh root, with the deployment's own parameters but the root.
            runs["nightly"] = run_deployment("evaluate/tf-evaluate", timeout=0, parameters={
                "config_path": "configs/tiny.yaml", "root": str(fresh), "run_id": "nightly"})
            for named, submitted in list(runs.items())[:2]:
                failed = final_run(client, submitted.id, workers, everything, limit=120)
                assert failed.state.is_failed() and named in failed.state.message, failed.state
                took = (failed.end_time - failed.start_time).total_seconds()
                assert took < 10, f"{took:.1f} s from start to failure"
            nightly = final_run(client, runs["nightly"].id, workers, everything, limit=240)
            assert nightly.state.is_completed(), f"{nightly.state}\n{tails(*everything)}"

            deadline = time.monotonic() + 120
            while not (pipeline := [r for r in client.read_flow_runs() if r.parameters.get("run_id") == "deployed"]):
                assert time.monotonic() < deadline and watch.poll() is None, tails(logs["watch"])
                time.sleep(0.5)
            runs["deployed"] = pipeline[0]
            run = final_run(client, pipeline[0].id, workers, everything, limit=480)
            assert run.state.is_completed(), f"{run.state}\n{tails(*everything)}"
            # Again after the pipeline: its models are scored, so nothing new. Started now, it runs on the gpu
            # worker while the checks below read the pipeline's runs and logs.
            runs["nightly-2"] = run_deployment("evaluate/tf-evaluate", timeout=0, parameters={
                "config_path": "configs/tiny.yaml", "root": str(root), "run_id": "nightly-2"})
            assert run.work_pool_name == "cpu"
            assert watch.wait(60) == 0, tails(logs["watch"])
            # The stages ran in one run of tf-stages-gpu, a subflow of the pipeline, on the gpu worker.
            (child,) = [r for r in client.read_flow_runs() if r.parent_task_run_id is not None]
            assert str(child.deployment_id) == str(deployed["tf-stages-gpu"].id) and child.state.is_completed()
            assert child.parameters["stages"] == list(ORDER[1:]) and child.parameters["parent_run_id"] == "deployed"
            assert child.parameters["after"] == ["ingest"]   # started with the pipeline, it waits for ingest
            cpu_log, gpu_log = logs["worker-cpu"].read_text(), logs["worker-gpu"].read_text()
            assert str(child.id) in gpu_log and str(child.id) not in cpu_log
            assert str(run.id) in cpu_log   # the pipeline (and its ingest) on the cpu pool

            again = final_run(client, runs["nightly-2"].id, workers, everything, limit=240)
            assert again.state.is_completed(), f"{again.state}\n{tails(*everything)}"
        finally:
            for submitted in runs.values():
                if not client.read_flow_run(submitted.id).state.is_final():
                    pid = client.read_flow_run(submitted.id).infrastructure_pid
                    if pid and pid.isdigit():
                        kill_run_process(int(pid))
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

    watched = logs["watch"].read_text()   # `prefect deployment run --watch` showed the stage table
    assert "run deployed:" in watched and "(stage run deployed-encode)" in watched and "overhead" in watched
    table = pd.read_parquet(root / "tables" / "runs")   # the runs table reads whole, without the project's code
    mine = table[(table.run_id == "deployed") | (table.parent_run_id == "deployed")]
    stages = mine[mine.kind == "stage"]
    assert len(mine) == 1 + len(stages) and set(stages.status) == {"computed"}
    assert {"ingest", "encode", "hierarchy", "judge", "evaluate"} <= set(stages.stage)
    assert set(stages[stages.stage != "ingest"].run_id.astype(str)) == {"deployed-encode"}
    ingest, encode = (stages[stages.stage == name].iloc[0] for name in ("ingest", "encode"))
    assert ingest.run_id == "deployed" and encode.started_at >= ingest.ended_at   # it waited for ingest
    total = mine[mine.kind == "run"].iloc[0]
    assert total.status == "completed" and total.duration_s == pytest.approx(
        stages.duration_s.sum() + total.overhead_s, abs=2e-3)
    assert len(load_metrics(root, parent_run_id="deployed")) > 0
    assert run_summaries(root).set_index("run_id").loc["deployed", "stage_runs"] == "deployed-encode"
    recorded = load_run_config(root, "deployed")   # the config behind its keys, and its Prefect page
    assert recorded["config"] == load_config(CONFIG).model_dump(mode="json")
    assert recorded["prefect_url"].endswith(f"/runs/flow-run/{run.id}") and recorded["flow_run_id"] == str(run.id)
    records = load_runs(root)
    for run_id, named in (("bad-config", "hierarchy.cutz"), ("no-weights", "encoder.weights")):
        (row,) = records[(records.run_id == run_id) & (records.kind == "stage")].itertuples()
        assert (row.flow, row.stage, row.status) == ("pipeline", "config", "failed") and named in row.error
    for where, run_id, says in ((fresh, "nightly", "waiting for its models"),
                                (root, "nightly-2", "already scored by run deployed-encode")):
        rows = load_runs(where)
        (row,) = rows[(rows.run_id == run_id) & (rows.kind == "stage")].itertuples()
        assert row.status == NOTHING_NEW and says in row.note, row.note
