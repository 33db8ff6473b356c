"""The run report: what each stage wrote, whether it was computed or reused, and how long it took."""
from __future__ import annotations

from pathlib import Path

from storage.tables import now_iso, write_run_report


def record_run(root: str, run_id: str, flow: str, results: list[dict], encoder_weights: str = "") -> Path:
    rows = [{"run_id": run_id, "timestamp": now_iso(), "flow": flow, "stage": r["stage"], "key": r["key"],
             "status": r["status"], "duration_s": r["duration_s"], "path": r["path"],
             "encoder_weights": r.get("encoder_weights", encoder_weights)} for r in results]
    return write_run_report(Path(root), run_id, rows)


def format_report(run_id: str, results: list[dict], extra: dict[str, str] | None = None) -> str:
    width = max(len(r["stage"]) for r in results) if results else 5
    lines = [f"run {run_id}:"]
    for r in results:
        lines.append(f"  {r['stage']:<{width}}  {r['status']:<8}  {r['duration_s']:>8.1f}s  {r['path']}")
    for name, where in (extra or {}).items():
        lines.append(f"  {name}: {where}")
    return "\n".join(lines)


def publish_report(run_id: str, results: list[dict]) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact([{k: r[k] for k in ("stage", "status", "duration_s", "key", "path")} for r in results],
                          key="run-report", description=f"stages computed and reused in {run_id}")
