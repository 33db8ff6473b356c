"""bench/results_io.py: a bench's fresh write keeps what another bench merged into the same file, and
nothing else of the old file."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.results_io import merge_result, write_result  # noqa: E402


def test_write_keeps_merged_figures_and_keys_and_replaces_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_COMMIT", "first")
    write_result("g", {"mfu": (0.3, "fraction")}, {"kernel_check": {"err": 1.0}}, tmp_path)
    merge_result("g", {"scaling_efficiency_2gpu": (0.9, "ratio")}, {"scaling_detail": "s.json"}, tmp_path)
    monkeypatch.setenv("BENCH_COMMIT", "second")
    write_result("g", {"mfu": (0.4, "fraction")}, None, tmp_path)   # this run had no kernel check
    body = json.loads((tmp_path / "g.json").read_text())
    assert body["commit"] == "second" and body["figures"]["mfu"] == {"value": 0.4, "unit": "fraction"}
    assert body["figures"]["scaling_efficiency_2gpu"]["value"] == 0.9
    assert body["figures"]["scaling_efficiency_2gpu"]["commit"] == "first"   # names its own run
    assert body["scaling_detail"] == "s.json" and body["merged_keys"] == ["scaling_detail"]
    assert "kernel_check" not in body   # the old run's, not this one's: dropped
    merge_result("g", {"scaling_efficiency_2gpu": (0.95, "ratio")}, None, tmp_path)
    again = json.loads((tmp_path / "g.json").read_text())
    assert again["figures"]["scaling_efficiency_2gpu"]["value"] == 0.95 and again["figures"]["mfu"]["value"] == 0.4
