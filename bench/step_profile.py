"""Where the B-size training step spends its GPU time, by kernel family (torch.profiler).

    python3 bench/step_profile.py --variants plain:compile,kernel:compile --out bench/results

Variants (same synthetic batch and model as bench/generators.py):
  plain   forward of both heads + MSE + backward + AdamW (the reference step);
  kernel  the mean-flow step as the training loop runs it on one GPU (the whole loss compiled as one
          graph: forward, tangent pass reusing the forward's values, and the loss terms).
A suffix ":cudnn" runs SDPA on cuDNN's attention kernels, ":autotune" lets inductor autotune the matmuls
(cuBLAS against Triton templates, which can fuse their epilogues). Each variant's step time, then per family
(gemm, sdpa, jvp-attention, triton fused elementwise, optimizer, other) the GPU milliseconds per step
and the 25 costliest kernels (and the 15 costliest of each family), go to step_profile.json.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench.generators import (H200_BF16_DENSE, add_step_arguments, bench_model, count_flops, make_batch,  # noqa: E402
                              make_step)
from bench.results_io import command_line, commit, machine  # noqa: E402
from models.generator.dit import dit_config  # noqa: E402
from models.generator.train_loop import compile_settings  # noqa: E402
from storage.config import TFConfig  # noqa: E402
from storage.files import atomic_write_text  # noqa: E402
from tasks.plan import generator_optim  # noqa: E402

FAMILIES = (("jvp-attention", ("attention_tangent", "_tangent_kernel")),
            ("sdpa", ("flash", "fmha", "cudnn", "attention", "sdpa")),
            ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "sm90_")),
            ("optimizer", ("multi_tensor", "adam", "foreach")),
            ("triton", ("triton_",)))


def family(name: str) -> str:
    lower = name.lower()
    for label, keys in FAMILIES:
        if any(key in lower for key in keys):
            return label
    return "other"


def idle_gaps(prof, steps: int) -> dict:
    """GPU idle time between kernels over the profiled steps (host stalls, launch latency), and the
    largest gaps with the kernels on either side."""
    try:
        spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                       if str(getattr(e, "device_type", "")).endswith("CUDA") and e.time_range.end > e.time_range.start)
    except Exception as error:   # profiler API differences: report, don't fail the variant
        return {"idle_error": f"{type(error).__name__}: {error}"}
    if not spans:
        return {}
    gaps, reach = [], spans[0][1]
    for (start, end, name), previous in zip(spans[1:], spans):
        if start > reach:
            gaps.append((start - reach, previous[2][:60], name[:60]))
        reach = max(reach, end)
    idle_ms = sum(g[0] for g in gaps) / 1e3 / steps
    return {"gpu_idle_ms_per_step": round(idle_ms, 2),
            "largest_gaps_ms": [(round(g[0] / 1e3, 3), g[1], g[2]) for g in sorted(gaps, reverse=True)[:12]]}


def profile_variant(model, batch, spec: str, steps: int) -> dict:
    parts = spec.split(":")
    kind, compiled, options = parts[0], parts[1] == "compile", set(parts[2:])
    torch._dynamo.reset()
    attention = sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if "cudnn" in options else contextlib.nullcontext()
    import torch._inductor.config as inductor
    inductor.max_autotune_gemm = "autotune" in options
    inductor.max_autotune_gemm_backends = "CUBLAS,TRITON"
    result: dict = {}
    optim = generator_optim(TFConfig(generator={"compile": compiled}), seed=0)
    with attention, compile_settings(optim, "cuda"):   # as the training loop compiles
        step = make_step(model, batch, None if kind == "plain" else kind, compiled)
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        result["first_step_s"] = time.perf_counter() - start
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        result["step_s"] = (time.perf_counter() - start) / steps
        result["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        profiled = 2
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(profiled):
                step()
            torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0.0)
        if device_us > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + device_us / 1e3 / profiled
    families: dict[str, float] = {}
    for name, ms in kernels.items():
        families[family(name)] = families.get(family(name), 0.0) + ms
    result["gpu_ms_per_step"] = sum(kernels.values())
    result.update(idle_gaps(prof, profiled))
    result["families_ms"] = {k: round(v, 2) for k, v in sorted(families.items(), key=lambda kv: -kv[1])}
    result["top_kernels_ms"] = {k[:160]: round(v, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:25]}
    result["top_kernels_by_family_ms"] = {
        label: {k[:160]: round(v, 3) for k, v in sorted(((k, v) for k, v in kernels.items() if family(k) == label),
                                                         key=lambda kv: -kv[1])[:15]}
        for label in families}
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    add_step_arguments(parser)
    parser.add_argument("--variants", default="plain:compile,kernel:compile")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/step_profile.py profiles GPU kernels: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = dit_config(args.preset, token_dim=args.token_dim, grid=args.grid, num_classes=1000, num_levels=4)
    model = bench_model(cfg, "cuda")
    batch = make_batch(cfg, args.batch, "cuda")
    flops = count_flops(model, batch)
    counted = {"plain": 3 * flops["forward"], "kernel": 3 * flops["forward"] + flops["tangent"]}
    report = {"machine": machine(), "commit": commit(), "command": command_line(), "flops_per_sample": flops,
              "config": vars(args), "variants": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.variants.split(","):
        try:
            result = profile_variant(model, batch, spec, args.steps)
        except Exception as error:   # one failing variant must not hide the others
            result = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
        if "step_s" in result:
            result["img_per_s"] = args.batch / result["step_s"]
            result["mfu"] = counted[spec.split(":")[0]] * args.batch / result["step_s"] / H200_BF16_DENSE
        report["variants"][spec] = result
        print(spec, json.dumps(result, indent=1), flush=True)
        atomic_write_text(out / "step_profile.json", json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
