"""The run report: what each stage wrote, whether it was computed or reused, and how long it took."""
from __future__ import annotations

from pathlib import Path

from storage.tables import now_iso, write_run_report


def _rows(run_id: str, flow: str, results: list[dict], encoder_weights: str) -> list[dict]:
    return [{"run_id": run_id, "timestamp": now_iso(), "flow": flow, "stage": r["stage"], "key": r["key"],
             "status": r["status"], "duration_s": r["duration_s"], "path": r["path"],
             "encoder_weights": r.get("encoder_weights", encoder_weights), "error": ""} for r in results]


def record_run(root: str, run_id: str, flow: str, results: list[dict], encoder_weights: str = "") -> Path:
    return write_run_report(Path(root), run_id, _rows(run_id, flow, results, encoder_weights))


def failure_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def record_failure(root: str, run_id: str, flow: str, results: list[dict], stage: str, error: BaseException,
                   seconds: float, encoder_weights: str = "") -> Path:
    """A failed run's record: the stages it finished, then one `failed` row naming the stage and the error."""
    failed = {"run_id": run_id, "timestamp": now_iso(), "flow": flow, "stage": stage, "key": "", "status": "failed",
              "duration_s": round(seconds, 3), "path": "", "encoder_weights": encoder_weights,
              "error": failure_text(error)}
    return write_run_report(Path(root), run_id, _rows(run_id, flow, results, encoder_weights) + [failed])


def format_report(run_id: str, results: list[dict], extra: dict[str, str] | None = None) -> str:
    width = max(len(r["stage"]) for r in results) if results else 5
    lines = [f"run {run_id}:"]
    for r in results:
        lines.append(f"  {r['stage']:<{width}}  {r['status']:<8}  {r['duration_s']:>8.1f}s  {r['path']}")
        if r.get("rebuilt"):   # computed again although it existed: say why
            lines.append(f"  {'':<{width}}  rebuilt: {r['rebuilt']}")
        if "seen" in r and "skipped" in r:   # every entry under the source root, by what became of it
            lines.append(f"  {'':<{width}}  {r['seen'] + r['skipped']} entries: {r['accepted']} accepted, "
                         f"{r['rejected']} rejected, {r['skipped']} skipped (named in the store's tables)")
    for name, where in (extra or {}).items():
        lines.append(f"  {name}: {where}")
    return "\n".join(lines)


def publish_failure(run_id: str, stage: str, error: BaseException) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(f"**{run_id} failed at {stage}**\n\n```\n{failure_text(error)}\n```",
                             key="run-failure", description=f"the stage and error that ended {run_id}")


def publish_report(run_id: str, results: list[dict]) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact([{k: r[k] for k in ("stage", "status", "duration_s", "key", "path")} for r in results],
                          key="run-report", description=f"stages computed and reused in {run_id}")
