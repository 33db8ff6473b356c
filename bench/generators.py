"""Generator training speed on one GPU: the B-size mean-flow step with its JVP vs a plain step.

    python3 bench/generators.py --preset B --batch 256 --grid 16 --token-dim 768 --out bench/results

Needs only torch (+ triton on CUDA) and the config (pydantic): no Prefect, Dask or Zarr.
Measures, on synthetic canvases:
  - plain_*:   forward of both heads, MSE on both outputs, backward, AdamW step (the reference point);
  - jvp_<kind>_*: the training step of models/generator/meanflow.py (forward, tangent pass, backward, AdamW),
    with the tangent pass "kernel" (models/generator/dit_jvp.py: tangents only, reusing the forward's values,
    forward-only Triton kernel for attention) or "math" (torch.func.jvp through the written-out
    attention, values recomputed), eager or torch.compile'd;
and first checks the Triton tangent kernel against torch.func.jvp of the math attention on the GPU.

FLOPs counted per sample (documented in the README):
  forward  F   = torch.utils.flop_counter on the model's forward (both heads; matmuls and SDPA),
  backward 2F,
  tangent  J   = flop_counter on the tangent pass models.generator.dit_jvp.x_head_tangent (tangent matmuls of the
                 x path and the per-sample conditioning it recomputes) + 8 T^2 width per block for the
                 attention tangent kernel (dQ K^T, Q dK^T, (P*dS) V, P dV; the kernel also recomputes
                 Q K^T and P V, which are not counted).
  plain step: 3F; JVP step: 3F + J. MFU = counted FLOPs / step time / 989 TFLOP/s (H200 dense bf16).
  The x path's values are the forward's own (kept, not recomputed), so they are counted once, in F.
  The "math" kind recomputes them inside torch.func.jvp; its MFU still counts only 3F + J.
Writes bench/results/generators.json with train_img_per_s, mfu, jvp_step_cost_ratio (best JVP step
time / plain step time, same compile setting) and peak memory per variant.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.results_io import write_result  # noqa: E402
from models.generator.dit import TrajectoryDiT, dit_config  # noqa: E402
from models.generator.dit_jvp import x_head_tangent  # noqa: E402
from models.generator.jvp_attention import math_attention_fn, tangent_torch, tangent_triton  # noqa: E402
from models.generator.meanflow import draw, meanflow_loss  # noqa: E402
from models.generator.optim import build_optimizers  # noqa: E402
from models.generator.train_loop import compile_settings  # noqa: E402
from storage.config import TFConfig  # noqa: E402
from tasks.plan import generator_optim, objective_config  # noqa: E402

H200_BF16_DENSE = 989e12


def kernel_check(device: str, heads: int, tokens: int, dim: int) -> dict:
    """Triton tangent vs torch.func.jvp of the math attention (float64 reference), and its speed."""
    out: dict = {}
    g = torch.Generator(device).manual_seed(0)
    shape = (4, heads, tokens, dim)
    ref_in = [torch.randn(shape, generator=g, device=device, dtype=torch.float64) for _ in range(6)]
    reference = torch.func.jvp(math_attention_fn, tuple(ref_in[:3]), tuple(ref_in[3:]))[1]
    scale = float(reference.abs().max())
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        try:
            got = tangent_triton(*(x.to(dtype) for x in ref_in)).double()
            out[f"max_rel_error_{name}"] = float((got - reference).abs().max()) / scale
        except Exception as error:   # e.g. no fp64 dot on this GPU/triton: recorded, not hidden
            out[f"max_rel_error_{name}"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
    bf16_torch = tangent_torch(*(x.to(torch.bfloat16) for x in ref_in)).double()
    out["max_rel_error_bfloat16_torch_formula"] = float((bf16_torch - reference).abs().max()) / scale
    # speed at the training shape
    big = [torch.randn((256, heads, tokens, dim), device=device, dtype=torch.bfloat16) for _ in range(6)]
    timings = {}
    for block_m, block_n, warps, stages in ((64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2), (64, 32, 4, 3),
                                            (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (64, 128, 8, 2),
                                            (128, 128, 8, 2), (64, 32, 4, 4), (32, 64, 4, 3), (64, 256, 8, 1)):
        try:
            for _ in range(2):
                tangent_triton(*big, block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                tangent_triton(*big, block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
            torch.cuda.synchronize()
            timings[f"{block_m}x{block_n}_w{warps}_s{stages}"] = (time.perf_counter() - start) / 10 * 1e3
        except Exception as error:
            timings[f"{block_m}x{block_n}_w{warps}_s{stages}"] = f"failed: {type(error).__name__}"
    sdpa_ms = _time(lambda: F.scaled_dot_product_attention(*big[:3]), 10)
    out["tangent_kernel_ms"] = timings
    out["sdpa_forward_ms"] = sdpa_ms * 1e3
    flops = 12 * tokens * tokens * dim * heads * 256   # all six matmuls the kernel does
    best = min(v for v in timings.values() if isinstance(v, float))
    out["tangent_kernel_tflops"] = flops / (best / 1e3) / 1e12
    return out


def _time(fn, steps: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def count_flops(model: TrajectoryDiT, batch: dict) -> dict:
    cfg = model.config
    tokens, width = cfg.grid * cfg.grid, cfg.width
    small = {k: v[:2] for k, v in batch.items()}
    args = (small["z"], small["h"], small["cond"], small["label"], small["level"])
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with FlopCounterMode(display=False) as counter:
            _, _, values = model(*args, keep_values=True)
        forward = counter.get_total_flops() / 2
        with FlopCounterMode(display=False) as counter:
            x_head_tangent(model, values, small["h"], small["label"], small["level"], small["z"],
                           torch.ones_like(small["h"]))
        x_blocks = cfg.depth   # trunk + x head
        tangent = counter.get_total_flops() / 2 + 8 * tokens * tokens * width * x_blocks
    return {"forward": forward, "backward": 2 * forward, "tangent": tangent}


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The step's shape: preset, batch, grid, token width, timed steps (shared with bench/step_profile.py)."""
    parser.add_argument("--preset", default="B")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--token-dim", type=int, default=768)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. reduce-overhead: CUDA graphs)")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config setting for the compiled variants (repeatable)")


