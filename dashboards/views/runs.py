"""Runs page: every run with its status, error, duration and what it computed or reused first (failures marked);
one run's stages, folders, Prefect run, config behind each key and grid; metric trends across runs; two runs
side by side with per-level plots. A routed pipeline's stage runs are folded into it."""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from dashboards import cache, data
from dashboards.views.common import usable_root
from models.evaluation.registry import unit_of

# session state: the charts were put off once (the page's first run), the put-off fragment has run once
PLOTS_SEEN, PLOTS_NEXT = "runs_plots_seen", "runs_plots_next"
LEADING = ["status", "run_id", "started", "duration_s", "error", "computed", "reused", "nothing_new", "flow",
           "overhead_s", "stage_runs", "encoder_weights", "metrics_from"]
COLUMNS = {"status": st.column_config.TextColumn("status", width="small"),
           "started": st.column_config.DatetimeColumn("started (UTC)", format="YYYY-MM-DD HH:mm:ss"),
           "duration_s": st.column_config.NumberColumn("duration", format="%.1f s"),
           "overhead_s": st.column_config.NumberColumn("overhead", format="%.1f s",
                                                       help="seconds outside any stage: checks, imports, "
                                                            "starting stage runs"),
           "error": st.column_config.TextColumn("error", width="large"),
           "nothing_new": st.column_config.TextColumn("nothing new", help="a scheduled evaluation that found "
                                                      "nothing to score (see the run's stages for why)"),
           "stage_runs": st.column_config.TextColumn("stage runs", help="the runs a routed pipeline started for "
                                                     "its stages, folded into it")}


def _marked(frame: pd.DataFrame):
    """Failed runs in red, running ones in amber."""
    colour = {data.STATUS_MARK["failed"]: "background-color: #fbd0cd; color: #8b0000",
              data.STATUS_MARK["running"]: "background-color: #fff4d6"}
    return frame.style.apply(lambda row: [colour.get(row["status"], "")] * len(row), axis=1)


def render(root: str) -> None:
    if not usable_root(root):
        return
    stamp = cache.tables_stamp(root)
    overview = cache.runs_overview(root, stamp)
    failed = int((overview.status == data.STATUS_MARK["failed"]).sum())
    st.caption(f"{len(overview)} runs under `{root}`, newest first; {failed} failed. A routed pipeline's stage runs "
               "are folded into it (column stage runs). A run that reused `evaluate` shows the metrics of the run "
               "that computed it (column metrics_from).")
    st.subheader("Runs")
    headline = LEADING + [label for label, _ in data.HEADLINE]
    st.dataframe(_marked(overview[headline]), hide_index=True, key="runs_table", column_config=COLUMNS)
    with st.expander("Stage keys of every run"):
        keys = ["run_id"] + [c for c in overview.columns if c.startswith("key:")]
        st.dataframe(overview[keys], hide_index=True)

    ids = list(overview.run_id)
    st.subheader("One run")
    run_id = st.selectbox("Run", ids, key="detail_run")
    run_details(root, run_id, overview.set_index("run_id").loc[run_id], stamp)

    st.subheader("Compare two runs")
    pair = data.default_pair(overview)
    left, right = st.columns(2)
    run_a = left.selectbox("Run A", ids, index=ids.index(pair[0]), key="run_a")
    run_b = right.selectbox("Run B", ids, index=ids.index(pair[1]), key="run_b")
    if run_a == run_b:
        st.info("Run A and run B are the same run: pick two runs to see differences.")
    table = cache.comparison(root, run_a, run_b, stamp)
    if table.empty:
        st.info("Neither run has metric rows with status ok.")
    else:
        table.insert(table.columns.get_loc("metric") + 1, "unit", [unit_of(m) for m in table.metric])
        st.dataframe(table, hide_index=True, key="compare_table")
    chosen = tuple(dict.fromkeys([run_a, run_b]))
    if st.session_state.get(PLOTS_SEEN):
        trend_chart(cache.trends(root, stamp))
        per_level_plots(root, chosen, stamp)
    else:
        # The session's first run of this page: the tables above are its content and are drawn first; the
        # charts (Vega, the costliest elements for the browser to draw) come with the next run.
        st.session_state[PLOTS_SEEN] = True
        _plots_next_run()


