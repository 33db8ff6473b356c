"""The run report: one row per stage (computed, reused or failed, when and how long) and one for the run as a
whole (total time, status, error, and the overhead: the seconds outside any stage), as storage.tables lays
them out; the same as a table in the log and as Prefect artifacts."""
from __future__ import annotations

import json

import math
from datetime import datetime, timezone
from pathlib import Path

from storage.tables import write_run_report


def now() -> datetime:
    return datetime.now(timezone.utc)


def failure_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


# A result's fields that are row columns; the rest are the stage's own figures (details).
_ROW_FIELDS = {"stage", "key", "status", "duration_s", "path", "encoder_weights", "run_id", "started_at",
               "ended_at", "error", "note", "parent_run_id", "flow_run_id", "kind"}


def details(result: dict) -> str:
    """A stage result's own figures beyond the row's columns (throughput, GPU memory and busy share, MFU,
    where the encode pass spent its time...), as JSON for the runs table's `details` column."""
    extra = {k: v for k, v in result.items() if k not in _ROW_FIELDS}
    return json.dumps(extra, sort_keys=True, default=str) if extra else ""


def stage_row(run_id: str, parent_run_id: str, flow: str, result: dict, encoder_weights: str,
              flow_run_id: str) -> dict:
    """A stage's row from its result (tasks.stage.stage_result, stamped with started_at / ended_at by the run)."""
    return {"run_id": run_id, "parent_run_id": parent_run_id, "kind": "stage", "flow": flow,
            "stage": result["stage"], "key": result.get("key", ""), "status": result["status"],
            "started_at": result["started_at"], "ended_at": result["ended_at"], "duration_s": result["duration_s"],
            "overhead_s": math.nan, "path": result.get("path", ""),
            "encoder_weights": result.get("encoder_weights") or encoder_weights, "error": result.get("error", ""),
            "note": result.get("note", ""), "flow_run_id": flow_run_id, "details": details(result)}


def run_row(run_id: str, flow: str, status: str, started_at: datetime, seconds: float | None, stage_seconds: float,
            encoder_weights: str, flow_run_id: str, error: str = "", note: str = "") -> dict:
    """The run as a whole; seconds None while it runs."""
    ended = None if seconds is None else now()
    return {"run_id": run_id, "parent_run_id": "", "kind": "run", "flow": flow, "stage": "", "key": "",
            "status": status, "started_at": started_at, "ended_at": ended,
            "duration_s": math.nan if seconds is None else round(seconds, 3),
            "overhead_s": math.nan if seconds is None else round(max(seconds - stage_seconds, 0.0), 3),
            "path": "", "encoder_weights": encoder_weights, "error": error, "note": note, "flow_run_id": flow_run_id}


def record(root: str, run_id: str, rows: list[dict]) -> Path:
    return write_run_report(Path(root), run_id, rows)


def format_report(run_id: str, results: list[dict], extra: dict[str, str] | None = None,
                  total: dict | None = None) -> str:
    """The stage table `tf` prints and the flow run logs (a stage run's rows name their run); with `total`,
    a line for the whole run: its seconds, those in stages and the overhead."""
    width = max([len(r["stage"]) for r in results] + [5])
    lines = [f"run {run_id}:"]
    for r in results:
        by = f"  (stage run {r['run_id']})" if r.get("run_id") not in (None, run_id) else ""
        note = f"  {r['note']}" if r.get("note") else ""
        lines.append(f"  {r['stage']:<{width}}  {r['status']:<11}  {r['duration_s']:>8.1f}s  {r['path']}{by}{note}")
        if r.get("rebuilt"):   # computed again although it existed: say why
            lines.append(f"  {'':<{width}}  rebuilt: {r['rebuilt']}")
        if "seen" in r and "skipped" in r:   # every entry under the source root, by what became of it
            lines.append(f"  {'':<{width}}  {r['seen'] + r['skipped']} entries: {r['accepted']} accepted, "
                         f"{r['rejected']} rejected, {r['skipped']} skipped (named in the store's tables)")
    if total:
        lines.append(f"  {'total':<{width}}  {total['status']:<11}  {total['duration_s']:>8.1f}s  "
                     f"stages {total['duration_s'] - total['overhead_s']:.1f} s, overhead {total['overhead_s']:.1f} s "
                     f"({total['note'] or 'no stage runs started'})")
    for name, where in (extra or {}).items():
        lines.append(f"  {name}: {where}")
    return "\n".join(lines)


def publish_failure(run_id: str, stage: str, error: BaseException) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(f"**{run_id} failed at {stage}**\n\n```\n{failure_text(error)}\n```",
                             key="run-failure", description=f"the stage and error that ended {run_id}")


def publish_report(run_id: str, results: list[dict], total: dict) -> None:
    from prefect.artifacts import create_table_artifact

    rows = [{"run": r.get("run_id", run_id), **{k: r.get(k, "") for k in ("stage", "status", "duration_s", "key",
                                                                         "path", "note")}} for r in results]
    rows.append({"run": run_id, "stage": "total", "status": total["status"], "duration_s": total["duration_s"],
                 "key": "", "path": "", "note": f"overhead {total['overhead_s']:.1f} s; {total['note']}"})
    create_table_artifact(rows, key="run-report", description=f"stages computed and reused in {run_id}")
