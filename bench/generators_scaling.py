"""Multi-GPU scaling of generator training: the real training loop on 1 GPU and under torchrun/DDP.

    python3 bench/generators_scaling.py --gpus 1,2 --out bench/results

Runs models/generator/train_loop.train_generator (the path of `tasks.train.ddp`: bf16 autocast, compile,
the kernel tangent pass, AdamW, clipping, one EMA) on synthetic data held on the GPU, with the
same per-GPU batch at every GPU count (weak scaling: the global batch grows with the GPUs):
  - "1":     one process, no DDP (train_loop compiles the whole loss as one graph);
  - "1-ddp": one process wrapped in DDP (the multi-GPU code path on one GPU: shows what the
             split compile costs apart from communication);
  - "N":     torchrun, N processes, DDP over NCCL.
Step times come from the loop's own per-step callback (it reads the step's stats back, so every
step ends synchronised); the first `--warmup` steps (compiles) are left out.
scaling_efficiency_<N>gpu = global img/s on N GPUs / (N x img/s of "1"), merged into
<out>/generators.json next to the single-GPU figures; the details go to generators_scaling.json.
Needs only torch (+ triton) and the config (pydantic): no Prefect, Dask or Zarr. `--cpu` runs the same launches as CPU
processes over gloo, uncompiled (for tests of the bench itself; its figures say nothing about GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.generators import bench_model, make_batch  # noqa: E402
from bench.results_io import merge_result, write_result  # noqa: E402
from models.generator.dit import dit_config  # noqa: E402
from models.generator.train_loop import LevelData, train_generator  # noqa: E402
from storage.config import TFConfig  # noqa: E402
from tasks.plan import generator_optim, objective_config  # noqa: E402


def synthetic_data(cfg, rows: int, device: str) -> LevelData:
    """A middle level's data of `rows` samples: make_batch's tokens (as latents, statistics 0 and 1) and
    region ids, its condition from a coarser partition of the same ids."""
    import torch

    batch = make_batch(cfg, rows, device)
    channels = batch["z"].shape[-1]
    zeros, ones = torch.zeros(channels, device=device), torch.ones(channels, device=device)
    return LevelData(batch["z"], zeros, ones, batch["label"], batch["regions"], batch["regions"] // 2)


def worker(args) -> None:
    """One process of a run (under torchrun when --ddp): trains, then rank 0 writes its timings."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.backends.cuda.matmul.allow_tf32 = True
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu:
        device = "cpu"
    else:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    rank, world, wrap = 0, 1, None
    if args.ddp:
        dist.init_process_group("gloo" if args.cpu else "nccl", timeout=timedelta(minutes=20))
        rank, world = dist.get_rank(), dist.get_world_size()
        wrap = DistributedDataParallel if args.cpu else (lambda m: DistributedDataParallel(m, device_ids=[local]))
    cfg = dit_config(args.preset, token_dim=args.token_dim, grid=args.grid, num_classes=1000, num_levels=4)
    torch.manual_seed(0)   # same start on every rank (DDP broadcasts rank 0's anyway)
    model = bench_model(cfg, device)
    global_batch = args.batch * world
    data = synthetic_data(cfg, 2 * global_batch, device)
    train = TFConfig(generator={"steps": args.warmup + args.steps, "batch_size": global_batch, "warmup_steps": 1,
                                "compile": not args.cpu, "compile_tuning": args.compile_tuning,
                                "jvp_attention": "kernel", "ema_kind": "constant", "ema_halflives_kimg": []})
    optim = generator_optim(train, seed=0)   # one EMA, the constant 0.999 (what this bench has always timed)
    ends: list[float] = []
    if not args.cpu:
        torch.cuda.reset_peak_memory_stats(device)
    train_generator(model, data, 1, objective_config(train), optim, device,
                    on_step=lambda step, stats: ends.append(time.perf_counter()), rank=rank, world=world, wrap=wrap)
    step_s = (ends[-1] - ends[args.warmup - 1]) / args.steps
    if rank == 0:
        result = {"processes": world, "ddp": bool(args.ddp), "per_gpu_batch": args.batch, "global_batch": global_batch,
                  "step_s": step_s, "img_per_s": global_batch / step_s, "first_steps_s": ends[args.warmup - 1] - ends[0],
                  "peak_gpu_mem_gib": None if args.cpu else torch.cuda.max_memory_allocated(device) / 2 ** 30}
        Path(args.result).write_text(json.dumps(result))
    if args.ddp:
        dist.destroy_process_group()


