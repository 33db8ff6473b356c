"""bench/trajectory_proof.py: runs where prefect, dask and pydantic are not installed (the GPU box), its
figures put every level and the own regions where they belong, its cached phases key on every argument
that changes them, and a run that diverges becomes a row, not a crash."""
import dataclasses
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
from bench import trajectory_proof as proof  # noqa: E402


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


# A setting unlike the default for every argument that may change a result: an argument added to the
# bench must be listed here or in NOT_RESULT_ARGS, or the first assertion below fails.
CHANGED = {"device": "cuda", "data_seed": "1", "image_size": "56", "images": "100", "scene_seed": "1", "chunk": "64",
           "encoder": "vit_base_patch14_reg4_dinov2", "encoder_weights": "/w.pth", "preset": "B", "width": "64",
           "depth": "4", "head_depth": "2", "heads": "2", "batch_size": "64", "optimizer": "adamw", "lr": "3e-4",
           "warmup_steps": "5", "grad_clip": "1.0", "compile": None, "v_tangent": "same", "jvp_attention": "math",
           "cond_noise": "0.5", "decoder_steps": "10", "judge_steps": "10", "judge_holdout": "0.2", "samples": "64",
           "reencode": "8", "structure_samples": "8", "eval_batch": "32", "grid_rows": "2",
           "region_threshold": "0.2", "diagnose": None}


def test_every_cached_phase_keys_on_every_argument_that_changes_it():
    """Issue 29 item 5: `--work W` once reused an arm trained at another lr. A run's train key moves with
    every argument but the where / which / when ones and the evaluation's own; its eval key with those too."""
    base = proof.parse(["--work", "/tmp/w"])
    dests = {a.dest for a in argparse_actions()} - {"help"}
    assert dests == set(CHANGED) | proof.NOT_RESULT_ARGS - {"root"}
    train, evaluation = proof.phase_keys(base, "tf_shared_oracle", 0)
    for dest, value in CHANGED.items():
        flag = "--" + dest.replace("_", "-")
        changed = proof.parse(["--work", "/tmp/w", flag] + ([value] if value is not None else []))
        moved_train, moved_eval = proof.phase_keys(changed, "tf_shared_oracle", 0)
        assert moved_eval != evaluation, dest
        assert (moved_train == train) == (dest in proof.EVAL_ONLY_ARGS), dest   # eval-only: scored anew, not trained
    assert proof.phase_keys(proof.parse(["--work", "/w", "--lr", "5e-4"]), "flat", 0)[0] != \
        proof.phase_keys(proof.parse(["--work", "/w", "--lr", "3e-4"]), "flat", 0)[0]
    assert len({proof.phase_keys(base, arm, seed)[0] for arm in proof.ARMS for seed in (0, 1)}) == 2 * len(proof.ARMS)
    # where things go, which runs, and when to stop change no point's content
    elsewhere = proof.parse(["--work", "/tmp/other", "--arms", "flat", "--seeds", "0", "--time-limit", "60",
                             "--steps", "7", "--max-steps", "9", "--change-target", "0.5", "--workers", "3"])
    assert proof.phase_keys(elsewhere, "tf_shared_oracle", 0) == (train, evaluation)


def argparse_actions():
    """The bench parser's actions (caught as parse() builds it)."""
    import argparse

    captured = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        captured.extend(self._actions)
        return original(self, *a, **k)

    argparse.ArgumentParser.parse_args = capture
    try:
        proof.parse(["--work", "/tmp/w"])
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured


def test_a_diverged_run_is_a_row_and_a_run_past_its_deadline_stops_cleanly(tmp_path):
    """advance() turns the training loop's NonFiniteTraining into ("diverged", its update) and a segment
    that passes the deadline into "time_limit"; a normal segment continues from the saved state."""
    from tasks.train.ddp import synthetic_job

    def job(lr):
        j = synthetic_job(0, tmp_path, steps=100, batch_size=8, optimizer="muon", checkpoint_every=0)
        j.optim = dataclasses.replace(j.optim, lr=lr)
        return j

    cpu = torch.device("cpu")
    trained, stopped, diverged = proof.advance([job(1e3)], None, 100, cpu, None)
    assert trained is None and stopped == "diverged" and 1 <= diverged <= 25
    assert proof.advance([job(1e-3)], None, 4, cpu, time.time() - 1)[1:] == ("time_limit", None)
    first, _, _ = proof.advance([job(1e-3)], None, 2, cpu, None)
    again, stopped, _ = proof.advance([job(1e-3)], first["states"], 4, cpu, None)
    assert stopped == "" and again["states"][0]["meta"]["step"] == 4