def apply_inductor_settings(settings: list[str]) -> dict:
    """--inductor KEY=VALUE flags onto torch._inductor.config (Python literals, else strings)."""
    import ast

    import torch._inductor.config as inductor

    applied = {}
    for setting in settings:
        key, raw = setting.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        target = inductor
        *path, leaf = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
        applied[key] = value
    return applied


def bench_model(cfg, device: str) -> TrajectoryDiT:
    model = TrajectoryDiT(cfg).to(device)
    with torch.no_grad():   # adaLN-Zero gates start at zero; nudge them so every path does real work
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    return model


def make_batch(cfg, batch: int, device: str) -> dict:
    g = torch.Generator(device).manual_seed(0)
    tokens = cfg.grid * cfg.grid
    return {"z": torch.randn(batch, tokens, cfg.token_dim, generator=g, device=device),
            "cond": torch.randn(batch, tokens, cfg.token_dim, generator=g, device=device),
            "h": torch.rand(batch, generator=g, device=device),
            "label": torch.randint(0, cfg.num_classes, (batch,), generator=g, device=device),
            "level": torch.randint(0, cfg.num_levels, (batch,), generator=g, device=device),
            "regions": torch.randint(0, 8, (batch, tokens), generator=g, device=device)}


def make_step(model, batch: dict, kind: str | None, compiled: bool, mode: str | None = None,
              v_tangent: str = "h0", optimizer_name: str = "adamw"):
    """One training step on `batch`: kind None is the plain step, else the mean-flow step with that
    tangent pass and JVP tangent source (h0: the v head's own forward at h = 0, as the reference;
    same: the v of u's forward); compiled as models/generator/train_loop.py does on one GPU (one graph).
    optimizer_name "muon": the product's optimizer as configs/imagenet.yaml builds it (ReferenceMuon);
    "adamw": torch's fused AdamW."""
    if optimizer_name == "muon":
        optimizers, _ = build_optimizers(model, generator_optim(
            TFConfig(generator={"optimizer": "muon", "lr": 0.01}), seed=0))
    else:
        optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)]
    objective = dataclasses.replace(objective_config(TFConfig()), jvp_attention=kind or "kernel", v_tangent=v_tangent)
    gen = torch.Generator("cuda").manual_seed(0)

    def plain_loss(z, h, cond, label, level):
        x_hat, v_hat = model(z, h, cond, label, level)
        return F.mse_loss(x_hat.float(), cond) + F.mse_loss(v_hat.float(), z)

    plain_fn = torch.compile(plain_loss, mode=mode) if compiled else plain_loss
    loss_fn = torch.compile(meanflow_loss, mode=mode) if compiled else meanflow_loss

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if kind is None:
                loss = plain_fn(batch["z"], batch["h"], batch["cond"], batch["label"], batch["level"])
            else:
                draws = draw(tuple(batch["cond"].shape), objective, gen)
                loss, _ = loss_fn(model, batch["cond"], batch["z"], batch["label"], batch["level"], batch["regions"],
                                  objective, draws=draws)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

    return step


