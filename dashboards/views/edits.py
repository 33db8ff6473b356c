"""Edit playground: pick a trajectory, a level, a region (click the token grid or pick it; the object by default)
and a source; run the edit and see it beside the controls, next to the original, with every number labelled;
it is saved as an edit object."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from dashboards import cache, data
from dashboards.token_grid import token_grid
from dashboards.views.common import evaluated_runs, number, show, usable_root
from dashboards.visuals import colour_partition, overlay

SOURCES = {"token_exchange": "another trajectory's tokens (token exchange)",
           "region_mean": "a region mean (one vector: a trajectory's mean token over the region)"}
# Each number's label, and what it means (the tooltip and the table under "What the numbers mean"), in display order.
NUMBERS = {
    "locality_latent": ("locality, latent", "change outside the region ÷ change inside it, on the final latent "
                        "tokens: 0 means the edit stayed inside the region (lower is better)"),
    "locality_pixel": ("locality, pixels", "the same on the decoded final image's pixels (lower is better)"),
    "preservation_psnr_outside": ("PSNR outside (dB)", "the decoded final image outside the region, edited vs "
                                  "original: higher is better preserved; 100 means identical"),
    "preservation_ssim_outside": ("SSIM outside", "structural similarity outside the region, edited vs original: "
                                  "1 means identical"),
    "preservation_coarse_identical": ("coarser levels kept", "yes: the levels above l* are bit-identical to the "
                                      "original's, as an edit at l* must leave them"),
    "adherence": ("adherence", "cosine similarity, inside the region, between the edited trajectory's final "
                  "latent and the source tokens put in at l*: 1 means the final follows the source exactly"),
    "adherence_baseline": ("adherence, unedited", "the unedited baseline: the same cosine for the original "
                           "trajectory, i.e. what adherence would be if the edit did nothing"),
    "adherence_gain": ("adherence gain", "adherence minus the unedited baseline: how far the edit moved the final "
                       "toward the source (above 0: the edit took hold)"),
}
PREVIEW_PX = 240   # the preview and the result's final images: large enough to see the region


def _pick_region(region: int) -> None:
    st.session_state["edit_region"] = region


def source_words(source: str, donor: str, parent: str, level: int, region: int) -> str:
    """Where the edit's new tokens come from, in words."""
    if source == "region_mean":
        whose = "the trajectory's own" if donor == parent else f"{donor}'s"
        return f"the mean of {whose} level-{level} tokens over region {region}, one vector filling the region"
    return f"{donor}'s level-{level} tokens in region {region}"


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
    controls, outcome = st.columns([4, 6], gap="medium")
    with controls:
        pick = st.columns([3, 2, 4])
        parent_id = pick[0].selectbox("Trajectory", ids, key="edit_parent")
        parent = cache.trajectory(store, parent_id, cache.store_stamp(store))
        levels = len(parent.images)
        level = pick[1].selectbox("Level l*", list(range(levels)), index=min(1, levels - 1), key="edit_level")
        labels, default = data.region_labels(parent.regions, level)
        if st.session_state.get("edit_region") not in labels:
            st.session_state["edit_region"] = default   # the object (its largest part below level 0)
        region = pick[2].selectbox("Region", list(labels), format_func=labels.get, key="edit_region")
        partition = data.partition_of_level(parent.regions, level)
        st.caption("Token grid (region id per token); click a token to edit its region.")
        token_grid(partition, region, key="edit_token_grid", on_pick=_pick_region)
        source_col, donor_col = st.columns(2)
        source = source_col.radio("Source", list(SOURCES), format_func=SOURCES.get, key="edit_source")
        donors = [t for t in ids if t != parent_id] if source == "token_exchange" else ids
        if st.session_state.get("edit_donor") not in donors:
            st.session_state["edit_donor"] = donors[0]
        donor = donor_col.selectbox("Source trajectory" if source == "token_exchange" else "Region mean of",
                                    donors, key="edit_donor")
        st.caption(f"New tokens: {source_words(source, donor, parent_id, level, region)}; the finer levels are "
                   "re-sampled from the same noises.")
        clicked = st.button("Run edit", type="primary", key="edit_run")
    if clicked:
        from dashboards.edit_service import EditRequest, run_edit, save_edit

        request = EditRequest(Path(store), parent_id, int(level), int(region), source, donor)
        with outcome, st.spinner("Editing and re-sampling the finer levels ..."):
            try:
                result = run_edit(cache.models(root, run_id), request)
                save_edit(root, run_id, result)
                st.session_state["edit_result"] = result
            except (ValueError, KeyError, FileNotFoundError) as error:
                st.error(f"The edit could not run: {error}")
    result = st.session_state.get("edit_result")
    shown = result is not None and result.request.store == Path(store)
    with outcome:
        if shown:
            _show_result(root, result)
        else:
            st.subheader("Before the edit")
            highlighted = overlay(parent.images[-1], np.where(partition == region, partition, 0))
            left, right = st.columns(2)
            show(left, highlighted, f"{parent_id}, region {region} of level {level}", PREVIEW_PX // 2 + 60)
            show(right, colour_partition(partition, parent.images.shape[1]), f"level {level} partition",
                 PREVIEW_PX // 2 + 60)
            st.info("Run edit: the edited image and its numbers appear here.")
    if shown:
        _show_levels(result)
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
    """Heading, what was edited, numbers, then the final images: the pictures come after the numbers and carry
    the edit id, so a reader (or the browser test) that sees the new edited picture knows the numbers above it
    are the new ones too."""
    request = result.request
    edit_id = result.record.get("edit_id", "")
    st.subheader(f"Edit {edit_id}")
    source = source_words(request.source, request.donor, request.parent, request.level, request.region)
    st.caption(f"{request.parent}, level {request.level}, region {request.region}; new tokens: {source}. "
               f"{result.seconds:.2f} s. Saved to `{Path(root) / 'dashboard-edits' / edit_id}`.")
    numbers = dict(result.numbers)
    if {"adherence", "adherence_baseline"} <= set(numbers):
        numbers["adherence_gain"] = numbers["adherence"] - numbers["adherence_baseline"]
    items = [(name, numbers[name]) for name in NUMBERS if name in numbers]
    for start in range(0, len(items), 3):   # three to a row, so no label is cut; each means its tooltip
        for column, (name, value) in zip(st.columns(3), items[start:start + 3]):
            label, meaning = NUMBERS[name]
            shown = ("yes" if value == 1.0 else "no") if name == "preservation_coarse_identical" else number(value)
            column.metric(label, shown, help=meaning)
    before, after = st.columns(2)
    show(before, result.original[-1], "original (final image)", PREVIEW_PX // 2 + 60)
    show(after, result.edited[-1], f"edited (final image) {edit_id}", PREVIEW_PX // 2 + 60)
    st.caption("Locality: change outside ÷ inside the region (0: the edit stayed inside). Adherence: cosine, in the "
               "region, of the edited final to the source tokens; unedited: the same before the edit; gain: their "
               "difference. Hover a number, or open \"What the numbers mean\" below.")


def _show_levels(result) -> None:
    """Every level, original above edited, and what each number means."""
    with st.expander("What the numbers mean"):
        st.table({"number": [label for label, _ in NUMBERS.values()],
                  "meaning": [meaning for _, meaning in NUMBERS.values()]})
    rows = st.columns(len(result.edited))
    for level, column in enumerate(rows):
        show(column, result.original[level], f"L{level} original")
        show(column, result.edited[level], f"L{level} edited")
