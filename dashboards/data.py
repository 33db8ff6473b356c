"""Read-only views of one store root for the dashboard: runs, their stage folders, metrics, trajectories.

Nothing here imports Streamlit or torch, so the pages stay thin and tests can call it directly.
Paths in run reports were written relative to the working directory of the run; a stage folder
is always found again by its name under the root (`<stage>-<key>/`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.evaluation.registry import registered, unit_of
from storage import zarr_store
from storage.checkpoints import checkpoint_meta
from storage.files import read_json
from storage.tables import load_metrics, load_run_config, load_runs, run_summaries

EDITS_FOLDER = "dashboard-edits"   # the only folder under a root that the dashboard writes


def headline() -> list[tuple[str, str]]:
    """Headline columns of the runs page, (label, metric; mean over levels / variants), in registry order."""
    return [pair for metric in registered() for pair in metric.headline]


def plots() -> dict[str, list[str]]:
    """Per-level plots comparing runs: title -> the metrics drawn, from the registered metrics."""
    out: dict[str, list[str]] = {}
    for metric in registered():
        for title, name in metric.plots:
            out.setdefault(title, []).append(name)
    return out


def __getattr__(name: str):
    """HEADLINE / PLOTS, read by the pages: computed on access, so a metric registered later shows too."""
    if name == "HEADLINE":
        return headline()
    if name == "PLOTS":
        return plots()
    raise AttributeError(name)


def root_problem(root: str | Path | None) -> str | None:
    """A sentence for the user when the root cannot be shown, else None."""
    if root is None or str(root).strip() == "":
        return "No store root given. Start the dashboard with `tf dashboard --root <folder>`."
    path = Path(root)
    if not path.exists():
        return f"The root `{path}` does not exist. Run `tf pipeline --root {path}` first."
    if not path.is_dir():
        return f"The root `{path}` is not a folder."
    if load_runs(path).empty:
        return f"The root `{path}` holds no runs yet (no `tables/runs/`). Run `tf pipeline --root {path}` first."
    return None


def _folder(root: Path, path: str) -> Path:
    """A stage folder named in a run report, found under this root by its name."""
    return Path(root) / Path(str(path)).name


@dataclass(frozen=True)
class RunFolders:
    run_id: str
    images: Path | None
    latents: Path | None
    teacher: Path | None
    decoder: Path | None
    generators: tuple[Path, ...]
    evaluation: Path | None


def stage_rows(root: str | Path, run_id: str, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """The stage rows of a run and of the stage runs it started, in the order they ran."""
    runs = load_runs(root) if runs is None else runs
    return runs[(runs.kind == "stage") & ((runs.run_id == run_id) | (runs.parent_run_id == run_id))]


def run_folders(root: str | Path, run_id: str) -> RunFolders:
    rows = stage_rows(root, run_id)
    if rows.empty and not (load_runs(root).run_id == run_id).any():
        raise KeyError(f"no run {run_id!r} under {root}")
    by_stage = {row.stage: _folder(Path(root), row.path) for row in rows.itertuples() if row.path}
    levels = sorted(int(s[len("train-L"):]) for s in by_stage if s.startswith("train-L"))
    generators = tuple(by_stage[f"train-L{l}"] for l in levels)
    if "train-shared" in by_stage:   # one model samples every level
        shared = by_stage["train-shared"]
        generators = (shared,) * len(checkpoint_meta(shared / "generator")["trained_level"])
    return RunFolders(run_id, by_stage.get("ingest"), by_stage.get("encode"), by_stage.get("hierarchy"),
                      by_stage.get("train-decoder"), generators, by_stage.get("evaluate"))


def metrics_run(root: str | Path, run_id: str) -> str:
    """The run whose metric rows describe this run: a run that reused `evaluate` has none of its own, and a
    routed pipeline's are under the stage run that evaluated."""
    folders = run_folders(root, run_id)
    if folders.evaluation is not None and zarr_store.is_complete(folders.evaluation):
        return str(zarr_store.completion(folders.evaluation).get("run_id", run_id))
    return run_id


STATUS_MARK = {"failed": "FAILED", "running": "running", "completed": "completed"}   # no emoji: not every font has them


