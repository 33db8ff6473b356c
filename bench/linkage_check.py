"""The fused Triton merge loop against the CUDA-graph torch loop, on one GPU: time and equality.

    python bench/linkage_check.py [--batch 1024] [--tokens 256] [--object-share 0.6] [--warps 1 2 4 8]

Builds B realistic linkage problems (DINOv2-like 768-d tokens drawn around a few part centres,
~60% object tokens, the distances of models.hierarchy_batched.linkage_distances with lam 0.2),
runs models.hierarchy_batched._Linkage as a CUDA graph (the torch path, T - 1 steps) and
models.linkage_triton.run_linkage_triton (T - 1 steps) for each num_warps, checks snapshots equal
and heights within 1e-6, then the ids of part_levels_batched with either linkage, and prints
one JSON object. Imports torch, numpy and models/* only (no prefect / dask / zarr).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.hierarchy import HierarchySpec  # noqa: E402
from models.hierarchy_batched import (_linkage_for, grid_coordinates_t, linkage_distances,  # noqa: E402
                                      part_levels_batched)
from models.linkage_triton import run_linkage_triton  # noqa: E402


def problems(batch: int, tokens: int, share: float, seed: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unit tokens [B, T, 768], coords [T, 2], is_object [B, T]) with part structure."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    side = int(round(tokens ** 0.5))
    assert side * side == tokens, "tokens must be a square grid"
    parts = torch.randn(batch, 6, 768, generator=generator)
    which = torch.randint(0, 6, (batch, tokens), generator=generator)
    x = parts.gather(1, which[..., None].expand(-1, -1, 768)) + 1.5 * torch.randn(batch, tokens, 768, generator=generator)
    unit = torch.nn.functional.normalize(x, dim=-1).to(device)
    is_object = (torch.rand(batch, tokens, generator=generator) < share).to(device)
    return unit, grid_coordinates_t(side, side, device), is_object


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--object-share", type=float, default=0.6)
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    device = torch.device("cuda")
    import triton

    batch, tokens, steps = args.batch, args.tokens, args.tokens - 1
    unit, coords, is_object = problems(batch, tokens, args.object_share, args.seed, device)
    spec = HierarchySpec()
    dist = linkage_distances(unit, coords, is_object, spec.lam)
    size = is_object.float()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "batch": batch, "tokens": tokens, "steps": steps,
                    "object_tokens_mean": round(float(is_object.float().sum(1).mean()), 1)}

    state = _linkage_for(batch, tokens, steps, device, use_graph=True)   # captures the graph (untimed)

    def torch_loop():
        state.load(dist, size)
        state.replay()

    report["torch_graph_s"] = round(timed(torch_loop, args.repeats), 5)
    want_heights, want_snapshots = state.heights.clone(), state.snapshots.clone()
    finite = torch.isfinite(want_heights)
    report["merges_mean"] = round(float(finite.sum(1).float().mean()), 1)

    report["triton"] = {}
    for warps in args.warps:
        entry: dict = {}
        try:
            started = time.perf_counter()
            heights, snapshots = run_linkage_triton(dist, size, steps, num_warps=warps)   # compiles
            torch.cuda.synchronize()
            entry["first_call_s"] = round(time.perf_counter() - started, 3)
            entry["s"] = round(timed(lambda: run_linkage_triton(dist, size, steps, num_warps=warps), args.repeats), 5)
            same_inf = bool(torch.equal(torch.isinf(heights), torch.isinf(want_heights)))
            entry["heights_inf_equal"] = same_inf
            entry["heights_max_abs_diff"] = float((heights[finite] - want_heights[finite]).abs().max()) if same_inf else None
            entry["heights_exact"] = bool(torch.equal(heights, want_heights))
            entry["snapshots_equal"] = bool(torch.equal(snapshots, want_snapshots))
            entry["images_differing"] = int((snapshots != want_snapshots).any(2).any(0).sum())
            entry["first_step_differing"] = int((snapshots != want_snapshots).any(2).any(1).int().argmax()) \
                if not entry["snapshots_equal"] else None
            entry["speedup"] = round(report["torch_graph_s"] / entry["s"], 1)
            entry["per_20k_images_s"] = round(entry["s"] * 20_000 / batch, 4)
        except Exception as error:   # a compile or launch failure at one num_warps: say so, go on
            entry["error"] = f"{type(error).__name__}: {error}"[:2000]
        report["triton"][f"num_warps_{warps}"] = entry

    # the whole part-level stage with either linkage: ids must be the same
    ids = {name: part_levels_batched(unit, coords, is_object, spec, linkage=name) for name in ("torch", "triton")}
    report["part_levels_ids_equal"] = bool(torch.equal(ids["torch"], ids["triton"]))
    report["part_levels_s"] = {name: round(timed(lambda name=name: part_levels_batched(unit, coords, is_object, spec,
                                                                                      linkage=name), args.repeats), 5)
                               for name in ("torch", "triton")}
    ok = [e for e in report["triton"].values() if "s" in e]
    report["all_equal"] = bool(ok) and all(e["snapshots_equal"] and e["heights_inf_equal"] and
                                           e["heights_max_abs_diff"] <= 1e-6 for e in ok) \
        and report["part_levels_ids_equal"]
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
