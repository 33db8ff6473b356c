"""Runs page: every run with stage keys, encoder weights, computed/reused stages and headline metrics;
two runs side by side with per-level plots."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboards import cache, data
from dashboards.views.common import usable_root

# session state: the per-level plots were put off once (the page's first run), the put-off fragment has run once
PLOTS_SEEN, PLOTS_NEXT = "runs_plots_seen", "runs_plots_next"


def render(root: str) -> None:
    if not usable_root(root):
        return
    stamp = cache.tables_stamp(root)
    overview = cache.runs_overview(root, stamp)
    st.caption(f"{len(overview)} runs under `{root}`. A run that reused `evaluate` shows the metrics of the run "
               "that computed it (column metrics_from).")
    headline = ["run_id", "timestamp", "encoder_weights", "computed", "reused", "metrics_from"]
    headline += [label for label, _ in data.HEADLINE]
    st.subheader("Runs")
    st.dataframe(overview[headline], hide_index=True, key="runs_table")
    with st.expander("Stage keys of every run"):
        keys = ["run_id"] + [c for c in overview.columns if c.startswith("key:")]
        st.dataframe(overview[keys], hide_index=True)

    st.subheader("Compare two runs")
    ids = list(overview.run_id)
    left, right = st.columns(2)
    run_a = left.selectbox("Run A", ids, index=min(1, len(ids) - 1), key="run_a")
    run_b = right.selectbox("Run B", ids, index=0, key="run_b")
    table = cache.comparison(root, run_a, run_b, stamp)
    if table.empty:
        st.info("Neither run has metric rows with status ok.")
    else:
        st.dataframe(table, hide_index=True, key="compare_table")
    chosen = tuple(dict.fromkeys([run_a, run_b]))
    if st.session_state.get(PLOTS_SEEN):
        per_level_plots(root, chosen, stamp)
    else:
        # The session's first run of this page: the tables above are its content and are drawn first; the
        # three charts (Vega, the costliest elements for the browser to draw) come with the next run.
        st.session_state[PLOTS_SEEN] = True
        _plots_next_run()


@st.fragment(run_every=0.4)
def _plots_next_run() -> None:
    """Called by the first run: a line saying the plots come next. The browser runs this fragment again when
    its interval is up (the timer fires once the page above is drawn), and that run asks for a run of the
    whole page, which draws the plots; a full run also stops the fragment's timer."""
    if not st.session_state.get(PLOTS_NEXT):
        st.session_state[PLOTS_NEXT] = True
        st.caption("Drawing the per-level plots ...")
        return
    st.rerun()


def per_level_plots(root: str, chosen: tuple[str, ...], stamp: tuple) -> None:
    for title, metrics in data.PLOTS.items():
        st.markdown(f"**{title}** (per level, one bar per run)")
        frames = {metric: cache.per_level(root, chosen, metric, stamp) for metric in metrics}
        measured = [metric for metric, frame in frames.items() if not frame.empty]
        if len(measured) < len(metrics):
            st.caption("not measured: " + ", ".join(m for m in metrics if m not in measured))
        if measured:
            long = pd.concat([frames[metric].reset_index().melt(id_vars="level", var_name="run", value_name="value")
                              .assign(metric=metric) for metric in measured], ignore_index=True)
            st.vega_lite_chart(long, group_bars(measured), width="content")


def group_bars(metrics: list[str]) -> dict:
    """One chart per metric group, a panel per metric (its own scales), bars per level with one per run side by
    side. One Vega view per group rather than per metric: each view is its own embed and layout for the browser
    (7 charts -> 3 took about 0.2 s off the page's first content, whose draw they overlap). A plain Vega-Lite
    spec: building it through Altair costs about 60 ms a chart on every rerun."""
    return {"facet": {"field": "metric", "type": "nominal", "sort": metrics, "title": None},
            "columns": len(metrics), "resolve": {"scale": {"x": "independent", "y": "independent"}},
            "spec": {"width": {"step": 44}, "height": 160, "mark": {"type": "bar", "tooltip": True},
                     "encoding": {"x": {"field": "level", "type": "ordinal"}, "xOffset": {"field": "run"},
                                  "y": {"field": "value", "type": "quantitative", "title": None},
                                  "color": {"field": "run", "type": "nominal", "legend": {"orient": "bottom"}}}}}
