"""Trajectory viewer: a stored trajectory's decoded image per level, region overlays, PCA of the canvases."""
from __future__ import annotations

import streamlit as st

from dashboards import cache, data
from dashboards.views.common import run_ids, show, usable_root
from dashboards.visuals import overlay


def render(root: str) -> None:
    if not usable_root(root):
        return
    sources = cache.trajectory_sources(root, cache.tables_stamp(root) + cache.edits_stamp(root))
    if not sources:
        st.warning(f"No stored trajectories under `{root}`: no complete `evaluate-*` folder yet. "
                   f"Run `tf evaluate --root {root}`.")
        return
    names = list(sources)
    wanted = st.query_params.get("run")   # a link from the runs page names the run: its evaluation's samples
    if wanted and "traj_source" not in st.session_state:
        folders = cache.run_folders(root, wanted, cache.tables_stamp(root)) if wanted in run_ids(root) else None
        if folders is not None and folders.evaluation is not None:
            named = [n for n in names if n.startswith(f"{folders.evaluation.name} / trajectories")]
            if named:
                st.session_state["traj_source"] = named[0]
    source = st.selectbox("Trajectory store", names, key="traj_source")
    store = sources[source]
    ids = cache.trajectory_ids(store, cache.store_stamp(store))
    if not ids:
        st.warning("This store holds no trajectories.")
        return
    trajectory_id = st.selectbox("Trajectory", ids, key="traj_id")
    shown = st.columns(2)
    show_regions = shown[0].toggle("Region overlays (the level's partition in colours)", key="traj_overlay")
    show_pca = shown[1].toggle("PCA of the latent canvas", value=True, key="traj_pca")
    trajectory = cache.trajectory(store, trajectory_id, cache.store_stamp(store))
    parent = f", parent `{trajectory.parent}`" if trajectory.parent else ""
    st.caption(f"`{trajectory_id}`: seed {trajectory.seed}, label {trajectory.label}{parent}. "
               "Columns are levels 0..L-1, coarse to fine; the last level is the full latent.")
    levels = len(trajectory.images)
    columns = st.columns(levels)
    pca = cache.pca(store, trajectory_id, trajectory.images.shape[1], cache.store_stamp(store)) if show_pca else None
    for level, column in enumerate(columns):
        image = trajectory.images[level]
        if show_regions:
            image = overlay(image, data.partition_of_level(trajectory.regions, level))
        show(column, image, f"level {level} decoded")
        if pca is not None:
            show(column, pca[level], f"level {level} canvas PCA")
