"""Parquet tables: metrics, runs, rejects and skipped entries. Append-only, one file per run (or chunk).

Metrics schema (version METRICS_SCHEMA_VERSION), one row per (metric, level, variant):
  run_id, schema_version, timestamp, code_version,
  latents_key, teacher_key, model_key,      stage keys of what was measured
  group       quality | per_level | structure | control | alignment | decoder
  metric      e.g. fid, fd_dinov2, fd_level, nesting, plan_adherence, reencode_ari, ...; on the scenes,
              the judge's fd_scenes, class_accuracy, judge_plan_ari / judge_plan_miou (variant
              "real_holdout": the judge on its held-out real scenes, a reference)
  level       int (-1 when the metric is not per level)
  variant     sub-case, e.g. edit kind ("token_exchange"), "" otherwise
  value       float (NaN when status != "ok")
  n           number of samples behind the value
  ci_low, ci_high   95% bootstrap interval where it applies, else NaN
  status      ok | skipped
  reason      why skipped, "" otherwise
  feature_extractor, extractor_weights    what produced the features, and its weights label
  encoder_weights                          the pipeline encoder's weights label ("random-init" or file)
  mode        generator mode: staged (one generator per level) | flat (the one-step baseline)

Version 2 added `mode`; parts written before it load as "staged" (the only mode they could have).
`load_metrics` adds `parent_run_id` from the runs table: a pipeline's metrics, written by its evaluate stage
run, read as `load_metrics(root, parent_run_id=<pipeline run>)` (or `run_metrics`, which takes either id).

Runs schema (version RUNS_SCHEMA_VERSION), `tables/runs/run_id=<run>/report.parquet`, one row per stage a run
ran and one row for the run as a whole:
  run_id          the run the row belongs to (the folder)
  parent_run_id   "" for a run started on its own; for a stage run that a pipeline started as a deployment
                  run (`<pipeline run>-<first stage>`), the pipeline's run id
  kind            run | stage. A run started on its own has one `run` row: its total time, status and error.
                  A stage run started by a pipeline has only `stage` rows: its parent's `run` row counts it.
  flow, stage     the flow (pipeline, ingest, ...); the stage (ingest, train-L0, ...), "" on a `run` row
  key, path       the stage's key and folder ("" on a `run` row)
  status          stage rows: computed | reused | failed | nothing new (a scheduled evaluation that found
                  nothing to score; `note` says why); run rows: running (written at its start: a run that
                  stays `running` after its process ended was killed) | completed | failed
  started_at, ended_at   timestamps (UTC)
  duration_s      seconds from started_at to ended_at
  overhead_s      run rows: duration_s minus the stage rows' seconds (its own and its stage runs'): checks,
                  imports and starting stage runs; NaN on stage rows
  encoder_weights the run's encoder weights label ("random-init" or the file), "" where no stage read it
  error           "" unless status is failed
  note            why a stage was reused or had nothing new; how many stage runs a run started
  flow_run_id     the Prefect flow run that wrote the row ("" outside Prefect's run context)
Version 1 (before issue 32) had a string `timestamp` (when the run ended) and no run rows; its parts load with
started_at / ended_at from it, kind "stage" and parent_run_id "". Beside report.parquet, `_run.json` holds the
run's whole config and parameters (`write_run_config`), so every key can be traced to the settings behind it
(the leading _ keeps pandas and pyarrow from reading it as a part of the table).
"""
from __future__ import annotations

import json
import math
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from storage.files import atomic_write_bytes
from storage.keys import stable_hash

METRICS_SCHEMA_VERSION = 2
METRIC_COLUMNS = [
    "run_id", "schema_version", "timestamp", "code_version", "latents_key", "teacher_key", "model_key",
    "group", "metric", "level", "variant", "value", "n", "ci_low", "ci_high", "status", "reason",
    "feature_extractor", "extractor_weights", "encoder_weights", "mode",
]
SKIPPED_COLUMNS = ["stage", "path", "reason"]   # entries under a source root that are no sample, named
SKIPPED_TABLE = "_skipped.parquet"
RUNS_SCHEMA_VERSION = 2
RUN_COLUMNS = ["run_id", "parent_run_id", "kind", "flow", "stage", "key", "status", "started_at", "ended_at",
               "duration_s", "overhead_s", "path", "encoder_weights", "error", "note", "flow_run_id", "details"]   # details: the stage's own figures, JSON
