"""Full pipeline run vs the re-run after an h_sub change, on the built-in scenes.

    .venv/bin/python bench/rerun.py [--config configs/scenes.yaml] [--root /tmp/tf-rerun]

Writes bench/results/rerun.json: full_run_s, rerun_s, rerun_ratio (and re-encoded images, which must be 0).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from bench.results_io import write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/scenes.yaml")
    parser.add_argument("--root", default=None)
    parser.add_argument("--h-sub", type=float, default=0.3)
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="tf-rerun-"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    from flows.stages import pipeline_flow
    from storage.config import load_config

    base = load_config(args.config)
    started = time.perf_counter()
    pipeline_flow(config=base, root=str(root), run_id="bench-full")
    full = time.perf_counter() - started
    changed = load_config(args.config, [f"hierarchy.cuts=[{base.hierarchy.cuts[0]}, {args.h_sub}]"])
    started = time.perf_counter()
    rerun = pipeline_flow(config=changed, root=str(root), run_id="bench-rerun")
    rerun_s = time.perf_counter() - started
    statuses = {s["stage"]: s["status"] for s in rerun["stages"]}
    reencoded = 0 if statuses["encode"] == "reused" else base.source.num_images
    path = write_result("rerun", {"full_run_s": (round(full, 2), "s"), "rerun_s": (round(rerun_s, 2), "s"),
                                  "rerun_ratio": (round(rerun_s / full, 4), "ratio"),
                                  "reencoded_images": (reencoded, "images")},
                        {"rerun_stages": statuses, "config": args.config})
    print(path.read_text())


if __name__ == "__main__":
    main()
