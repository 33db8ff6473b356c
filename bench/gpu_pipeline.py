"""The acceptance run: `tf pipeline` on ImageNet-shaped data, as a user runs it, every figure from what the
product records.

    python bench/gpu_pipeline.py --images 50000 --classes 100 --out $OUT [--set key=value ...]

1. Writes ImageNet-shaped JPEGs (bench/dataplane.py's generator: class folders n<8 digits>/, 500x375 and the
   like, ~100 KB each) and a DINOv2-B/14-reg weights file in timm's real format (model.safetensors of
   `vit_base_patch14_reg4_dinov2` at its native 518 px, random values: the figures are speed, not quality).
2. Runs `tf pipeline --config configs/imagenet.yaml` in a subprocess, with Prefect's ephemeral API and the
   local Dask cluster the CLI starts, changing only sizes with --set (source path, weights, steps, samples,
   and the Inception weights off, so FID/KID/IS are rows marked skipped).
3. Reads the run back from tables/runs (pandas): per stage the seconds, images/s, peak GPU memory and GPU busy
   share the stage recorded, the generators' own MFU, the encode stage's phase times; JPEG to teacher store
   img/s = images / (encode + hierarchy seconds). Writes <out>/gpu_pipeline.json (DESIGN §7 shape) and copies
   the evaluation's grid.png beside it.

tests/bench/test_gpu_pipeline.py runs it at a toy size on the CPU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import results_io  # noqa: E402
from bench.dataplane import make_jpegs  # noqa: E402

ENCODER = "vit_base_patch14_reg4_dinov2"


def write_weights(path: Path, model: str = ENCODER) -> Path:
    """A weights file in timm's hub format (model.safetensors), random values, native image size."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model(model, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def run_pipeline(root: Path, train: Path, weights: Path, sets: list[str], log: Path, config: str,
                 time_limit: float | None = None) -> tuple[float, str]:
    """`tf pipeline` as a subprocess (the installed CLI), its output to `log`; returns (wall seconds, how it
    ended: "completed", "exit N" or "stopped at the time limit"). Past `time_limit` seconds its whole process
    group (the Dask cluster included) is stopped, so the stages it finished can still be read back."""
    tf = shutil.which("tf", path=str(Path(sys.executable).parent)) or shutil.which("tf")
    command = [tf] if tf else [sys.executable, "-m", "flows.cli"]
    command += ["pipeline", "--config", config, "--root", str(root), "--set", f"source.path={train}",
                "--set", f"encoder.weights={weights}", "--set", "evaluate.inception_weights=null"]
    for item in sets:
        command += ["--set", item]
    env = {**os.environ, "PREFECT_HOME": str(root.parent / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)   # the ephemeral API, as `tf` alone starts it
    began = time.perf_counter()
    with open(log, "w") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                 start_new_session=True)
        try:
            code = child.wait(timeout=time_limit)
            ended = "completed" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            ended = f"stopped at the time limit ({time_limit:g} s)"
    if ended != "completed":
        print(f"tf pipeline {ended}; the end of {log}:\n{log.read_text()[-4000:]}", flush=True)
    return time.perf_counter() - began, ended


def recorded(root: Path) -> tuple[dict | None, list[dict]]:
    """The newest pipeline run's row (None while it has none) and its stage rows from tables/runs, each stage
    with its parsed details."""
    from storage.tables import load_runs, run_details

    runs = load_runs(root)
    runs = runs[runs.flow == "pipeline"]
    if runs.empty:   # stopped before its first stage was recorded
        return None, []
    run_id = sorted(runs.run_id.unique())[-1]
    rows = runs[runs.run_id == run_id].to_dict("records")
    run = next((row for row in rows if row["kind"] == "run"), None)   # None: stopped mid-run
    return run, [{**row, **run_details(row)} for row in rows if row["kind"] == "stage"]


