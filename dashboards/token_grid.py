"""The edit playground's token grid as one element: a Streamlit v2 component whose few lines of JS draw one
HTML button per token (labelled with its region id); a click sends that token's region id back to Python.

Why not one st.button per token: every Streamlit element costs the browser main-thread time when a page
opens; the 64 buttons made the edit playground's first content about 0.17 s slower than this grid, which
costs about as much as no grid at all. (An Altair heatmap with a point selection is one element too, but
loading the chart library ate most of the gain.) Each button carries data-cell="<row>_<column>" (what
dashboards/browser.py clicks); the selected region's tokens have the class "selected".
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import streamlit as st

_JS = """
export default function(component) {
    const { data, parentElement, setTriggerValue } = component;
    let grid = parentElement.querySelector(".token-grid");
    if (!grid) {
        grid = document.createElement("div");
        grid.className = "token-grid";
        parentElement.appendChild(grid);
    }
    grid.style.gridTemplateColumns = `repeat(${data.ids[0].length}, minmax(0, 1fr))`;
    grid.replaceChildren(...data.ids.flatMap((row, y) => row.map((region, x) => {
        const cell = document.createElement("button");
        cell.type = "button";
        cell.textContent = region;
        cell.dataset.cell = `${y}_${x}`;
        cell.title = `token (${y}, ${x}): region ${region}`;
        if (region === data.selected) cell.classList.add("selected");
        cell.onclick = () => setTriggerValue("picked", region);
        return cell;
    })));
}
"""

# Streamlit's secondary and primary button looks, from the theme's CSS variables.
_CSS = """
.token-grid { display: grid; gap: 0.5rem; }
button {
    font: inherit; min-height: 2.5rem; padding: 0.25rem 0; border-radius: 0.5rem; cursor: pointer;
    color: var(--st-text-color, #31333f); background: var(--st-background-color, #fff);
    border: 1px solid var(--st-border-color, rgba(49, 51, 63, 0.2));
}
button:hover { border-color: var(--st-primary-color, #ff4b4b); color: var(--st-primary-color, #ff4b4b); }
button.selected {
    color: #fff; background: var(--st-primary-color, #ff4b4b); border-color: var(--st-primary-color, #ff4b4b);
}
"""

_component = st.components.v2.component("tf_token_grid", js=_JS, css=_CSS)


def token_grid(ids: np.ndarray, selected: int, key: str, on_pick: Callable[[int], None]) -> None:
    """Draw the grid of region ids [g, g] with `selected`'s tokens highlighted; a click calls on_pick(region)
    before the rerun it starts (so on_pick may set the state of widgets drawn above the grid)."""

    def picked() -> None:
        on_pick(int(st.session_state[key]["picked"]))

    _component(data={"ids": np.asarray(ids).astype(int).tolist(), "selected": int(selected)}, key=key,
               on_picked_change=picked)
