"""Hierarchy browser: real images with their teacher partition per level; on the scenes, the ground truth and ARI."""
from __future__ import annotations

import streamlit as st

from dashboards import cache
from dashboards.views.common import SHOW_PX, run_ids, usable_root

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
    wanted = st.query_params.get("run")   # a link from the runs page names the run
    if wanted in runs and "hier_run" not in st.session_state:
        st.session_state["hier_run"] = wanted
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
    # One picture per row, its panels titled inside it: the browser draws 4 image elements, not 4 x 7.
    strips = cache.hierarchy_strips(str(folders.images), str(folders.teacher), int(start), PER_PAGE, SHOW_PX)
    for row, strip in zip(rows, strips):
        st.image(strip, caption=row_caption(row))


def row_caption(row: dict) -> str:
    """The row's panels in words, with the ARI per level as text too."""
    levels = len(row["teacher"])
    caption = f"#{row['index']} {row['id']}: teacher L0-L{levels - 1}"
    if row["truth"] is not None:
        caption += f"; truth L0-L{len(row['truth']) - 1}, ARI " + ", ".join(f"{ari:.2f}" for ari in row["ari"])
    return caption
