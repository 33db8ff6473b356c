"""Where the configured generator training step spends its GPU time: the product's own loop
(models.generator.train_loop.train_generator) with the config's optimiser, EMAs, batch split and compile,
on synthetic data held on the device.

    python3 bench/train_profile.py [--config configs/imagenet.yaml] [--set KEY=VALUE ...] [--steps 8] [--out DIR]

1. Trains `--steps` steps at level 1 (a middle level: regions and conditions). With `--host-latents` the
   latents stay on the host in their stored dtype and are gathered through pinned buffers, as the train stage
   does when they exceed models.generator.train_loop.DEVICE_RESIDENT_SHARE of the GPU's memory (50,000 B-sized
   latents on an H100); without it they are on the device, as on an H200. Step times come from the
   loop's own per-step callback, after the first `--warmup` steps (the compile); MFU as the train stage
   records it (tasks.train.stage.StepClock: the model's training FLOPs a sample, 989 TFLOP/s).
2. torch.profiler over two steps of that run: GPU milliseconds per step by kernel family
   (bench/step_profile.py's families) and the idle gaps between kernels.
3. On the trained state, with the last step's gradients in place: the optimiser step(s), the EMA updates
   and the gradient norm alone, each timed with CUDA events (what a step spends outside the model).
Writes <out>/train_profile.json (DESIGN §7 shape: figures, machine, commit, command; the profile beside). On the
CPU it runs the same code uncompiled (for the suite; its figures say nothing about GPUs).

    python3 bench/train_profile.py --combine DIR --out OUT

reads DIR/*/train_profile.json of processes that ran at once on one GPU (bench/gpu_session.sh TP_PROCS=12: as
issue 30's proof trains its 12 runs) and writes OUT/train_profile_concurrent.json: each one's step time and
the img/s of all of them together.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.generators import bench_model  # noqa: E402
from bench.generators_scaling import synthetic_data  # noqa: E402
from bench.results_io import write_result  # noqa: E402
from bench.step_profile import family, idle_gaps  # noqa: E402
import models.generator.train_loop as train_loop  # noqa: E402
from models.generator.train_loop import gradient_norm, train_generator  # noqa: E402
from storage.config import load_config  # noqa: E402
from tasks.plan import generator_config, generator_optim, objective_config  # noqa: E402
from tasks.train.stage import StepClock  # noqa: E402


def timed_ms(run, repeats: int, device: str) -> float:
    """Milliseconds a call of `run` takes on `device` (CUDA events; wall clock on the CPU), after one untimed."""
    run()
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats
    began = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - began) * 1e3 / repeats


class StepProfiler:
    """The loop's per-step callback: the train stage's StepClock, and torch.profiler over the two steps before
    the last (the callback runs one step late, when that step's stats are read: between two calls lies one
    step)."""

    def __init__(self, steps: int, batch: int, warmup: int, device: str):
        self.clock = StepClock(steps, batch, skip=warmup)
        self.first, self.last = steps - 4, steps - 2
        activities = [torch.profiler.ProfilerActivity.CUDA if device.startswith("cuda")
                      else torch.profiler.ProfilerActivity.CPU]
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiled = 0

    def __call__(self, step: int, stats: dict) -> None:
        self.clock.on_step(step)
        if step == self.first:
            self.profiler.start()
        elif step == self.last:
            self.profiler.stop()
            self.profiled = self.last - self.first


def kernel_report(profiler, steps: int, cuda: bool) -> dict:
    """Milliseconds a step by kernel (on the CPU: by operator, host time) and by family."""
    kernels: dict[str, float] = {}
    for event in profiler.key_averages():
        us = (getattr(event, "self_device_time_total", 0.0) if cuda else event.self_cpu_time_total) or 0.0
        if us > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + us / 1e3 / steps
    families: dict[str, float] = {}
    for name, ms in kernels.items():
        families[family(name)] = families.get(family(name), 0.0) + ms
    return {"gpu_ms_per_step": round(sum(kernels.values()), 2), **idle_gaps(profiler, steps),
            "families_ms": {k: round(v, 2) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {k[:160]: round(v, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:30]}}


def combine(folder: Path, out: str) -> Path:
    """One result from the train_profile.json of processes that shared the GPU (their step times side by side)."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*/train_profile.json"))]
    if not runs:
        raise SystemExit(f"no */train_profile.json under {folder}")
    steps = [r["figures"]["step_s"]["value"] for r in runs]
    batch = runs[0]["settings"]["batch_size"]
    figures = {"processes": (len(runs), "processes that trained at once on one GPU"),
               "step_s_mean": (round(sum(steps) / len(steps), 5), f"s a step of {batch} images, mean over processes"),
               "step_s_max": (max(steps), "s a step, the slowest process"),
               "img_per_s_total": (round(sum(batch / s for s in steps), 1), "img/s of all processes together")}
    before = [r["figures"]["before_timed_steps_s"]["value"] for r in runs if "before_timed_steps_s" in r["figures"]]
    if before:   # the processes compile at once, sharing the host's cores
        figures["before_timed_steps_s_max"] = (max(before), "s before the timed steps (compile, warm-up), the slowest")
    return write_result("train_profile_concurrent", figures,
                        {"settings": runs[0]["settings"], "process_commands": [r["command"] for r in runs],
                         "step_s": steps}, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/imagenet.yaml")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the step time (the compile)")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--token-dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5, help="calls per isolated timing")
    parser.add_argument("--host-latents", action="store_true",
                        help="latents left on the host, gathered through pinned buffers (an H100 with 50k latents)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--combine", default=None, help="a folder of processes' results: combine them and stop")
    args = parser.parse_args()
    if args.combine:
        print(combine(Path(args.combine), args.out).read_text(), flush=True)
        return
    if args.steps < max(args.warmup + 1, 5):
        raise SystemExit("--steps must exceed --warmup and be at least 5 (two profiled steps before the last)")
    cfg = load_config(args.config, [*args.sets, f"generator.steps={args.steps}", "generator.warmup_steps=0"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dit = generator_config(cfg, args.grid, args.token_dim, 1000)
    torch.manual_seed(0)
    model = bench_model(dit, device)
    optim = generator_optim(cfg, seed=0)
    objective = objective_config(cfg)
    data = synthetic_data(dit, 2 * optim.batch_size, device)
    if args.host_latents:   # stored as the encoder writes them: float16, or float32 as bfloat16 reads back
        train_loop.DEVICE_RESIDENT_SHARE = 0.0   # the rest (labels, ids, statistics) still moves to the device
        stored = torch.float16 if cfg.encoder.dtype == "float16" else torch.float32
        data = dataclasses.replace(data, tokens=data.tokens.to("cpu", stored))
    clock = StepProfiler(args.steps, optim.batch_size, args.warmup, device)
    state = train_generator(model, data, 1, objective, optim, device, on_step=clock)
    flops = model.training_flops_per_sample(objective.v_tangent)
    rates = clock.clock.rates(device, flops)   # as the train stage records them (MFU on an H100 / H200 only)
    params = [p for p in state.model.parameters() if p.requires_grad]
    with torch.no_grad():
        outside = {
            "optimizer_ms": timed_ms(lambda: [o.step() for o in state.optimizers], args.repeats, device),
            "emas_ms": timed_ms(lambda: [e.update(state.model, state.step) for e in state.emas], args.repeats, device),
            "grad_norm_ms": timed_ms(lambda: gradient_norm(params, optim.grad_clip), args.repeats, device),
        }
    timed = rates["timed_steps"]
    figures = {
        "step_s": (rates["step_s"], f"s a step of {optim.batch_size} images, after {args.warmup} steps, "
                                    f"over {timed} (the train stage's StepClock)"),
        "img_per_s": (rates["train_img_per_s"], "img/s"),
        "before_timed_steps_s": (round(clock.clock.marks["start"] - clock.clock.began, 2),
                                 f"s from the loop's start to the end of step {args.warmup} (the compile, warm-up)"),
        **({"mfu": (rates["mfu"], rates["mfu_unit"])} if "mfu" in rates else {}),
        **{name: (round(ms, 3), "ms alone on the trained state (CUDA events; on the CPU wall time)")
           for name, ms in outside.items()},
    }
    profile = kernel_report(clock.profiler, max(clock.profiled, 1), device == "cuda")
    if "gpu_idle_ms_per_step" in profile:
        figures["gpu_idle_ms_per_step"] = (profile["gpu_idle_ms_per_step"], "ms a step between kernels (profiled)")
    settings = {"optimizer": optim.optimizer, "batch_size": optim.batch_size, "device_batch": optim.device_batch,
                "compile": optim.compile, "compile_tuning": optim.compile_tuning, "emas": len(state.emas),
                "preset": cfg.generator.preset, "latents": "host (pinned gathers)" if args.host_latents else "device",
                # processes at once on one GPU take turns in time slices unless CUDA MPS runs (gpu_session.sh MPS=1)
                "gpu_sharing": "mps" if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") else "time slices"}
    path = write_result("train_profile", figures, {"settings": settings, "flops_per_sample": flops,
                                                    "timed_steps": timed, "profiled_steps": clock.profiled,
                                                    **profile}, args.out)
    body = json.loads(path.read_text())
    print(json.dumps({"figures": body["figures"], "families_ms": body["families_ms"]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