def runs_overview(root: str | Path) -> pd.DataFrame:
    """One row per run started on its own (a routed pipeline's stage runs folded into it), newest first:
    status (marked), error, duration and what was computed or reused first, then stage keys, encoder
    weights and headline metrics (those of the run that computed its evaluation: metrics_from)."""
    runs = load_runs(root)
    if runs.empty:
        return pd.DataFrame()
    metrics = load_metrics(root, status="ok")
    rows = []
    for summary in run_summaries(root, runs).itertuples():
        mine = stage_rows(root, summary.run_id, runs)
        weights = sorted(set(mine.encoder_weights) - {""})
        row = {"status": STATUS_MARK.get(summary.status, summary.status), "run_id": summary.run_id,
               "started": summary.started_at, "duration_s": summary.duration_s, "error": summary.error,
               "failed_stage": summary.failed_stage, "computed": summary.computed, "reused": summary.reused,
               "nothing_new": summary.nothing_new, "flow": summary.flow, "stage_s": summary.stage_s,
               "overhead_s": summary.overhead_s, "stage_runs": summary.stage_runs,
               "encoder_weights": ", ".join(weights)}
        row.update({f"key:{s}": k for s, k in zip(mine.stage, mine.key) if k})
        source = metrics_run(root, summary.run_id)
        row["metrics_from"] = source
        own = metrics[metrics.run_id == source]
        for label, metric in headline():
            values = own[own.metric == metric].value
            row[label] = float(values.mean()) if len(values) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def default_pair(overview: pd.DataFrame) -> tuple[str, str]:
    """(A, B) for the comparison: B the newest run with metrics, A the newest older one whose metrics come
    from another evaluation (so the differences are not those of one evaluation with itself); any two
    different runs when there are no such."""
    ids = list(overview.run_id)
    if len(ids) < 2:
        return (ids[0], ids[0]) if ids else ("", "")
    scored = overview[overview[[label for label, _ in headline()]].notna().any(axis=1)] if len(headline()) else overview
    order = list(scored.run_id) + [r for r in ids if r not in set(scored.run_id)]
    b = order[0]
    source = dict(zip(overview.run_id, overview.metrics_from))
    a = next((r for r in order[1:] if source[r] != source[b]), order[1])
    return a, b


def metric_trends(root: str | Path, overview: pd.DataFrame) -> pd.DataFrame:
    """The headline metrics over evaluations, oldest first: run_id, started, metric, value (mean over levels
    and variants), unit. One point per evaluation: a run that reused another's evaluation (same metrics_from)
    adds none, and runs without a value for a metric are left out."""
    rows = []
    for _, row in overview.iterrows():
        for label, metric in headline():
            if label in row and not pd.isna(row[label]):
                rows.append({"run_id": row.run_id, "started": row.started, "metric": metric,
                             "value": float(row[label]), "unit": unit_of(metric), "source": row.metrics_from})
    frame = pd.DataFrame(rows, columns=["run_id", "started", "metric", "value", "unit", "source"])
    frame = frame.sort_values("started", kind="stable").drop_duplicates(["source", "metric"])
    return frame.drop(columns="source").reset_index(drop=True)


# Which config sections each stage's key hashes (storage.keys.stage_keys; every key also hashes its upstream
# stages' keys and a code version).
KEY_SECTIONS = {"ingest": ("source",), "encode": ("encoder", "source"), "hierarchy": ("hierarchy",),
                "train": ("generator", "hierarchy"), "train-decoder": ("decoder",), "judge": ("judge",),
                "evaluate": ("evaluate",)}


def key_config(root: str | Path, run_id: str, stage: str) -> dict:
    """The settings behind a stage's key in a run: the config sections its key hashes, from the _run.json of
    the run that ran it ({} for runs recorded before _run.json)."""
    rows = stage_rows(root, run_id)
    owner = rows[rows.stage == stage].run_id
    config = load_run_config(root, owner.iloc[0] if len(owner) else run_id).get("config", {})
    sections = KEY_SECTIONS.get(stage) or KEY_SECTIONS.get(stage.split("-")[0], ())
    return {section: config[section] for section in sections if section in config}


def run_links(root: str | Path, run_id: str) -> dict:
    """Where a run's things are: each stage's folder (absolute), its grid.png, and its Prefect flow run page
    (recorded when it ran against a Prefect server; with the ephemeral API there is no page)."""
    rows = stage_rows(root, run_id)
    folders = {row.stage: str(_folder(Path(root), row.path).resolve()) for row in rows.itertuples() if row.path}
    record = load_run_config(root, run_id)
    grid = Path(folders["evaluate"]) / "grid.png" if "evaluate" in folders else None
    return {"folders": folders, "grid": grid if grid is not None and grid.exists() else None,
            "prefect": record.get("prefect_url", ""), "flow_run_id": record.get("flow_run_id", ""),
            "runs_table": str((Path(root) / "tables" / "runs" / f"run_id={run_id}").resolve())}


def per_level_comparison(root: str | Path, run_ids: list[str], metric: str) -> pd.DataFrame:
    """index: level, one column per run (mean over edit kinds / variants); empty when nothing was measured."""
    columns = {}
    for run_id in run_ids:
        frame = load_metrics(root, run_id=metrics_run(root, run_id), metric=metric, status="ok")
        frame = frame[frame.level >= 0]
        if len(frame):
            columns[run_id] = frame.groupby("level").value.mean()
    if not columns:
        return pd.DataFrame()
    table = pd.DataFrame(columns)
    table.index.name = "level"
    return table


