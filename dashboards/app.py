"""The Trajectory Forcing dashboard (Streamlit). Started by `tf dashboard --root R`.

Pages are chosen in the sidebar; the choice is mirrored in the URL (`?page=runs|trajectories|hierarchy|edit`)
so a page can be opened directly. The root comes from `--root` after `--` on the streamlit command line,
or from TF_DASHBOARD_ROOT (what `tf dashboard` sets).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import streamlit as st

# `streamlit run` puts this folder, not the repository, on sys.path; the package imports need the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboards.gc_freeze import freeze_after_new_imports  # noqa: E402
from dashboards.views import edits, hierarchy, runs, trajectories  # noqa: E402

PAGES = {"runs": ("Runs", runs.render), "trajectories": ("Trajectory viewer", trajectories.render),
         "hierarchy": ("Hierarchy browser", hierarchy.render), "edit": ("Edit playground", edits.render)}


def store_root() -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--root", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:])
    return known.root or os.environ.get("TF_DASHBOARD_ROOT", "")


def main() -> None:
    st.set_page_config(page_title="Trajectory Forcing", layout="wide")
    root = store_root()
    names = list(PAGES)
    wanted = st.query_params.get("page", names[0])
    if "page" not in st.session_state:
        st.session_state["page"] = wanted if wanted in PAGES else names[0]
    page = st.sidebar.radio("Page", names, key="page", format_func=lambda name: PAGES[name][0])
    st.query_params["page"] = page
    st.sidebar.caption(f"root: `{root or '(none)'}`")
    title, render = PAGES[page]
    st.title(title)
    render(root)
    # A page's first visit imports what it needs: freeze what is alive then, so full garbage collections stay short
    # (they walked ~350k objects, 0.15-0.65 s with the whole server waiting, once or twice per page opened).
    freeze_after_new_imports()


main()
