"""What the scheduled evaluation (tf-evaluate, `score_new`) scores: what changed since its last run.

The candidates are the deployment's config and the config of every run since the last scheduled evaluation
began that computed a train stage (from the _run.json beside its report). Each candidate's evaluation is
- due: its models are complete and its evaluation is not (new models, a metric added, an evaluation setting
  changed): the evaluation scores it;
- nothing new: already scored (the row names the run that scored it), or its models are not trained yet.
  Then it waits: an evaluation never trains, the pipeline does, on its own schedule. So on a fresh root, where
  the nightly evaluation may fire before the weekly pipeline, it records "nothing new" and completes.
"""
from __future__ import annotations

import time

import pandas as pd

from flows.report import now
from flows.status import expected_stages
from storage import zarr_store
from storage.config import TFConfig
from storage.tables import NOTHING_NEW, load_run_config, load_runs
from tasks import plan


def last_scheduled_start(runs: pd.DataFrame, root: str, current: str) -> pd.Timestamp | None:
    """When the last scheduled evaluation before `current` began (None: this is the first)."""
    evaluations = runs[(runs.kind == "run") & (runs.flow == "evaluate") & (runs.run_id != current)]
    began = [row.started_at for row in evaluations.itertuples()
             if load_run_config(root, row.run_id).get("parameters", {}).get("score_new")]
    return max(began) if began else None


def candidates(root: str, config: TFConfig, current: str) -> list[TFConfig]:
    """The deployment's config, then those of the runs since the last scheduled evaluation that trained."""
    runs = load_runs(root)
    since = last_scheduled_start(runs, root, current)
    trained = runs[(runs.kind == "stage") & (runs.status == "computed") & runs.stage.str.startswith("train")]
    if since is not None:
        trained = trained[trained.started_at >= since]
    found = [config]
    for run_id in dict.fromkeys(trained.run_id):
        recorded = load_run_config(root, run_id).get("config")
        if recorded:
            found.append(TFConfig.model_validate(recorded))
    return found


def due_evaluations(root: str, config: TFConfig, current: str) -> tuple[list[TFConfig], list[dict]]:
    """(the configs whose evaluation is due, one `nothing new` result for each other candidate), one per
    evaluation folder."""
    due, idle, seen = [], [], set()
    for candidate in candidates(root, config, current):
        began, clock = now(), time.monotonic()
        folder, key = plan.layout(root, candidate).mode_evaluation()
        if folder in seen:
            continue
        seen.add(folder)
        states = {s["stage"]: s["state"] for s in expected_stages(root, candidate)}
        waiting = [stage for stage, state in states.items() if stage.startswith("train") and state != "up to date"]
        if states["evaluate"] != "up to date" and not waiting:
            due.append(candidate)
            continue
        if not waiting:
            by = zarr_store.completion(folder).get("run_id", "an earlier run")
            note = f"already scored by run {by}; no model or metric changed since"
        else:
            note = (f"waiting for its models: {', '.join(waiting)} not trained yet (a pipeline run or `tf train` "
                    f"trains them; the evaluation does not)")
        idle.append({"stage": "evaluate", "key": key, "status": NOTHING_NEW, "path": str(folder), "note": note,
                     "started_at": began, "ended_at": now(), "duration_s": round(time.monotonic() - clock, 3)})
    return due, idle