RUN_TEXT = ("parent_run_id", "kind", "flow", "stage", "key", "status", "path", "encoder_weights", "error", "note",
            "flow_run_id", "details")
NOTHING_NEW = "nothing new"   # the status of a scheduled evaluation's row when nothing changed since its last run
REJECT_COLUMNS = ["stage", "path", "reason", "chunk", "timestamp"]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def claim_run_id(root: str | Path, given: str | None = None) -> str:
    """A run id that no other run of this root holds: `given` while it is free, else `given-<time>-<random>`
    (a fresh `<time>-<random>` when none is given), so a re-used id never overwrites an earlier run's
    record. Claimed by creating the run's folder of the runs table: mkdir is atomic, so two runs started
    at once never share an id."""
    runs = Path(root) / "tables" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    candidate = given or new_run_id()
    while True:
        try:
            (runs / f"run_id={candidate}").mkdir()
            return candidate
        except FileExistsError:
            candidate = f"{given}-{new_run_id()}" if given else new_run_id()


def atomic_write_parquet(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(path, frame.to_parquet(index=False))


def metric_row(group: str, metric: str, value: float | None, *, level: int = -1, variant: str = "",
               n: int = 0, ci: tuple[float, float] | None = None, status: str = "ok", reason: str = "",
               feature_extractor: str = "", extractor_weights: str = "") -> dict:
    """One metric value; skipped metrics carry a reason and never a number."""
    if status == "ok" and (value is None or (isinstance(value, float) and math.isnan(value))):
        status, reason = "skipped", reason or "value could not be computed (NaN)"
    if status != "ok":
        value = float("nan")
    low, high = ci if ci is not None else (float("nan"), float("nan"))
    return {"group": group, "metric": metric, "level": int(level), "variant": variant,
            "value": float(value), "n": int(n), "ci_low": float(low), "ci_high": float(high),
            "status": status, "reason": reason, "feature_extractor": feature_extractor,
            "extractor_weights": extractor_weights}


def write_metrics(root: Path, run_id: str, rows: list[dict], context: dict) -> Path:
    """Append one run's rows: `tables/metrics/run_id=<run>/part-<uuid>.parquet`."""
    frame = pd.DataFrame([{**context, **row} for row in rows])
    frame["run_id"] = run_id
    frame["schema_version"] = METRICS_SCHEMA_VERSION
    frame["timestamp"] = now_iso()
    for column in METRIC_COLUMNS:
        if column not in frame:
            frame[column] = ""
    # Named by what was measured, not at random: a run killed after this write and retried under
    # the same run id replaces its part instead of adding a duplicate of every row.
    measured = sorted(f"{r['group']}/{r['metric']}/{r['level']}/{r['variant']}" for r in rows)
    name = stable_hash({"context": {k: v for k, v in context.items() if k.endswith("_key")}, "rows": measured}, 8)
    path = Path(root) / "tables" / "metrics" / f"run_id={run_id}" / f"part-{name}.parquet"
    atomic_write_parquet(frame[[c for c in METRIC_COLUMNS if c != "run_id"]], path)   # run_id: the folder
    return path


def _run_of(path: Path) -> str:
    return path.parent.name.removeprefix("run_id=")


def _load_table(folder: Path, columns: list[str]) -> pd.DataFrame:
    """Every part under `folder`; run_id comes from its `run_id=<run>` folder (the files leave it out, so
    `pd.read_parquet(folder)` reads the table whole; older files that hold it agree with the folder)."""
    files = sorted(folder.glob("**/*.parquet")) if folder.exists() else []
    if not files:
        return pd.DataFrame(columns=columns)
    parts = []
    for f in files:
        part = pd.read_parquet(f)
        part["run_id"] = _run_of(f)
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    return frame[[c for c in columns if c in frame] + [c for c in frame if c not in columns]]


def load_metrics(root: str | Path, **filters) -> pd.DataFrame:
    """One tidy DataFrame across runs. Filters match columns: `load_metrics(r, metric="fid", level=[0, 1])`."""
    frame = _load_table(Path(root) / "tables" / "metrics", METRIC_COLUMNS)
    frame["mode"] = frame["mode"].fillna("staged") if "mode" in frame else "staged"
    runs = load_runs(root)
    parents = dict(zip(runs.run_id, runs.parent_run_id))
    frame["parent_run_id"] = [parents.get(run, "") for run in frame["run_id"]]
    for column, wanted in filters.items():
        if column not in frame:
            raise KeyError(f"unknown metrics column {column!r}; columns are {METRIC_COLUMNS + ['parent_run_id']}")
        values = wanted if isinstance(wanted, (list, tuple, set)) else [wanted]
        frame = frame[frame[column].isin(values)]
    return frame.reset_index(drop=True)


def run_metrics(root: str | Path, run_id: str, **filters) -> pd.DataFrame:
    """The metric rows of a run: its own, or those of the stage runs it started (a routed pipeline's)."""
    frame = load_metrics(root, **filters)
    return frame[(frame.run_id == run_id) | (frame.parent_run_id == run_id)].reset_index(drop=True)


def compare_runs(root: str | Path, run_ids: list[str], by: str = "run_id", **filters) -> pd.DataFrame:
    """One row per (group, metric, level, variant), one value column per run: ready for a plot.
    by="mode" names the columns by generator mode instead (e.g. a staged and a flat run: "staged", "flat");
    skipped rows are left out, so a metric only one mode has shows NaN under the other."""
    frame = load_metrics(root, run_id=list(run_ids), status="ok", **filters)
    table = frame.pivot_table(index=["group", "metric", "level", "variant"], columns=by, values="value",
                              aggfunc="first")
    order = list(dict.fromkeys(v for r in run_ids for v in frame.loc[frame.run_id == r, by]))   # in run order
    return table.reindex(columns=[r for r in order if r in table.columns]).reset_index()


def write_run_report(root: Path, run_id: str, rows: list[dict]) -> Path:
    """A run's rows (run_id: the folder), replacing what the run wrote before (its `running` row)."""
    frame = _typed_runs(pd.DataFrame(rows, columns=RUN_COLUMNS)).drop(columns="run_id")
    frame["schema_version"] = RUNS_SCHEMA_VERSION
    path = Path(root) / "tables" / "runs" / f"run_id={run_id}" / "report.parquet"
    atomic_write_parquet(frame, path)
    return path


def _typed_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Text columns as strings ("" for none), times as UTC timestamps, seconds as floats."""
    for column in RUN_TEXT:
        frame[column] = _errors(frame[column]) if column in frame else ""
    frame["kind"] = frame["kind"].replace("", "stage")
    for column in ("started_at", "ended_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True) if column in frame else pd.NaT
    for column in ("duration_s", "overhead_s"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame


def run_details(row) -> dict:
    """A runs-table row's `details` (the stage's own figures: images/s, GPU memory and busy share, MFU,
    where the time went) as a dict; {} for rows without any."""
    import json

    text = row["details"] if "details" in row else ""
    return json.loads(text) if isinstance(text, str) and text else {}


def load_runs(root: str | Path) -> pd.DataFrame:
    """Every row of every run, oldest first; parts of version 1 (a string `timestamp` written when the run
    ended) get their started_at / ended_at from it."""
    frame = _load_table(Path(root) / "tables" / "runs", RUN_COLUMNS)
    if "timestamp" in frame:
        ended = pd.to_datetime(frame.pop("timestamp"), utc=True, format="ISO8601")
        seconds = pd.to_timedelta(pd.to_numeric(frame["duration_s"], errors="coerce").fillna(0), unit="s")
        for column, legacy in (("ended_at", ended), ("started_at", ended - seconds)):
            frame[column] = pd.to_datetime(frame[column], utc=True).fillna(legacy) if column in frame else legacy
    frame = _typed_runs(frame.drop(columns="schema_version", errors="ignore"))
    frame = frame[RUN_COLUMNS + [c for c in frame if c not in RUN_COLUMNS]]
    return frame.sort_values("started_at", kind="stable").reset_index(drop=True)


def load_run_family(root: str | Path, run_id: str) -> pd.DataFrame:
    """The rows of one run and of its stage runs (`<run>-<stage>`), read from their folders alone: what a
    stage run polls while it waits for its pipeline's earlier stages."""
    runs = Path(root) / "tables" / "runs"
    parts = [f for folder in [runs / f"run_id={run_id}", *runs.glob(f"run_id={run_id}-*")]
             for f in [folder / "report.parquet"] if f.exists()]
    frames = [pd.read_parquet(f).assign(run_id=_run_of(f)) for f in parts]
    return _typed_runs(pd.concat(frames, ignore_index=True)) if frames else _typed_runs(pd.DataFrame(columns=RUN_COLUMNS))


