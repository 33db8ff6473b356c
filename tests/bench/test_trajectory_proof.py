"""bench/trajectory_proof.py: runs where prefect, dask and pydantic are not installed (the GPU box), its
figures put every level and the own regions where they belong, its clock leaves the pauses out."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))

from bench.proof_figures import outline, proof_figure, redraw  # noqa: E402
from bench.trajectory_proof import BudgetClock  # noqa: E402


def test_imports_without_prefect_or_dask():
    # the GPU box has no Prefect: the stage tasks fall back to plain functions; dask is imported when a stage runs
    blocked = ("prefect", "dask", "distributed")
    code = (f"import sys, runpy\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
            "runpy.run_path('bench/trajectory_proof.py', run_name='check')\n"
            f"assert not [m for m in sys.modules if m.split('.')[0] in {blocked!r} and sys.modules[m] is not None]\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_outline_marks_exactly_the_borders_between_regions():
    image = np.zeros((8, 8, 3), np.uint8)
    ids = np.array([[0, 0, 1, 1]] * 4)          # 4 x 4 tokens of 2 px: one vertical border after column 1
    out = outline(image, ids, grid=4)
    red = (out == (255, 0, 0)).all(-1)
    assert red[:, 3:5].all() and red.sum() == 8 * 2   # the two pixel columns either side of the border
    assert not outline(image, np.zeros((4, 4)), grid=4).any()


def test_proof_figure_puts_levels_in_columns_and_the_flat_final_last(tmp_path):
    size, levels = 16, 4
    staged = {"images": np.full((2, levels, size, size, 3), 50, np.uint8),
              "regions": np.zeros((2, levels - 1, 16), np.int64), "flat": False}
    flat = {"images": np.full((2, 1, size, size, 3), 200, np.uint8), "regions": np.zeros((2, 1, 0)), "flat": True}
    proof_figure(tmp_path / "f.png", {"flat": flat, "tf": staged}, grid=4, rows=2)
    image = np.asarray(Image.open(tmp_path / "f.png").convert("RGB"))
    pad, top, left = 2, 16, 150
    assert image.shape == (top + 4 * (size + pad), left + levels * (size + pad), 3)
    last = left + (levels - 1) * (size + pad)
    assert (image[top:top + size, last:last + size] == 200).all()          # flat: its final in the last column
    assert (image[top:top + size, left:left + size] == 255).all()          # and nothing at level 0
    row = top + 2 * (size + pad)
    for level in range(levels):                                            # TF: every level drawn
        x = left + level * (size + pad)
        assert (image[row:row + size, x:x + size] == 50).all()


def test_redraw_draws_the_curves_from_the_json(tmp_path):
    body = {"setup": {"grid": 4}, "arms": {
        "flat": {"curve": {"0.5": {"seconds": 60, "fd_scenes": 30.0}, "1.0": {"seconds": 120, "fd_scenes": 20.0}}},
        "tf": {"curve": {"0.5": {"seconds": 60, "fd_scenes": 50.0}, "1.0": {"seconds": 120, "fd_scenes": 25.0}}}}}
    path = tmp_path / "trajectory_proof.json"
    path.write_text(json.dumps(body))
    redraw(path, tmp_path / "traj.png", tmp_path / "curves.png", rows=2)
    curves = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB"))
    assert ((curves == (31, 119, 180)).all(-1)).sum() > 50      # the second series' colour is drawn
    assert not (tmp_path / "traj.png").exists()                   # no kept trajectories beside the JSON


def test_budget_clock_leaves_paused_time_out():
    clock = BudgetClock(torch.device("cpu"))
    began = time.perf_counter()
    clock.start()
    time.sleep(0.05)
    clock.pause()
    time.sleep(0.2)
    clock.start()
    time.sleep(0.05)
    elapsed, wall = clock.elapsed(), time.perf_counter() - began
    # both running stretches count; the 0.2 s pause does not (bounds that hold however late sleep wakes)
    assert 0.1 <= elapsed <= wall - 0.2