def run_variant(model, batch: dict, kind: str | None, compiled: bool, steps: int, mode: str | None = None,
                v_tangent: str = "h0", optimizer_name: str = "adamw") -> dict:
    """kind None: the plain step; else the mean-flow step with that tangent pass."""
    torch._dynamo.reset()
    step = make_step(model, batch, kind, compiled, mode, v_tangent, optimizer_name)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        seconds = _time(step, steps)
    except torch.cuda.OutOfMemoryError as error:
        return {"error": f"OutOfMemoryError: {str(error)[:160]}"}
    finally:
        del step   # and with it the optimizer's state
        gc.collect()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    torch.cuda.empty_cache()
    return {"step_s": seconds, "first_step_s": first, "peak_gpu_mem_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    add_step_arguments(parser)
    parser.add_argument("--variants", default="plain:eager,plain:compile,kernel:eager,kernel:compile,math:eager",
                        help="kind:eager|compile[:h0|same] (the JVP tangent's source, default h0)")
    parser.add_argument("--out", default=None, help="folder for generators.json (default bench/results)")
    parser.add_argument("--no-kernel-check", action="store_true", help="skip the tangent kernel's accuracy/speed check")
    parser.add_argument("--kernel-check-only", action="store_true", help="only the tangent kernel's check")
    parser.add_argument("--compile-tuning", action="store_true",
                        help="coordinate-descent tuning of the compiled kernels (generator.compile_tuning)")
    parser.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                        help="muon: the product's ReferenceMuon (configs/imagenet.yaml's), Newton-Schulz in TF32")
    parser.add_argument("--ns-float32", action="store_true",
                        help="with --optimizer muon: Newton-Schulz in full float32 (no TF32 anywhere)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/generators.py measures GPU training: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = not args.ns_float32
    if args.ns_float32:
        import models.generator.optim as optim

        optim.NS_TF32 = False
    device = "cuda"
    cfg = dit_config(args.preset, token_dim=args.token_dim, grid=args.grid, num_classes=1000, num_levels=4)
    report: dict = {"config": {"preset": args.preset, "batch": args.batch, "tokens": args.grid ** 2,
                               "token_dim": args.token_dim, "width": cfg.width, "depth": cfg.depth,
                               "head_depth": cfg.head_depth, "heads": cfg.heads, "dtype": "bf16 autocast",
                               "optimizer": "AdamW fused" if args.optimizer == "adamw" else
                               "Muon (ReferenceMuon), Newton-Schulz in " + ("float32" if args.ns_float32 else "TF32"),
                               "torch": torch.__version__,
                               "compile_mode": args.compile_mode or "default",
                               "compile_tuning": args.compile_tuning,
                               "inductor": apply_inductor_settings(args.inductor),
                               # another optimiser's figures go beside generators.json, not over it
                               "result_name": "generators" if args.optimizer == "adamw" else
                               "generators_muon" + ("_ns_float32" if args.ns_float32 else "")}}
    if args.kernel_check_only:
        report["kernel_check"] = kernel_check(device, cfg.heads, args.grid ** 2, cfg.width // cfg.heads)
        print(report["kernel_check"], flush=True)
        return
    model = bench_model(cfg, device)
    batch = make_batch(cfg, args.batch, device)
    flops = count_flops(model, batch)
    report["flops_per_sample"] = flops
    plain_flops = 3 * flops["forward"]
    jvp_flops = plain_flops + flops["tangent"]   # + F for the h = 0 forward of v_tangent h0
    variants = report["variants"] = {}
    # the training loop's own compile settings (generator.compile_tuning)
    tuning = TFConfig(generator={"compile": True, "compile_tuning": args.compile_tuning})
    with compile_settings(generator_optim(tuning, seed=0), device):
        for spec in args.variants.split(","):
            kind, mode, *rest = spec.split(":")
            v_tangent = rest[0] if rest else "h0"
            result = run_variant(model, batch, None if kind == "plain" else kind, mode == "compile", args.steps,
                                 args.compile_mode, v_tangent, args.optimizer)
            if "step_s" in result:
                counted = plain_flops if kind == "plain" else \
                    jvp_flops + (flops["forward"] if v_tangent == "h0" else 0)
                result["img_per_s"] = args.batch / result["step_s"]
                result["mfu"] = counted * args.batch / result["step_s"] / H200_BF16_DENSE
            variants[spec] = result
            print(spec, result, flush=True)
            write_figures(report, args.batch, args.out)   # after every variant: a cut-short run keeps what it measured
    del model, batch
    gc.collect()
    torch.cuda.empty_cache()
    if not args.no_kernel_check:
        report["kernel_check"] = kernel_check(device, cfg.heads, args.grid ** 2, cfg.width // cfg.heads)
        print(report["kernel_check"], flush=True)
    print(write_figures(report, args.batch, args.out).read_text())


def write_figures(report: dict, batch: int, out: str | None):
    """generators.json from the variants measured so far: the fastest JVP step, and the plain step
    under the same compile setting for the ratio."""
    variants = report["variants"]
    jvp_keys = [k for k, v in variants.items() if not k.startswith("plain") and "step_s" in v]
    if not jvp_keys:
        return write_result(report["config"].get("result_name", "generators"), {}, report, out)
    top = min(jvp_keys, key=lambda k: variants[k]["step_s"])
    mode = top.split(":")[1]
    plains = [v["step_s"] for k, v in variants.items() if k == f"plain:{mode}" and "step_s" in v]
    plain = min(plains) if plains else None
    extra_figures: dict = {}
    for tangent in ("h0", "same"):   # per JVP tangent source: the reference's h0 costs one more forward
        named = [k for k in jvp_keys if (k.split(":") + ["h0"])[2] == tangent]
        if named:
            best = report[f"best_{tangent}"] = min(named, key=lambda k: variants[k]["step_s"])
            extra_figures[f"train_img_per_s_{tangent}"] = (round(variants[best]["img_per_s"], 1), "img/s")
            extra_figures[f"mfu_{tangent}"] = (round(variants[best]["mfu"], 4), "fraction of 989 TFLOP/s")
    figures = {"train_img_per_s": (round(variants[top]["img_per_s"], 1), "img/s"),
               "mfu": (round(variants[top]["mfu"], 4), "fraction of 989 TFLOP/s"),
               "peak_gpu_mem_gib": (round(variants[top]["peak_gpu_mem_gib"], 2), "GiB")}
    if plain:   # no plain step measured (yet): no ratio, rather than a NaN
        figures["jvp_step_cost_ratio"] = (round(variants[top]["step_s"] / plain, 3), "x plain step")
        figures["plain_img_per_s"] = (round(batch / plain, 1), "img/s")
    figures.update(extra_figures)
    report["best_variant"] = top
    return write_result(report["config"].get("result_name", "generators"), figures, report, out)


if __name__ == "__main__":
    main()
