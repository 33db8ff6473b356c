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

from models.evaluation.registry import registered
from storage import zarr_store
from storage.checkpoints import checkpoint_meta
from storage.files import read_json
from storage.tables import load_metrics, load_runs

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


def run_folders(root: str | Path, run_id: str) -> RunFolders:
    runs = load_runs(root)
    rows = runs[runs.run_id == run_id]
    if rows.empty:
        raise KeyError(f"no run {run_id!r} under {root}")
    by_stage = {row.stage: _folder(Path(root), row.path) for row in rows.itertuples()}
    levels = sorted(int(s[len("train-L"):]) for s in by_stage if s.startswith("train-L"))
    generators = tuple(by_stage[f"train-L{l}"] for l in levels)
    if "train-shared" in by_stage:   # one model samples every level
        shared = by_stage["train-shared"]
        generators = (shared,) * len(checkpoint_meta(shared / "generator")["trained_level"])
    return RunFolders(run_id, by_stage.get("ingest"), by_stage.get("encode"), by_stage.get("hierarchy"),
                      by_stage.get("train-decoder"), generators, by_stage.get("evaluate"))


def metrics_run(root: str | Path, run_id: str) -> str:
    """The run whose metric rows describe this run: a run that reused `evaluate` has none of its own."""
    folders = run_folders(root, run_id)
    if folders.evaluation is not None and zarr_store.is_complete(folders.evaluation):
        return str(zarr_store.completion(folders.evaluation).get("run_id", run_id))
    return run_id


def runs_overview(root: str | Path) -> pd.DataFrame:
    """One row per run: stage keys, encoder weights, computed / reused stages and headline metrics."""
    runs = load_runs(root)
    if runs.empty:
        return pd.DataFrame()
    metrics = load_metrics(root, status="ok")
    rows = []
    for run_id, frame in runs.groupby("run_id", sort=False):
        row = {"run_id": run_id, "timestamp": frame.timestamp.iloc[0], "flow": frame.flow.iloc[0],
               "encoder_weights": ", ".join(sorted(set(frame.encoder_weights.astype(str)))),
               "computed": ", ".join(frame[frame.status == "computed"].stage),
               "reused": ", ".join(frame[frame.status == "reused"].stage)}
        row.update({f"key:{s}": k for s, k in zip(frame.stage, frame.key)})
        source = metrics_run(root, run_id)
        row["metrics_from"] = source
        mine = metrics[metrics.run_id == source]
        for label, metric in headline():
            values = mine[mine.metric == metric].value
            row[label] = float(values.mean()) if len(values) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows).sort_values("timestamp", ascending=False).reset_index(drop=True)


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
