"""Prefect artifacts for an evaluation: a table of headline figures and a markdown summary."""
from __future__ import annotations

import math
from pathlib import Path

from models.evaluation.registry import registered


def headline_metrics() -> set[tuple[str, str]]:
    """(group, metric) of the figures the registered metrics put in the run's headline table."""
    return {(metric.group, name) for metric in registered() for name in metric.summary}


def _fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def headline_rows(rows: list[dict]) -> list[dict]:
    wanted = headline_metrics()
    out = []
    for r in rows:
        if (r["group"], r["metric"]) in wanted and r["variant"] in ("", "mean_pooled", "token_exchange"):
            out.append({"group": r["group"], "metric": r["metric"], "level": r["level"], "variant": r["variant"],
                        "value": _fmt(r["value"]), "ci95": f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
                        "status": r["status"], "reason": r["reason"]})
    return out


def summary_markdown(run_id: str, rows: list[dict], folder: Path, table: Path) -> str:
    skipped = [r for r in rows if r["status"] != "ok"]
    lines = [f"# Evaluation {run_id}", "", f"- metrics table: `{table}`", f"- trajectories: `{folder / 'trajectories.zarr'}`",
             f"- edits: `{folder / 'edits.parquet'}` and `{folder / 'edits.zarr'}`", f"- grid: `{folder / 'grid.png'}`",
             f"- rows: {len(rows)} ({len(skipped)} skipped)", ""]
    lines += [f"- skipped `{r['metric']}`: {r['reason']}" for r in skipped]
    return "\n".join(lines)


def publish_artifacts(run_id: str, rows: list[dict], folder: Path, table: Path) -> None:
    from tasks.progress import _in_prefect_run

    if not _in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(headline_rows(rows), key="headline-metrics", description=f"headline figures of {run_id}")
    create_markdown_artifact(summary_markdown(run_id, rows, folder, table), key="evaluation-summary",
                             description=f"where the outputs of {run_id} are")
