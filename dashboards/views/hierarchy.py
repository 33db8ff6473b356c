"""Hierarchy browser: real images with their teacher partition per level; on the scenes, the ground truth and ARI."""
from __future__ import annotations

import streamlit as st

from dashboards import cache
from dashboards.views.common import run_ids, show, usable_root
from dashboards.visuals import colour_partition

PER_PAGE = 4


def render(root: str) -> None:
    if not usable_root(root):
        return
    stamp = cache.tables_stamp(root)
    runs = [r for r in run_ids(root) if (f := cache.run_folders(root, r, stamp)).teacher and f.teacher.exists()
            and f.images and f.images.exists()]
    if not runs:
        st.warning("No run under this root has both an image store and a teacher store yet.")
        return
    run_id = st.selectbox("Run (its image and teacher stores)", runs, key="hier_run")
    folders = cache.run_folders(root, run_id, stamp)
    start = st.number_input("First image", min_value=0, value=0, step=PER_PAGE, key="hier_start")
    rows = cache.hierarchy_rows(str(folders.images), str(folders.teacher), int(start), PER_PAGE)
    if not rows:
        st.info("No images from there on.")
        return
    st.caption(f"teacher `{folders.teacher.name}`, images `{folders.images.name}`. Each row: the image, the teacher "
               "partition of levels 0..L-2 (background dark grey), then the ground truth of the same levels "
               "with the per-image ARI (teacher vs truth) when the store has ground-truth masks.")
    for row in rows:
        teacher, truth = row["teacher"], row["truth"]
        panels = 1 + len(teacher) + (len(truth) if truth is not None else 0)
        columns = st.columns(panels)
        size = max(row["image"].shape[0], 1)
        show(columns[0], row["image"], f"#{row['index']} {row['id']}")
        for level, ids in enumerate(teacher):
            show(columns[1 + level], colour_partition(ids, size), f"teacher L{level}")
        if truth is not None:
            for level, ids in enumerate(truth):
                show(columns[1 + len(teacher) + level], colour_partition(ids, size),
                     f"truth L{level}, ARI {row['ari'][level]:.2f}")
