"""The fused encode stage once, by itself, for a sampling profiler to watch (docs/gpu.md).

    py-spy record --threads --idle --format raw -o idle.txt -- python3 bench/encode_profile.py --images 20000
    py-spy record --threads --gil --format raw -o gil.txt -- python3 bench/encode_profile.py --images 20000
    python3 bench/pyspy_summary.py idle.txt --within encode_file_chunks

bench/dataplane.py times the stage among others (two passes, resident batches, the scipy reference); here the
process does nothing else, so a profile of it is the stage's: the JPEGs as dataplane.py writes them (same names
and bytes), the listing, then `tasks.encode.stage.encode_latents` with the hierarchy fused, as `tf pipeline`
runs it. With --runs 2 the stage runs twice on fresh roots (the second warm); the summary's --within picks the
pass's frames out of either. Writes encode_profile.json (each run's stage record) into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.dataplane import _stage_config, fresh_root, make_jpegs, timed  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--config", default="configs/imagenet.yaml")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--runs", type=int, default=1, help="times the stage runs, each on a fresh root")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="folder for encode_profile.json (default: the workdir)")
    args = parser.parse_args(argv)

    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tf-encode-profile-"))
    started = time.perf_counter()
    paths, _, mean_bytes = make_jpegs(workdir / "train", args.images, args.classes, os.cpu_count() or 4)
    print(f"{len(paths)} JPEGs ({mean_bytes / 1024:.0f} KB mean) in {time.perf_counter() - started:.1f}s", flush=True)
    cfg = _stage_config(args.config, workdir / "train", args.sets)
    records = []
    for run in range(args.runs):
        root = str(fresh_root(workdir / "profiled"))
        ingest_images.fn(cfg, root)
        record = timed(encode_latents.fn(cfg, root, with_teacher=True), f"run {run}")
        print(f"run {run}: {record['duration_s']:.1f}s, {record.get('images_per_s', 0):.0f} img/s", flush=True)
        records.append(record)
    fresh_root(workdir / "profiled")   # 20 GB at 50k images: the disk is needed next
    result = {"images": len(paths), "mean_jpeg_kb": round(mean_bytes / 1024, 1), "sets": args.sets,
              "commit": os.environ.get("BENCH_COMMIT", "unknown"), "runs": records}
    out = Path(args.out or workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encode_profile.json").write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
