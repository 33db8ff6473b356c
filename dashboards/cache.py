"""Streamlit caches around the data and edit services: heavy objects survive reruns and sessions.

Tables are cached against a stamp of the files behind them, so a new run or a saved edit shows up
on the next rerun without restarting the server; models are cached by their checkpoint files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dashboards import data, visuals


def tables_stamp(root: str) -> tuple:
    """Names and modification times of every Parquet table: changes when a run adds or rewrites one."""
    return tuple(sorted((str(f), f.stat().st_mtime_ns) for f in (Path(root) / "tables").glob("**/*.parquet")))


def edits_stamp(root: str) -> tuple:
    """The same for the edit objects the dashboard saved (kept apart so an edit does not reset the run caches)."""
    files = (Path(root) / data.EDITS_FOLDER).glob("edit-*/edit.json")
    return tuple(sorted((str(f), f.stat().st_mtime_ns) for f in files))


@st.cache_data(show_spinner=False, max_entries=8)
def root_problem(root: str, stamp: tuple) -> str | None:
    """`data.root_problem` (it reads the runs table) once per state of the tables, not on every rerun of every page."""
    return data.root_problem(root)


@st.cache_data(show_spinner=False, max_entries=8)
def runs_overview(root: str, stamp: tuple) -> pd.DataFrame:
    return data.runs_overview(root)


@st.cache_data(show_spinner=False, max_entries=8)
def trends(root: str, stamp: tuple) -> pd.DataFrame:
    return data.metric_trends(root, runs_overview(root, stamp))


@st.cache_data(show_spinner=False, max_entries=32)
def stage_rows(root: str, run_id: str, stamp: tuple) -> pd.DataFrame:
    return data.stage_rows(root, run_id)


@st.cache_data(show_spinner=False, max_entries=32)
def run_links(root: str, run_id: str, stamp: tuple) -> dict:
    return data.run_links(root, run_id)


@st.cache_data(show_spinner=False, max_entries=64)
def key_config(root: str, run_id: str, stage: str, stamp: tuple) -> dict:
    return data.key_config(root, run_id, stage)


@st.cache_data(show_spinner=False, max_entries=64)
def per_level(root: str, run_ids: tuple[str, ...], metric: str, stamp: tuple) -> pd.DataFrame:
    return data.per_level_comparison(root, list(run_ids), metric)


@st.cache_data(show_spinner=False, max_entries=16)
def comparison(root: str, run_a: str, run_b: str, stamp: tuple) -> pd.DataFrame:
    return data.comparison_table(root, run_a, run_b)


@st.cache_data(show_spinner=False, max_entries=8)
def trajectory_sources(root: str, stamp: tuple) -> dict[str, str]:   # stamp: tables and edits
    return {name: str(path) for name, path in data.trajectory_sources(root).items()}


def store_stamp(store: str) -> int:
    """When the store was completed: a forced re-evaluation rewrites it in place, and then the caches must miss."""
    marker = Path(store) / "_COMPLETE"
    return marker.stat().st_mtime_ns if marker.exists() else 0


@st.cache_data(show_spinner=False, max_entries=32)
def trajectory_ids(store: str, stamp: int = 0) -> list[str]:
    return data.trajectory_ids(Path(store))


@st.cache_data(show_spinner=False, max_entries=256)
def trajectory(store: str, trajectory_id: str, stamp: int = 0) -> data.Trajectory:
    return data.load_trajectory(Path(store), trajectory_id)


@st.cache_data(show_spinner=False, max_entries=128)
def pca(store: str, trajectory_id: str, size: int, stamp: int = 0) -> np.ndarray:
    return visuals.pca_rgb(trajectory(store, trajectory_id, stamp).canvas, size)


@st.cache_data(show_spinner=False, max_entries=64)
def hierarchy_rows(images: str, teacher: str, start: int, count: int) -> list[dict]:
    return visuals.hierarchy_rows(Path(images), Path(teacher), start, count)


@st.cache_data(show_spinner=False, max_entries=64)
def hierarchy_strips(images: str, teacher: str, start: int, count: int, wanted_px: int) -> list[bytes]:
    """Each row's picture (`visuals.hierarchy_strip`) as PNG, encoded once here rather than by st.image on every
    rerun (about 15 ms a row); PNG, not JPEG, keeps the titles and token edges sharp."""
    import io

    from PIL import Image

    out = []
    for row in hierarchy_rows(images, teacher, start, count):
        buffer = io.BytesIO()
        Image.fromarray(visuals.hierarchy_strip(row, wanted_px)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


@st.cache_data(show_spinner=False, max_entries=32)
def run_folders(root: str, run_id: str, stamp: tuple) -> data.RunFolders:
    return data.run_folders(root, run_id)


@st.cache_data(show_spinner=False, max_entries=8)
def saved_edits(root: str, stamp: tuple) -> pd.DataFrame:
    return data.load_edits(root)


@st.cache_resource(show_spinner="Loading the run's generators and decoder ...", max_entries=4)
def _models(decoder: str, generators: tuple[str, ...], stamps: tuple):
    from dashboards.edit_service import load_models   # torch is imported only when a page needs models

    return load_models(data.RunFolders("", None, None, None, Path(decoder), tuple(map(Path, generators)), None))


def models(root: str, run_id: str):
    """A run's models, cached by their checkpoint files (the same checkpoints serve every run that reused them)."""
    folders = run_folders(root, run_id, tables_stamp(root))
    if folders.decoder is None or not folders.generators:
        raise FileNotFoundError(f"run {run_id} names no decoder or generators in its report")
    checkpoints = [folders.decoder / "decoder.safetensors"] + [g / "generator.safetensors" for g in folders.generators]
    stamps = tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in checkpoints)
    return _models(str(folders.decoder), tuple(map(str, folders.generators)), stamps)