def figures_of(rows: list[dict], images: int) -> tuple[dict, dict]:
    """DESIGN §7 figures and the per-stage table, from the rows the run recorded."""
    by_stage = {row["stage"]: row for row in rows}
    figures: dict[str, tuple[float, str]] = {}
    table = {}
    for row in rows:
        keep = {k: row[k] for k in ("status", "duration_s", "images_per_s", "gpu_peak_mem_gib", "gpu_busy_share",
                                    "train_img_per_s", "step_s", "mfu", "timed_steps", "after_last_step_s",
                                    "stats_pass_s", "stats_phases_s", "phases_s", "timing_s", "channel_stats",
                                    "teacher", "rows", "wall_s", "load_s", "decoded_by", "verified")
                if k in row and row[k] == row[k]}
        table[row["stage"]] = keep
        figures[f"{row['stage']}_s"] = (round(float(row["duration_s"]), 2), f"s ({row['status']})")
    encode, hierarchy = by_stage.get("encode"), by_stage.get("hierarchy")
    if encode is not None and hierarchy is not None and encode["status"] == "computed":   # reused: no throughput
        seconds = float(encode["duration_s"]) + float(hierarchy["duration_s"])
        figures["jpeg_to_teacher_img_per_s"] = (round(images / seconds, 1),
                                                "img/s, JPEG to teacher store (encode + hierarchy stage seconds)")
    generators = [row for row in rows if row["stage"].startswith("train-L") or row["stage"] == "train-shared"]
    mfus = [row["mfu"] for row in generators if isinstance(row.get("mfu"), (int, float))]
    if mfus:
        figures["generator_mfu_min"] = (round(min(mfus), 4), "fraction of 989 TFLOP/s, lowest generator stage")
        figures["generator_mfu_mean"] = (round(sum(mfus) / len(mfus), 4), "fraction of 989 TFLOP/s, mean")
    if "evaluate" in by_stage and by_stage["evaluate"]["status"] == "computed":
        figures["evaluate_img_per_s"] = (by_stage["evaluate"].get("images_per_s", 0.0), "samples/s, whole stage")
    peaks = [row["gpu_peak_mem_gib"] for row in rows if isinstance(row.get("gpu_peak_mem_gib"), (int, float))]
    if peaks:
        figures["peak_gpu_mem_gib"] = (max(peaks), "GiB, the most any stage allocated")
    return figures, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--config", default="configs/imagenet.yaml")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                        help="sizes for the run (generator.steps, evaluate.num_samples, ...), passed to tf as --set")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--jpeg-workers", type=int, default=os.cpu_count() or 4)
    parser.add_argument("--model", default=ENCODER, help="the encoder the weights file is written for")
    parser.add_argument("--out", default=None, help="folder for gpu_pipeline.json and grid.png (default bench/results)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for this whole bench (JPEGs included): tf pipeline is stopped 30 s before, "
                             "and the stages it finished are reported")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tf-gpu-pipeline-"))
    began = time.perf_counter()
    _, _, mean_bytes = make_jpegs(work / "train", args.images, args.classes, args.jpeg_workers)
    jpeg_s = time.perf_counter() - began
    weights = write_weights(work / "model.safetensors", args.model)
    print(f"{args.images} JPEGs ({mean_bytes / 1024:.0f} KB mean) in {jpeg_s:.1f}s; weights {weights}", flush=True)
    out = Path(args.out) if args.out else None
    log = (out or work) / "pipeline.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    left = None if args.time_limit is None else max(1.0, args.time_limit - 30 - (time.perf_counter() - began))
    # a root left by a run killed before its clean-up would be reused, its stages timed at milliseconds
    shutil.rmtree(work / "root", ignore_errors=True)
    wall, ended = run_pipeline(work / "root", work / "train", weights, args.sets, log, args.config, left)
    run, rows = recorded(work / "root")
    run_id = run["run_id"] if run is not None else None
    figures, table = figures_of(rows, args.images)
    if run is not None:
        figures["run_total_s"] = (round(float(run["duration_s"]), 1), f"s, the run's own record ({run['status']})")
        figures["run_overhead_s"] = (round(float(run["overhead_s"]), 1), "s of the run outside any stage")
    figures["pipeline_wall_s"] = (round(wall, 1), "s, tf pipeline as a command (Prefect and Dask start-up included)")
    grid = next((Path(row["path"]) / "grid.png" for row in rows if row["stage"] == "evaluate"), None)
    if grid is not None and grid.exists() and out is not None:
        shutil.copy(grid, out / "grid.png")
    extra = {"run_id": run_id, "pipeline": ended, "stages": table, "sets": args.sets, "config": args.config,
             "images": args.images, "classes": args.classes, "mean_jpeg_kb": round(mean_bytes / 1024, 1),
             "jpeg_write_s": round(jpeg_s, 1),
             # the product sees a weights file and labels it by its hash: say here what the file holds
             "encoder_weights": f"{args.model} in timm's safetensors layout, random values (written by this bench): "
                                "throughput figures only; the grid and the metrics are of a random encoder"}
    path = results_io.write_result("gpu_pipeline", figures, extra, out)
    print(path.read_text(), flush=True)
    if ended != "completed":
        raise SystemExit(f"tf pipeline {ended}: the stages it finished are in {path}")


if __name__ == "__main__":
    main()
