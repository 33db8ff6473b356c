"""bench/generators_scaling.py end to end on CPU processes (gloo): the launches, the loop's own step
timings, the efficiency figure and its merge into generators.json. Its numbers say nothing about GPUs."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_two_process_run_gives_the_efficiency_of_its_own_timings_and_keeps_other_figures(tmp_path):
    kept = {"figures": {"mfu": {"value": 0.5, "unit": "fraction"}}, "commit": "abc"}
    (tmp_path / "generators.json").write_text(json.dumps(kept))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "generators_scaling.py"), "--cpu", "--gpus", "2",
                          "--preset", "tiny", "--batch", "4", "--grid", "4", "--token-dim", "8", "--steps", "2",
                          "--warmup", "1", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    detail = json.loads((tmp_path / "generators_scaling.json").read_text())
    runs = detail["runs"]
    assert set(runs) == {"1", "1-ddp", "2"}
    assert [runs[r]["processes"] for r in ("1", "1-ddp", "2")] == [1, 1, 2]
    assert [runs[r]["ddp"] for r in ("1", "1-ddp", "2")] == [False, True, True]
    assert runs["2"]["global_batch"] == 2 * runs["1"]["global_batch"] == 8
    for result in runs.values():
        assert result["step_s"] > 0 and abs(result["img_per_s"] - result["global_batch"] / result["step_s"]) < 1e-6
    expected = runs["2"]["img_per_s"] / (2 * runs["1"]["img_per_s"])
    merged = json.loads((tmp_path / "generators.json").read_text())
    assert abs(merged["figures"]["scaling_efficiency_2gpu"]["value"] - expected) < 1e-4
    assert merged["figures"]["mfu"] == kept["figures"]["mfu"] and merged["commit"] == "abc"   # the 1-GPU bench's
    assert merged["figures"]["scaling_efficiency_2gpu"]["machine"].endswith("no GPU")
