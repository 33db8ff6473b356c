"""Edit playground: pick a trajectory, a level, a region (click the token grid or pick an id) and a source,
run the edit, see it next to the original with its locality and preservation numbers; it is saved as an edit object."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from dashboards import cache, data
from dashboards.token_grid import token_grid
from dashboards.views.common import evaluated_runs, number, show, usable_root
from dashboards.visuals import colour_partition, overlay

SOURCES = {"token_exchange": "another trajectory's tokens (token exchange)",
           "region_mean": "the region mean (of the chosen trajectory over the region)"}
LABELS = {"locality_latent": "locality (latent)", "locality_pixel": "locality (pixels)",
          "preservation_psnr_outside": "PSNR outside (dB)", "preservation_ssim_outside": "SSIM outside",
          "preservation_coarse_identical": "coarser levels identical", "adherence": "adherence",
          "adherence_baseline": "adherence (unedited baseline)"}


def _pick_region(region: int) -> None:
    st.session_state["edit_region"] = region


def render(root: str) -> None:
    if not usable_root(root):
        return
    runs = evaluated_runs(root)
    if not runs:
        st.warning(f"No run under `{root}` has stored trajectories to edit. Run `tf evaluate --root {root}`.")
        return
    run_id = st.selectbox("Run", runs, key="edit_run_id")
    folders = cache.run_folders(root, run_id, cache.tables_stamp(root))
    store = str(folders.evaluation / "trajectories.zarr")
    ids = cache.trajectory_ids(store, cache.store_stamp(store))
    if len(ids) < 2:
        st.warning("Editing needs at least two stored trajectories (a parent and a source).")
        return
    pick = st.columns(3)
    parent_id = pick[0].selectbox("Trajectory", ids, key="edit_parent")
    parent = cache.trajectory(store, parent_id, cache.store_stamp(store))
    levels = len(parent.images)
    level = pick[1].selectbox("Level l*", list(range(levels)), index=min(1, levels - 1), key="edit_level")
    partition = data.partition_of_level(parent.regions, level)
    present = [int(r) for r in np.unique(partition)]
    if st.session_state.get("edit_region") not in present:
        st.session_state["edit_region"] = present[-1]   # an object region rather than the background
    region = pick[2].selectbox("Region id", present, key="edit_region")

    grid_col, view_col = st.columns([3, 2])
    with grid_col:
        st.caption("Token grid (region id per token); click a token to edit its region.")
        token_grid(partition, region, key="edit_token_grid", on_pick=_pick_region)
    highlighted = overlay(parent.images[-1], np.where(partition == region, partition, 0))
    show(view_col, highlighted, f"{parent_id}, region {region} of level {level}")
    show(view_col, colour_partition(partition, parent.images.shape[1]), f"level {level} partition")

    source_col, donor_col = st.columns(2)
    source = source_col.radio("Source", list(SOURCES), format_func=SOURCES.get, key="edit_source")
    donors = [t for t in ids if t != parent_id] if source == "token_exchange" else ids
    if st.session_state.get("edit_donor") not in donors:
        st.session_state["edit_donor"] = donors[0]
    donor = donor_col.selectbox("Source trajectory", donors, key="edit_donor")
    if st.button("Run edit", type="primary", key="edit_run"):
        from dashboards.edit_service import EditRequest, run_edit, save_edit

        request = EditRequest(Path(store), parent_id, int(level), int(region), source, donor)
        with st.spinner("Editing and re-sampling the finer levels ..."):
            try:
                result = run_edit(cache.models(root, run_id), request)
                save_edit(root, run_id, result)
                st.session_state["edit_result"] = result
            except (ValueError, KeyError, FileNotFoundError) as error:
                st.error(f"The edit could not run: {error}")
    result = st.session_state.get("edit_result")
    if result is not None and result.request.store == Path(store):
        _show_result(root, result)
    saved = cache.saved_edits(root, cache.edits_stamp(root))
    # Drawn only while open (a rerun on opening): even a closed expander's table makes the browser load and
    # draw a data grid, the only one on this page (measured with saved edits: 2.1 s -> 1.7 s to a new tab's content).
    saved_box = st.expander(f"Edit objects saved under this root ({len(saved)})", key="edit_saved",
                            on_change="rerun")
    if saved_box.open and len(saved):
        saved_box.dataframe(saved, hide_index=True)
    # Load the run's models once the page is drawn, while the user picks a region: the first edit is then quick.
    try:
        cache.models(root, run_id)
    except FileNotFoundError as error:
        st.warning(f"Edits need the run's checkpoints: {error}")


def _show_result(root: str, result) -> None:
    """Heading, numbers, then pictures: the pictures come last and carry the edit id, so a reader (or the
    browser test) that sees the new edited picture knows the numbers above it are the new ones too."""
    request = result.request
    edit_id = result.record.get("edit_id", "")
    st.subheader(f"Edit {edit_id}")
    st.caption(f"{request.parent}, level {request.level}, region {request.region}, source {request.source} "
               f"from {request.donor}; {result.seconds:.2f} s. Saved to "
               f"`{Path(root) / 'dashboard-edits' / edit_id}`.")
    items = list(result.numbers.items())
    for start in range(0, len(items), 4):   # four to a row, so the numbers are never cut off
        for column, (name, value) in zip(st.columns(4), items[start:start + 4]):
            column.metric(LABELS.get(name, name), number(value))
    st.caption("Locality: change outside the region / change inside (lower is better). Preservation: PSNR/SSIM of "
               "the decoded image outside the region, and whether the levels above l* stayed bit-identical.")
    before, after = st.columns(2)
    show(before, result.original[-1], "original (final image)")
    show(after, result.edited[-1], f"edited (final image) {edit_id}")
    rows = st.columns(len(result.edited))
    for level, column in enumerate(rows):
        show(column, result.original[level], f"L{level} original")
        show(column, result.edited[level], f"L{level} edited")
