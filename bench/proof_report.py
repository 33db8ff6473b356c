"""The proof bench's arithmetic (bench/trajectory_proof.py), apart from its training and scoring so that
tests check it on made-up numbers: when a run's budget stops doubling, and the per-arm figures over
seeds (mean and spread, FD-scenes as a ratio to flat, plan adherence as a share of the judge's own
ceiling, the change of FD-scenes from half to full budget, diverged runs as rows).

A unit is one arm trained with one seed: {"arm", "seed", "points": [{"steps", "row", ...}, ...],
"stopped", "diverged_at_step"}, each point one budget (total generator steps) and its scores (`row`:
metric name -> value, as summarise makes them), the budgets doubling from one point to the next.
"""
from __future__ import annotations

import math

import numpy as np

PLAN_LEVELS = (0, 1, 2)
PER_ARM = ("fd_scenes", "class_accuracy", "nesting_L0", "nesting_L1") + \
    tuple(f"judge_plan_miou_L{level}" for level in PLAN_LEVELS)


def relative_change(before: float, after: float) -> float:
    """|after - before| / after: how much the doubling that led to `after` moved the figure."""
    return abs(after - before) / max(abs(after), 1e-12)


def half_to_full(points: list[dict], metric: str = "fd_scenes") -> float | None:
    """The change of `metric` between the last two budgets (half and full), None with fewer than two."""
    if len(points) < 2 or metric not in points[-1]["row"] or metric not in points[-2]["row"]:
        return None
    return relative_change(points[-2]["row"][metric], points[-1]["row"][metric])


def next_budget(points: list[dict], target: float, max_steps: int) -> tuple[int | None, str]:
    """(the next budget, "") while the doubling goes on, else (None, why it stops): "converged" when the
    last doubling moved FD-scenes by less than `target`, "max_steps" when the next would pass the cap."""
    change = half_to_full(points)
    if change is not None and change < target:
        return None, "converged"
    following = 2 * points[-1]["steps"]
    if following > max_steps:
        return None, "max_steps"
    return following, ""


def fits(now: float, deadline: float | None, steps_to_add: int, seconds_per_step: float, eval_seconds: float) -> bool:
    """Whether training `steps_to_add` more steps and scoring them ends before `deadline` (None: no limit)."""
    return deadline is None or now + steps_to_add * seconds_per_step + eval_seconds <= deadline


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and spread (sample standard deviation; 0 for one value) over seeds."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def arm_figures(units: list[dict], ceiling: list[float]) -> tuple[dict[str, tuple[float, str]], dict]:
    """Figures per arm over its seeds: `{arm}_{metric}` (mean) and `{arm}_{metric}_spread` for every
    PER_ARM metric, `{arm}_judge_plan_miou_L{l}_of_ceiling` (over the judge's own mIoU on real scenes
    against their ground truth, `ceiling[l]`), `{arm}_fd_scenes_over_flat` (per seed against the flat
    run of the same seed; with its spread and max), `{arm}_fd_scenes_change_half_to_full` (mean, max),
    `{arm}_steps`, and counts of seeds scored, converged and diverged (`{arm}_diverged_at_step`: the
    earliest). Also the per-arm detail for the JSON (per seed finals and every budget point)."""
    figures: dict[str, tuple[float, str]] = {}
    detail: dict[str, dict] = {}
    flat_fd = {u["seed"]: u["points"][-1]["row"].get("fd_scenes") for u in units if u["arm"] == "flat" and u["points"]}
    for arm in dict.fromkeys(u["arm"] for u in units):
        mine = [u for u in units if u["arm"] == arm]
        scored = [u for u in mine if u["points"]]
        finals = {u["seed"]: dict(u["points"][-1]["row"], steps=u["points"][-1]["steps"]) for u in scored}
        for u in scored:
            for level, top in enumerate(ceiling):
                value = finals[u["seed"]].get(f"judge_plan_miou_L{level}")
                if value is not None and top > 0:
                    finals[u["seed"]][f"judge_plan_miou_L{level}_of_ceiling"] = value / top
            change = half_to_full(u["points"])
            if change is not None:
                finals[u["seed"]]["fd_scenes_change_half_to_full"] = change
            if arm != "flat" and flat_fd.get(u["seed"]) and "fd_scenes" in finals[u["seed"]]:
                finals[u["seed"]]["fd_scenes_over_flat"] = finals[u["seed"]]["fd_scenes"] / flat_fd[u["seed"]]
        metrics = list(PER_ARM) + [f"judge_plan_miou_L{level}_of_ceiling" for level in range(len(ceiling))] + \
            ["fd_scenes_over_flat", "fd_scenes_change_half_to_full", "steps"]
        for metric in metrics:
            values = [f[metric] for f in finals.values() if metric in f and f[metric] is not None
                      and math.isfinite(f[metric])]
            if not values:
                continue
            mean, spread = _stats(values)
            unit = "FD" if metric == "fd_scenes" else "ratio" if "over_flat" in metric or "change" in metric \
                or "of_ceiling" in metric else "steps" if metric == "steps" else "score"
            figures[f"{arm}_{metric}"] = (round(mean, 5), unit)
            figures[f"{arm}_{metric}_spread"] = (round(spread, 5), unit)
            if metric in ("fd_scenes_over_flat", "fd_scenes_change_half_to_full"):
                figures[f"{arm}_{metric}_max"] = (round(max(values), 5), unit)
        diverged = [u["diverged_at_step"] for u in mine if u.get("diverged_at_step") is not None]
        figures[f"{arm}_seeds_scored"] = (len(scored), "count")
        figures[f"{arm}_seeds_converged"] = (sum(u["stopped"] == "converged" for u in mine), "count")
        figures[f"{arm}_seeds_diverged"] = (len(diverged), "count")
        if diverged:
            figures[f"{arm}_diverged_at_step"] = (min(diverged), "step")
        detail[arm] = {"seeds": {str(u["seed"]): {"stopped": u["stopped"], "diverged_at_step": u.get("diverged_at_step"),
                                                  "final": finals.get(u["seed"]),
                                                  "points": [{"steps": p["steps"], **p["row"],
                                                              **{k: p[k] for k in ("train_s", "eval_s") if k in p}}
                                                             for p in u["points"]]}
                                 for u in mine},
                       "curve": curve(mine)}
    for level, top in enumerate(ceiling):
        figures[f"judge_ceiling_plan_miou_L{level}"] = (round(top, 5), "mIoU")
    return figures, detail


def curve(units: list[dict]) -> dict[str, dict]:
    """FD-scenes at each budget, the mean over the seeds that reached it: {str(steps): {"steps", "fd_scenes", "seeds"}}."""
    at: dict[int, list[float]] = {}
    for u in units:
        for p in u["points"]:
            if "fd_scenes" in p["row"]:
                at.setdefault(p["steps"], []).append(p["row"]["fd_scenes"])
    return {str(steps): {"steps": steps, "fd_scenes": round(float(np.mean(v)), 5), "seeds": len(v)}
            for steps, v in sorted(at.items())}
