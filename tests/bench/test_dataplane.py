"""bench/dataplane.py's hand-over to a chained pipeline run: the fastest compared settings (fastest_sets), read
by `gpu_session.sh` with GP_FASTEST=1 through `--fastest-of`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.dataplane import fastest_sets

REPO = Path(__file__).resolve().parents[2]


def _result(baseline: float, **compared) -> dict:
    return {"figures": {"encode_stage_img_per_s": {"value": baseline, "unit": "img/s"}}, "compared": compared}


def test_the_fastest_variant_that_beats_the_configured_stage_is_chosen():
    result = _result(2167.0,
                     inline={"sets": ["encoder.decode_ahead=0"], "img_per_s": 3100.0},
                     inline_hw={"sets": ["encoder.decode_ahead=0", "encoder.gpu_decoder=nvimgcodec"],
                                "img_per_s": 3300.0},
                     broken={"sets": ["encoder.hierarchy_graph=true"], "failed": "RuntimeError: capture"})
    assert fastest_sets(result) == ["encoder.decode_ahead=0", "encoder.gpu_decoder=nvimgcodec"]
    slower = _result(2167.0, inline={"sets": ["encoder.decode_ahead=0"], "img_per_s": 1900.0})
    assert fastest_sets(slower) == []   # none beat it: the pipeline runs as configured
    assert fastest_sets(_result(2167.0)) == []
    assert fastest_sets(_result(2167.0, broken={"sets": ["x=1"], "failed": "boom"})) == []


def test_the_command_line_prints_set_flags(tmp_path):
    path = tmp_path / "dataplane.json"
    path.write_text(json.dumps(_result(1.0, a={"sets": ["encoder.decode_ahead=0", "encoder.gpu_decoder=auto"],
                                                "img_per_s": 2.0})))
    done = subprocess.run([sys.executable, "bench/dataplane.py", "--fastest-of", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["--set", "encoder.decode_ahead=0", "--set", "encoder.gpu_decoder=auto"]


def test_a_store_left_by_a_killed_run_is_removed_and_a_reused_stage_is_no_measurement(tmp_path):
    # the H100 call at f17fed5 timed out before its clean-up; the next call reused the fused store and
    # reported 1.5M img/s end to end
    from bench.dataplane import fresh_root, timed

    left = tmp_path / "fused" / "latents-abc"
    left.mkdir(parents=True)
    (left / "zarr.json").write_text("{}")
    assert fresh_root(tmp_path / "fused") == tmp_path / "fused" and not (tmp_path / "fused").exists()
    computed = {"stage": "encode", "status": "computed", "duration_s": 9.9}
    assert timed(computed, "inline") is computed
    with pytest.raises(SystemExit, match="reused, not computed"):
        timed({"stage": "encode", "status": "reused", "duration_s": 0.006, "path": str(left)}, "fused")