def run_summaries(root: str | Path, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per run started on its own (its stage runs folded in), newest first: run_id, flow, status,
    started_at, duration_s, stage_s (seconds in stages), overhead_s, error, failed_stage, computed, reused,
    nothing_new (stage names), stage_runs (the ids of the stage runs it started), note. A run without a `run`
    row (recorded before version 2, or still writing) is summed from its stage rows."""
    runs = load_runs(root) if runs is None else runs
    columns = ["run_id", "flow", "status", "started_at", "duration_s", "stage_s", "overhead_s", "error",
               "failed_stage", "computed", "reused", "nothing_new", "stage_runs", "note", "flow_run_id"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    stages = runs[runs.kind == "stage"]
    out = []
    for run_id, own in runs[runs.parent_run_id == ""].groupby("run_id", sort=False):
        children = runs[runs.parent_run_id == run_id]
        mine = stages[(stages.run_id == run_id) | (stages.parent_run_id == run_id)]
        total = own[own.kind == "run"]
        failed = mine[mine.status == "failed"]
        if len(total):
            row = total.iloc[-1]
            status, started, duration = row.status, row.started_at, row.duration_s
            overhead, error, note, flow_run = row.overhead_s, row.error, row.note, row.flow_run_id
        else:
            status = "failed" if len(failed) else "completed"
            started, duration = mine.started_at.min(), float(mine.duration_s.sum())
            overhead, error, note, flow_run = float("nan"), "", "", own.flow_run_id.iloc[0]
            error = failed.error.iloc[0] if len(failed) else ""
        out.append({"run_id": run_id, "flow": own.flow.iloc[0], "status": status, "started_at": started,
                    "duration_s": duration, "stage_s": float(mine.duration_s.sum()), "overhead_s": overhead,
                    "error": error, "failed_stage": ", ".join(failed.stage),
                    "computed": ", ".join(mine[mine.status == "computed"].stage),
                    "reused": ", ".join(mine[mine.status == "reused"].stage),
                    "nothing_new": ", ".join(mine[mine.status == NOTHING_NEW].stage),
                    "stage_runs": ", ".join(dict.fromkeys(children.run_id)), "note": note, "flow_run_id": flow_run})
    frame = pd.DataFrame(out, columns=columns)
    return frame.sort_values("started_at", ascending=False, kind="stable").reset_index(drop=True)


def write_run_config(root: str | Path, run_id: str, record: dict) -> Path:
    """`_run.json` beside the run's report: its config (every section, as validated) and parameters."""
    path = Path(root) / "tables" / "runs" / f"run_id={run_id}" / "_run.json"
    atomic_write_bytes(path, json.dumps(record, indent=1, sort_keys=True, default=str).encode())
    return path


def load_run_config(root: str | Path, run_id: str) -> dict:
    """What `write_run_config` wrote for the run ({} for a run recorded before it)."""
    path = Path(root) / "tables" / "runs" / f"run_id={run_id}" / "_run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _errors(column: pd.Series) -> list[str]:
    """The error column as strings, "" where a row has none (missing values are float NaN)."""
    return [value if isinstance(value, str) else "" for value in column]


def write_rejects(stage_dir: Path, chunk: int, rows: list[dict]) -> None:
    """Per-chunk rejects, written before the chunk's completion marker."""
    frame = pd.DataFrame([{**r, "chunk": chunk, "timestamp": now_iso()} for r in rows], columns=REJECT_COLUMNS)
    atomic_write_parquet(frame, Path(stage_dir) / "_rejects" / f"{chunk:06d}.parquet")


def load_rejects(stage_dir: str | Path) -> pd.DataFrame:
    return _load_table(Path(stage_dir) / "_rejects", REJECT_COLUMNS)


def write_skipped(stage_dir: Path, rows: list[dict]) -> None:
    """The entries a listing saw that are neither samples nor rejects (readme.txt, .DS_Store, ...)."""
    atomic_write_parquet(pd.DataFrame(rows, columns=SKIPPED_COLUMNS), Path(stage_dir) / SKIPPED_TABLE)


def load_skipped(stage_dir: str | Path) -> pd.DataFrame:
    path = Path(stage_dir) / SKIPPED_TABLE
    return pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=SKIPPED_COLUMNS)
