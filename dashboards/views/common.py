"""What every page shares: the root check (a message, never a stack trace) and picture sizing."""
from __future__ import annotations

import numpy as np
import streamlit as st

from dashboards import cache
from dashboards.visuals import upscale

SHOW_PX = 168   # images are 56-224 px; enlarge small ones (nearest neighbour) so tokens stay visible


def usable_root(root: str) -> bool:
    problem = cache.root_problem(root, cache.tables_stamp(root))
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
    """Enlarged by a whole factor (crisp token edges) to at least SHOW_PX; `show` draws it SHOW_PX wide."""
    factor = -(-SHOW_PX // image.shape[0])
    return upscale(image, image.shape[0] * factor) if factor > 1 else image


def show(container, image: np.ndarray, caption: str, width: int = SHOW_PX) -> None:
    """Every picture at the same width (SHOW_PX unless told), whatever its caption's length."""
    container.image(big(image), caption=caption, width=width)


def number(value: float) -> str:
    return f"{value:.2e}" if value != 0 and abs(value) < 0.01 else f"{value:.4g}"
