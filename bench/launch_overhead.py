"""What starting stages as deployment runs costs: the shipped pipeline deployment on a real Prefect server with
a cpu and a gpu process worker, once with every stage in its own process (`stages_as_deployments: false`) and
once routed (`true`: each stage group a run of its deployment on its pool), each on a fresh root.

    .venv/bin/python bench/launch_overhead.py [--config configs/tiny.yaml] [--repeats 2] [--code DIR]
                                              [--worker-query-s 10]

--code: the checkout whose deployments and workers run (default this one; e.g. an unpacked older commit,
`git archive c46f155 | tar -x -C /tmp/base`, to measure before a change). --worker-query-s: how often the
workers ask for new runs (default: Prefect's own, 10 s, as the README's worker lines leave it).

Figures (bench/results/launch_overhead.json), medians over the repeats; a run's time is its flow run's start
to its end as the server recorded them, its overhead that time less the seconds its stages took (the runs
table's rows), i.e. what is not stage work: checks, imports, starting stage runs and waiting for them. On a
shared machine stage times swing by tens of seconds between runs, so the overheads compare the two modes,
not the totals:
  in_process_s, routed_s                    the pipeline with every stage in its one process / routed
  in_process_overhead_s, routed_overhead_s  their overheads
  launch_overhead_s                         routed_overhead_s - in_process_overhead_s: what routing costs
  child_runs                                stage runs the routed pipeline started
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from bench.results_io import write_result  # noqa: E402
from flows.local_server import final_run, server_with_workers, tails  # noqa: E402


def stage_seconds(root: Path, run_id: str) -> float:
    """Seconds spent inside stages, from the runs table as it was written (either schema: the one before
    issue 32 copied a routed run's stage rows under the pipeline's id; after it, stage rows are kind "stage")."""
    import pandas as pd

    table = pd.read_parquet(root / "tables" / "runs")
    if "kind" in table:
        mine = table[(table.kind == "stage") & ((table.run_id == run_id) | (table.parent_run_id == run_id))]
    else:
        mine = table[table.run_id == run_id]
    return float(mine.duration_s.sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--code", type=Path, default=REPO)
    parser.add_argument("--worker-query-s", type=float, default=None)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    code = args.code.resolve()
    work = Path(tempfile.mkdtemp(prefix="tf-launch-"))
    measured: dict[str, list[dict]] = {"in_process": [], "routed": []}
    with server_with_workers(work, code, worker_query_s=args.worker_query_s) as (env, url, workers, logs):
        os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME")})
        deployed = subprocess.run([sys.executable, "-m", "flows.deploy", "--config", args.config, "--root",
                                   str(work / "unused"), "--source", str(code)], env=env, cwd=code,
                                  capture_output=True, text=True, timeout=300)
        if deployed.returncode:
            raise SystemExit(deployed.stdout + deployed.stderr)
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        with get_client(sync_client=True) as client:
            for repeat in range(args.repeats):
                for name, routed in (("in_process", False), ("routed", True)):
                    root = work / f"{name}-{repeat}"
                    run_id = f"{name}-{repeat}"
                    submitted = run_deployment("pipeline/tf-pipeline", timeout=0, parameters={
                        "config_path": args.config, "root": str(root), "run_id": run_id,
                        "stages_as_deployments": routed})
                    run = final_run(client, submitted.id, workers, list(logs.values()), limit=1800)
                    if not run.state.is_completed():
                        raise SystemExit(f"{name} run {run.state}\n{tails(*logs.values())}")
                    children = [r for r in client.read_flow_runs() if r.parent_task_run_id is not None
                                and r.start_time and run.start_time <= r.start_time <= run.end_time]
                    took = (run.end_time - run.start_time).total_seconds()
                    measured[name].append({"seconds": round(took, 2), "stage_s": round(stage_seconds(root, run_id), 2),
                                           "child_runs": len(children)})
                    print(f"{name} #{repeat}: {took:.1f} s (stages {measured[name][-1]['stage_s']:.1f} s, "
                          f"{len(children)} child runs)", flush=True)
                    time.sleep(1)
    median = {name: statistics.median(r["seconds"] for r in runs) for name, runs in measured.items()}
    over = {name: statistics.median(r["seconds"] - r["stage_s"] for r in runs) for name, runs in measured.items()}
    path = write_result("launch_overhead", {
        "in_process_s": (median["in_process"], "s"), "routed_s": (median["routed"], "s"),
        "in_process_overhead_s": (round(over["in_process"], 2), "s"),
        "routed_overhead_s": (round(over["routed"], 2), "s"),
        "launch_overhead_s": (round(over["routed"] - over["in_process"], 2), "s"),
        "child_runs": (measured["routed"][0]["child_runs"], "runs")},
        {"config": args.config, "code": str(code), "worker_query_s": args.worker_query_s or "prefect default (10)",
         "runs": measured}, folder=args.out)
    print(path.read_text())


if __name__ == "__main__":
    main()