def launch(run: str, args, scratch: Path) -> dict:
    """Starts one run ("1", "1-ddp" or a GPU count) in fresh processes; returns rank 0's timings."""
    result = scratch / f"scaling_{run}.json"
    common = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--preset", args.preset,
              "--batch", str(args.batch), "--grid", str(args.grid), "--token-dim", str(args.token_dim),
              "--steps", str(args.steps), "--warmup", str(args.warmup)] \
        + (["--cpu"] if args.cpu else []) + (["--compile-tuning"] if args.compile_tuning else [])
    if run == "1":
        command = [sys.executable] + common
    else:
        processes = 1 if run == "1-ddp" else int(run)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
            + common + ["--ddp"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", default="1,2", help="GPU counts; 1 is the reference")
    parser.add_argument("--no-single-ddp", action="store_true", help="skip the one-process DDP run")
    parser.add_argument("--preset", default="B")
    parser.add_argument("--batch", type=int, default=256, help="per-GPU batch")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--token-dim", type=int, default=768)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (compiles)")
    parser.add_argument("--compile-tuning", action="store_true", help="generator.compile_tuning in the runs")
    parser.add_argument("--cpu", action="store_true", help="CPU processes over gloo (tests of the bench)")
    parser.add_argument("--out", default=None, help="folder for the JSON results (default bench/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ddp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:   # the timed steps are measured from the end of the last warm-up step
        parser.error("--warmup must be at least 1")
    if args.worker:
        return worker(args)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("bench/generators_scaling.py measures GPU training: no CUDA device (--cpu to try it on CPUs)")
    counts = [int(n) for n in args.gpus.split(",")]
    if not args.cpu and max(counts) > torch.cuda.device_count():
        raise SystemExit(f"asked for {max(counts)} GPUs, {torch.cuda.device_count()} visible")
    folder = Path(args.out) if args.out else Path(__file__).parent / "results"
    folder.mkdir(parents=True, exist_ok=True)
    runs = ["1"] + ([] if args.no_single_ddp else ["1-ddp"]) + [str(n) for n in counts if n > 1]
    with tempfile.TemporaryDirectory() as scratch:
        results = {run: launch(run, args, Path(scratch)) for run in runs}
    single = results["1"]["img_per_s"]
    figures = {}
    unit = "process" if args.cpu else "GPU"
    for n in (n for n in counts if n > 1):
        figures[f"scaling_efficiency_{n}gpu"] = (round(results[str(n)]["img_per_s"] / (n * single), 4),
                                                 f"{n}-{unit} img/s / ({n} x 1-{unit} img/s), per-{unit} batch {args.batch}")
        figures[f"train_img_per_s_{n}gpu"] = (round(results[str(n)]["img_per_s"], 1), "img/s")
    figures["train_loop_img_per_s_1gpu"] = (round(single, 1), "img/s")
    detail = {"config": {"preset": args.preset, "per_gpu_batch": args.batch, "tokens": args.grid ** 2,
                         "token_dim": args.token_dim, "steps": args.steps, "warmup": args.warmup,
                         "compile_tuning": args.compile_tuning, "torch": torch.__version__,
                         "backend": "gloo (CPU)" if args.cpu else "nccl " + ".".join(map(str, torch.cuda.nccl.version()))},
              "runs": results}
    print(write_result("generators_scaling", figures, detail, folder).read_text())
    merge_result("generators", {k: v for k, v in figures.items() if k.startswith("scaling_")},
                 {"scaling_detail": "generators_scaling.json"}, folder)


if __name__ == "__main__":
    main()
