"""What every page shares: the root check (a message, never a stack trace) and picture sizing."""
from __future__ import annotations

import numpy as np
import streamlit as st

from dashboards import cache, data
from dashboards.visuals import upscale

SHOW_PX = 168   # images are 56-224 px; enlarge small ones (nearest neighbour) so tokens stay visible


def usable_root(root: str) -> bool:
    problem = data.root_problem(root)
    if problem:
        st.warning(problem)
        return False
    return True


def run_ids(root: str) -> list[str]:
    overview = cache.runs_overview(root, cache.tables_stamp(root))
    return list(overview.run_id) if len(overview) else []


def evaluated_runs(root: str) -> list[str]:
    """Runs whose report names a complete evaluation folder (trajectories to show or edit)."""
    stamp = cache.tables_stamp(root)
    out = []
    for run_id in run_ids(root):
        folders = cache.run_folders(root, run_id, stamp)
        if folders.evaluation is not None and (folders.evaluation / "trajectories.zarr").exists():
            out.append(run_id)
    return out


def big(image: np.ndarray) -> np.ndarray:
    return upscale(image, SHOW_PX) if image.shape[0] < SHOW_PX else image