def comparison_table(root: str | Path, run_a: str, run_b: str) -> pd.DataFrame:
    """Every metric of two runs side by side (their metric source runs), with the difference."""
    source_a, source_b = metrics_run(root, run_a), metrics_run(root, run_b)
    frames = []
    for run_id, source in ((run_a, source_a), (run_b, source_b)):
        frame = load_metrics(root, run_id=source, status="ok")
        frames.append(frame.groupby(["group", "metric", "level", "variant"]).value.first().rename(run_id))
    table = pd.concat(frames, axis=1) if run_a != run_b else frames[0].to_frame()
    if run_a != run_b:
        table["difference"] = table[run_b] - table[run_a]
    return table.reset_index()


def trajectory_sources(root: str | Path) -> dict[str, Path]:
    """Every stored trajectory set under the root: evaluation samples, evaluation edits, dashboard edits."""
    root = Path(root)
    out: dict[str, Path] = {}
    for folder in sorted(root.glob("evaluate-*")):
        if not zarr_store.is_complete(folder):
            continue
        run_id = zarr_store.completion(folder).get("run_id", "")
        for name in ("trajectories", "edits"):
            if (folder / f"{name}.zarr").exists():
                out[f"{folder.name} / {name} (run {run_id})"] = folder / f"{name}.zarr"
    for edit in sorted((root / EDITS_FOLDER).glob("edit-*/trajectory.zarr")):
        if zarr_store.is_complete(edit):
            out[f"dashboard-edits / {edit.parent.name}"] = edit
    return out


@dataclass
class Trajectory:
    trajectory_id: str
    parent: str
    seed: int
    label: int
    canvas: np.ndarray    # [L, g, g, C] float32
    images: np.ndarray    # [L, H, W, 3] uint8, the decoded image of each level
    regions: np.ndarray   # [L-1, g, g] the generated partition of levels 0..L-2


def trajectory_ids(store: Path) -> list[str]:
    return [str(t) for t in zarr_store.open_array(store, "trajectory")[:]]


def load_trajectory(store: Path, trajectory_id: str) -> Trajectory:
    ids = trajectory_ids(store)
    if trajectory_id not in ids:
        raise KeyError(f"no trajectory {trajectory_id!r} in {store}")
    i = ids.index(trajectory_id)
    read = lambda name: zarr_store.open_array(store, name)[i]  # noqa: E731
    return Trajectory(trajectory_id, str(read("parent")), int(read("seed")), int(read("label")),
                      np.asarray(read("canvas"), np.float32), np.asarray(read("image")), np.asarray(read("regions")))


def partition_of_level(regions: np.ndarray, level: int) -> np.ndarray:
    """The partition an edit at `level` uses: the level's own, the finest one for the raw last level."""
    return regions[min(level, len(regions) - 1)]


def load_edits(root: str | Path) -> pd.DataFrame:
    """Every edit object the dashboard saved under this root (newest first); half-written ones are skipped."""
    files = sorted((Path(root) / EDITS_FOLDER).glob("edit-*/edit.json"))
    records = [read_json(f) for f in files if zarr_store.is_complete(f.parent / "trajectory.zarr")]
    frame = pd.DataFrame(records)
    return frame.sort_values("created", ascending=False).reset_index(drop=True) if len(frame) else frame


def object_region(regions: np.ndarray) -> int:
    """The level-0 region that is the object. The scenes draw one object on a background, which fills the
    border; a generated level 0 may also hold specks. So: the region with the most tokens off the grid's
    border (ties: the smaller id)."""
    level0 = np.asarray(regions[0])
    inner = np.ones(level0.shape, bool)
    inner[[0, -1], :] = inner[:, [0, -1]] = False
    ids = np.unique(level0)
    return int(max(ids, key=lambda r: (int((inner & (level0 == r)).sum()), -r)))


def region_labels(regions: np.ndarray, level: int) -> tuple[dict[int, str], int]:
    """({region id: "3: part of the object, 6 tokens"}, the default region: the object at level 0, else the
    level's largest region inside the object) for an edit at `level`."""
    inside = np.asarray(regions[0]) == object_region(regions)
    partition = partition_of_level(regions, level)
    labels, overlap = {}, {}
    for region in np.unique(partition):
        mask = partition == region
        overlap[int(region)] = int((mask & inside).sum())
        role = ("the object" if level == 0 else "part of the object") if overlap[int(region)] * 2 > mask.sum() \
            else "background"
        labels[int(region)] = f"{int(region)}: {role}, {int(mask.sum())} tokens"
    return labels, max(overlap, key=lambda r: (overlap[r], -r))
