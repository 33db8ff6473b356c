"""bench/proof_report.py: when a run's budget stops doubling, and the per-arm figures over seeds."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2]))

from bench.proof_report import arm_figures, fits, half_to_full, next_budget  # noqa: E402


def point(steps, fd, **row):
    return {"steps": steps, "row": {"fd_scenes": fd, **row}}


def test_the_budget_doubles_until_fd_scenes_moves_less_than_the_target_or_the_cap():
    assert next_budget([point(100, 50.0)], 0.1, 10_000) == (200, "")
    assert next_budget([point(100, 50.0), point(200, 40.0)], 0.1, 10_000) == (400, "")   # moved 25 %
    assert next_budget([point(100, 50.0), point(200, 46.0)], 0.1, 10_000) == (None, "converged")   # 8.7 %
    assert next_budget([point(100, 50.0), point(200, 40.0)], 0.1, 300) == (None, "max_steps")
    assert half_to_full([point(100, 50.0), point(200, 40.0)]) == pytest.approx(0.25)
    assert half_to_full([point(100, 50.0)]) is None


def test_a_point_is_started_only_when_its_training_and_scoring_end_before_the_deadline():
    assert fits(now=0.0, deadline=None, steps_to_add=10**9, seconds_per_step=1.0, eval_seconds=1.0)
    assert fits(now=100.0, deadline=200.0, steps_to_add=80, seconds_per_step=1.0, eval_seconds=20.0)
    assert not fits(now=100.0, deadline=200.0, steps_to_add=80, seconds_per_step=1.0, eval_seconds=21.0)


def test_per_arm_figures_over_seeds_ratio_to_flat_per_seed_ceiling_and_diverged_rows():
    units = [
        {"arm": "flat", "seed": 0, "stopped": "converged", "points": [point(100, 40.0), point(200, 38.0)]},
        {"arm": "flat", "seed": 1, "stopped": "converged", "points": [point(100, 22.0), point(200, 20.0)]},
        {"arm": "tf", "seed": 0, "stopped": "converged",
         "points": [point(100, 50.0), point(200, 19.0, class_accuracy=0.9, judge_plan_miou_L0=0.45, nesting_L0=1.0)]},
        {"arm": "tf", "seed": 1, "stopped": "time_limit",
         "points": [point(200, 15.0, class_accuracy=0.7, judge_plan_miou_L0=0.36, nesting_L0=0.9)]},
        {"arm": "tf", "seed": 2, "stopped": "diverged", "diverged_at_step": 57, "points": []},
        {"arm": "tf", "seed": 3, "stopped": "diverged", "diverged_at_step": 12, "points": []},
    ]
    figures, detail = arm_figures(units, ceiling=[0.9, 0.8])
    value = {k: v[0] for k, v in figures.items()}
    assert value["flat_fd_scenes"] == 29.0 and value["flat_fd_scenes_spread"] == pytest.approx(math.sqrt(162), abs=1e-4)
    # per seed against the flat run of the same seed: 19 / 38 and 15 / 20, not the means' ratio
    assert value["tf_fd_scenes_over_flat"] == pytest.approx((0.5 + 0.75) / 2)
    assert value["tf_fd_scenes_over_flat_max"] == 0.75
    assert value["tf_judge_plan_miou_L0_of_ceiling"] == pytest.approx((0.5 + 0.4) / 2)
    assert value["judge_ceiling_plan_miou_L0"] == 0.9 and value["tf_class_accuracy"] == pytest.approx(0.8)
    assert value["tf_fd_scenes_change_half_to_full"] == pytest.approx(31 / 19, abs=1e-5)   # one seed had two points
    assert value["flat_fd_scenes_change_half_to_full_max"] == pytest.approx(2 / 20)
    assert (value["tf_seeds_scored"], value["tf_seeds_converged"], value["tf_seeds_diverged"]) == (2, 1, 2)
    assert value["tf_diverged_at_step"] == 12 and "flat_diverged_at_step" not in figures
    assert detail["tf"]["seeds"]["2"]["diverged_at_step"] == 57 and detail["tf"]["seeds"]["2"]["final"] is None
    assert detail["tf"]["curve"] == {"100": {"steps": 100, "fd_scenes": 50.0, "seeds": 1},
                                     "200": {"steps": 200, "fd_scenes": 17.0, "seeds": 2}}
