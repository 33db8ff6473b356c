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
"""
from __future__ import annotations

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
RUN_COLUMNS = ["run_id", "timestamp", "flow", "stage", "key", "status", "duration_s", "path", "encoder_weights",
               "error"]   # error: "" unless status is failed
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
    for column, wanted in filters.items():
        if column not in frame:
            raise KeyError(f"unknown metrics column {column!r}; columns are {METRIC_COLUMNS}")
        values = wanted if isinstance(wanted, (list, tuple, set)) else [wanted]
        frame = frame[frame[column].isin(values)]
    return frame.reset_index(drop=True)


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
    frame = pd.DataFrame(rows, columns=RUN_COLUMNS).drop(columns="run_id")   # run_id: the folder
    frame["error"] = _errors(frame["error"])
    path = Path(root) / "tables" / "runs" / f"run_id={run_id}" / "report.parquet"
    atomic_write_parquet(frame, path)
    return path


def load_runs(root: str | Path) -> pd.DataFrame:
    frame = _load_table(Path(root) / "tables" / "runs", RUN_COLUMNS)
    frame["error"] = _errors(frame["error"]) if "error" in frame else ""   # runs recorded before the column
    return frame


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