def run_details(root: str, run_id: str, summary: pd.Series, stamp: tuple) -> None:
    """Status, time and error; its stages (a stage run's marked); where its things are; the settings behind a
    key; the evaluation's grid."""
    cells = st.columns(4)
    cells[0].metric("status", summary.status)
    cells[1].metric("duration", "-" if pd.isna(summary.duration_s) else f"{summary.duration_s:.1f} s")
    cells[2].metric("in stages", f"{summary.stage_s:.1f} s")
    cells[3].metric("overhead", "-" if pd.isna(summary.overhead_s) else f"{summary.overhead_s:.1f} s",
                    help="seconds outside any stage: checks, imports, starting stage runs and waiting for them")
    if summary.error:
        st.error(f"Failed at {summary.failed_stage or 'its start'}: {summary.error}")
    stages = cache.stage_rows(root, run_id, stamp)
    shown = stages[["stage", "status", "duration_s", "started_at", "run_id", "key", "note", "error"]].rename(
        columns={"run_id": "stage run", "duration_s": "seconds", "started_at": "started (UTC)"})
    shown["stage run"] = [r if r != run_id else "" for r in shown["stage run"]]
    st.dataframe(shown, hide_index=True, key="detail_stages",
                 column_config={"seconds": st.column_config.NumberColumn(format="%.1f s")})
    links = cache.run_links(root, run_id, stamp)
    prefect = (f"[Prefect flow run {links['flow_run_id'][:8]}]({links['prefect']})" if links["prefect"] else
               "no Prefect page (it ran with Prefect's ephemeral API)" if links["flow_run_id"] else
               "no Prefect flow run recorded")
    views = f"[trajectory viewer](?page=trajectories&run={run_id})" if "evaluate" in links["folders"] else ""
    if "hierarchy" in links["folders"]:
        views += f"{', ' if views else ''}[hierarchy browser](?page=hierarchy&run={run_id})"
    st.markdown(f"**Links:** {prefect}; {views or 'nothing to view'}; its record `{links['runs_table']}`")
    with st.expander(f"Folders of {run_id}"):
        st.dataframe(pd.DataFrame(list(links["folders"].items()), columns=["stage", "folder"]), hide_index=True)
    keyed = [s for s in dict.fromkeys(stages.stage) if s != "config" and (stages[stages.stage == s].key != "").any()]
    if keyed:
        left, right = st.columns([1, 2])
        stage = left.selectbox("The config behind the key of", keyed, key="detail_key_stage")
        key = stages[stages.stage == stage].key.iloc[-1]
        left.caption(f"`{stage}-{key}` hashes these settings, the keys of the stages before it and a code version "
                     "(storage/keys.py).")
        settings = cache.key_config(root, run_id, stage, stamp)
        right.code(json.dumps(settings, indent=1) if settings else "(not recorded: the run predates _run.json)",
                   language="json")
    if links["grid"] is not None:
        st.image(str(links["grid"]), caption=f"grid.png of {links['grid'].parent.name}: one row per sample, one "
                 "column per level (coarse to fine), decoded", width=480)


@st.fragment(run_every=0.4)
def _plots_next_run() -> None:
    """Called by the first run: a line saying the plots come next. The browser runs this fragment again when
    its interval is up (the timer fires once the page above is drawn), and that run asks for a run of the
    whole page, which draws the plots; a full run also stops the fragment's timer."""
    if not st.session_state.get(PLOTS_NEXT):
        st.session_state[PLOTS_NEXT] = True
        st.caption("Drawing the metric trends and per-level plots ...")
        return
    st.rerun()


def trend_chart(trends: pd.DataFrame) -> None:
    st.markdown("**Metric trends** (one point per evaluation, mean over levels and variants; x: when its run began)")
    if trends.empty:
        st.caption("No run has headline metrics yet.")
        return
    st.vega_lite_chart(trends, trend_lines(list(dict.fromkeys(trends.metric))), width="content")


def axis(metric: str) -> tuple[str, str]:
    """(a panel's title: the metric and how to read it, its y axis title: the unit) from the registry's unit
    text, "<unit>; <reading>"."""
    unit, _, reading = unit_of(metric).rpartition("; ")
    return (f"{metric} ({reading})", unit) if unit else (metric, reading)


def trend_lines(metrics: list[str]) -> dict:
    """A panel per metric (its own y axis, titled with its unit), a point per evaluation joined by a line; two
    panels to a row."""
    panels = [{"transform": [{"filter": {"field": "metric", "equal": metric}}],
               "title": axis(metric)[0], "width": 360, "height": 140,
               "mark": {"type": "line", "point": True, "tooltip": True},
               "encoding": {"x": {"field": "started", "type": "temporal", "title": "run started (UTC)"},
                            "y": {"field": "value", "type": "quantitative", "title": axis(metric)[1],
                                  "scale": {"zero": False}}}} for metric in metrics]
    return {"vconcat": [{"hconcat": panels[i:i + 2]} for i in range(0, len(panels), 2)]}


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
    """One chart per metric group, a panel per metric (its own scales, its y axis titled with its unit), bars per
    level with one per run side by side. Panels are concatenated rather than faceted so each axis has its own
    title. One Vega view per group rather than per metric: each view is its own embed and layout for the
    browser (7 charts -> 3 took about 0.2 s off the page's first content, whose draw they overlap). A plain
    Vega-Lite spec: building it through Altair costs about 60 ms a chart on every rerun."""
    return {"hconcat": [{"transform": [{"filter": {"field": "metric", "equal": metric}}], "title": axis(metric)[0],
                         "width": {"step": 44}, "height": 160, "mark": {"type": "bar", "tooltip": True},
                         "encoding": {"x": {"field": "level", "type": "ordinal", "title": "level (0 = coarsest)"},
                                      "xOffset": {"field": "run"},
                                      "y": {"field": "value", "type": "quantitative", "title": axis(metric)[1]},
                                      "color": {"field": "run", "type": "nominal", "legend": {"orient": "bottom"}}}}
                        for metric in metrics], "resolve": {"scale": {"y": "independent"}}}
