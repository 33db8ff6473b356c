"""The fused Triton merge loop against the CUDA-graph torch loop, on one GPU: time and equality;
with --kmeans also the fused Triton level-0 k-means against the torch loop and the whole hierarchy.

    python bench/linkage_check.py [--batch 1024] [--tokens 256] [--object-share 0.6] [--warps 1 2 4 8]
                                  [--kmeans] [--skip-linkage]

Builds B realistic linkage problems (DINOv2-like 768-d tokens drawn around a few part centres,
~60% object tokens, the distances of models.hierarchy.batched.linkage_distances with lam 0.2),
runs models.hierarchy.batched._Linkage as a CUDA graph (the torch path, T - 1 steps) and
models.hierarchy.linkage_triton.run_linkage_triton (T - 1 steps) for each num_warps, checks snapshots equal
and heights within 1e-6, then the ids of part_levels_batched with either linkage, and prints
one JSON object. With --kmeans: B images of 768-d tokens (a random blob of one direction on a
background of another, noise on every token), level-0 labels of models.hierarchy.batched's torch
k-means loop and of the Triton kernel (models.hierarchy.kmeans_triton) compared token for token, both timed
(and the kernel's parts: Gram matrices, kernel), then build_hierarchies_batched per batch with
each k-means (Triton linkage) and its ids compared. Imports torch, numpy and models/* only
(no prefect / dask / zarr).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.hierarchy.batched import (_kmeans_torch, _kmeans_triton, _linkage_for,  # noqa: E402
                                      build_hierarchies_batched, centred_gram, grid_coordinates_t,
                                      linkage_distances, object_masks, part_levels_batched,
                                      sklearn_plusplus_draws)
from models.hierarchy.kmeans_triton import kmeans_gram_triton  # noqa: E402
from models.hierarchy.linkage_triton import run_linkage_triton  # noqa: E402
from storage.config import HierarchyConfig  # noqa: E402
from tasks.plan import hierarchy_spec  # noqa: E402


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


def blob_images(batch: int, tokens: int, seed: int, device) -> torch.Tensor:
    """Raw tokens [B, g, g, 768]: a disc (random centre and radius) of one direction on a background
    of another, each token with noise, so level 0 has a non-trivial split that Lloyd refines."""
    generator = torch.Generator(device=device).manual_seed(seed)
    side = int(round(tokens ** 0.5))
    coords = grid_coordinates_t(side, side, device)
    centre = 0.3 + 0.4 * torch.rand(batch, 1, 2, generator=generator, device=device)
    radius = 0.15 + 0.25 * torch.rand(batch, 1, generator=generator, device=device)
    inside = ((coords[None] - centre).norm(dim=-1) < radius).float()[..., None]      # [B, T, 1]
    fore, back = torch.randn(2, batch, 1, 768, generator=generator, device=device)
    noise = torch.randn(batch, tokens, 768, generator=generator, device=device)
    x = inside * fore + (1 - inside) * back + 1.5 * noise
    return x.reshape(batch, side, side, 768)


def kmeans_report(args, device) -> dict:
    spec = hierarchy_spec(HierarchyConfig())
    tokens4 = blob_images(args.batch, args.tokens, args.seed, device)
    batch, side = tokens4.shape[0], tokens4.shape[1]
    flat = tokens4.reshape(batch, side * side, -1)
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    coords = grid_coordinates_t(side, side, device)
    report: dict = {"batch": batch, "tokens": side * side, "dim": flat.shape[-1]}
    started = time.perf_counter()
    got, got_identical = _kmeans_triton(unit, coords, spec, 50)   # compiles
    torch.cuda.synchronize()
    report["triton_first_call_s"] = round(time.perf_counter() - started, 3)
    want, want_identical = _kmeans_torch(unit, coords, spec, 50)
    differ = got != want
    report["labels_equal"] = bool(torch.equal(got, want)) and bool(torch.equal(got_identical, want_identical))
    report["images_differing"] = int(differ.any(1).sum())
    report["tokens_differing"] = int(differ.sum())
    report["object_share_mean"] = round(float(object_masks(unit, coords, spec, kmeans="torch").float().mean()), 3)
    for early in (1, 5, 10):   # how far Lloyd goes: images whose labels still change after `early` steps
        report[f"images_moving_after_{early}_steps"] = int((_kmeans_torch(unit, coords, spec, early)[0] != want).any(1).sum())
    masks = {name: object_masks(unit, coords, spec, kmeans=name) for name in ("torch", "triton")}
    report["object_masks_equal"] = bool(torch.equal(masks["torch"], masks["triton"]))
    per = 1024 / batch * 1000   # seconds per batch -> ms per 1024 images
    report["object_masks_ms_per_1024"] = {
        name: round(per * timed(lambda name=name: object_masks(unit, coords, spec, kmeans=name), args.repeats), 2)
        for name in ("torch", "triton")}
    gram = centred_gram(unit, coords, spec.alpha)
    first, uniforms = sklearn_plusplus_draws(side * side, spec.k, spec.seed)
    report["triton_parts_ms_per_1024"] = {
        "centred_gram": round(per * timed(lambda: centred_gram(unit, coords, spec.alpha), args.repeats), 2),
        "kernel": round(per * timed(lambda: kmeans_gram_triton(gram, spec.k, first, uniforms, 50), args.repeats), 2)}
    ids = {name: build_hierarchies_batched(tokens4, spec, linkage="triton", kmeans=name) for name in ("torch", "triton")}
    report["hierarchy_ids_equal"] = bool(torch.equal(ids["torch"], ids["triton"]))
    report["hierarchy_images_differing"] = int((ids["torch"] != ids["triton"]).flatten(1).any(1).sum())
    report["hierarchy_ms_per_1024"] = {
        f"kmeans_{name}": round(per * timed(lambda name=name: build_hierarchies_batched(
            tokens4, spec, linkage="triton", kmeans=name), args.repeats), 2) for name in ("torch", "triton")}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--object-share", type=float, default=0.6)
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kmeans", action="store_true", help="also check and time the level-0 k-means")
    parser.add_argument("--skip-linkage", action="store_true", help="only the --kmeans part")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    device = torch.device("cuda")
    import triton

    if args.skip_linkage:
        report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "kmeans": kmeans_report(args, device)}
        report["all_equal"] = report["kmeans"]["labels_equal"] and report["kmeans"]["hierarchy_ids_equal"]
        print(json.dumps(report, indent=1), flush=True)
        return
    batch, tokens, steps = args.batch, args.tokens, args.tokens - 1
    unit, coords, is_object = problems(batch, tokens, args.object_share, args.seed, device)
    spec = hierarchy_spec(HierarchyConfig())
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
    if args.kmeans:
        report["kmeans"] = kmeans_report(args, device)
        report["all_equal"] = report["all_equal"] and report["kmeans"]["labels_equal"] \
            and report["kmeans"]["hierarchy_ids_equal"]
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
