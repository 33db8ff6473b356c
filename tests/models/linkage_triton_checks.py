"""Checks of the fused Triton merge loop, run by tests/models/test_linkage_triton.py in a subprocess.

TRITON_INTERPRET=1 must be set before triton.language is first imported (its own jitted helpers,
tl.min and the like, are wrapped for the interpreter or the compiler at that moment), so these
checks run in a fresh interpreter with the variable set, not in the pytest process. Prints one
JSON object: check name -> "ok" or the failure's traceback.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: specs
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from specs import hierarchy_spec  # noqa: E402
from triton_interpreter import run_checks  # noqa: E402

from models.hierarchy.batched import _Linkage, build_hierarchies_batched  # noqa: E402
from models.hierarchy.linkage_triton import run_linkage_triton  # noqa: E402

_INF = float("inf")


def _problems(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[4, T, T] distances and [4, T] sizes: ~60% object tokens, one image of background only,
    one of small-integer distances (ties everywhere, also after averaging), one all object."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(4, tokens, 3, generator=generator)
    dist = torch.cdist(points, points)
    grid = torch.randint(0, 4, (tokens, 1), generator=generator).float()
    dist[2] = (grid - grid.T).abs() + 1.0
    is_object = torch.rand(4, tokens, generator=generator) < 0.6
    is_object[1] = False
    is_object[3] = True
    pair = is_object[:, :, None] & is_object[:, None, :] & ~torch.eye(tokens, dtype=torch.bool)[None]
    return torch.where(pair, dist, torch.full_like(dist, _INF)), is_object.float()


def _torch_loop(dist, size, steps):
    state = _Linkage(dist.shape[0], dist.shape[1], steps, dist.device)
    state.load(dist, size)
    state.run()
    return state.heights, state.snapshots


def check_kernel(tokens: int, steps: int) -> None:
    dist, size = _problems(tokens, seed=tokens)
    original = dist.clone()
    heights, snapshots = run_linkage_triton(dist, size, steps)
    want_heights, want_snapshots = _torch_loop(dist, size, steps)
    assert torch.equal(dist, original), "dist changed though inplace=False"
    assert snapshots.dtype == torch.int16 and snapshots.shape == (steps + 1, 4, tokens), snapshots.shape
    assert heights.shape == want_heights.shape, (heights.shape, want_heights.shape)
    assert torch.equal(snapshots, want_snapshots), "labels differ"
    assert torch.equal(torch.isinf(heights), torch.isinf(want_heights)), "merge counts differ"
    finite = torch.isfinite(want_heights)
    assert (heights[finite] - want_heights[finite]).abs().max() <= 1e-6, "heights differ"
    assert torch.isinf(heights[1]).all() and (snapshots[:, 1] == torch.arange(tokens)).all(), "background moved"
    assert int(torch.isfinite(heights[3]).sum()) == min(steps, tokens - 1), "all-object image stopped early"
    if tokens >= 8:
        assert len(set(heights[2][finite[2]].tolist())) < int(finite[2].sum()), "no tied heights: tie case untested"


def check_hierarchies() -> None:
    tokens = torch.from_numpy(np.random.default_rng(5).normal(size=(3, 5, 5, 16)).astype(np.float32))
    spec = hierarchy_spec(cuts=(0.8, 0.5, 0.2))
    loop = build_hierarchies_batched(tokens, spec, linkage="torch", kmeans_iterations=10)
    fused = build_hierarchies_batched(tokens, spec, linkage="triton", kmeans_iterations=10)
    fixed = build_hierarchies_batched(tokens, spec, linkage="triton", kmeans_iterations=10, static_steps=True)
    assert torch.equal(fused, loop), "ids differ (dynamic steps)"
    assert torch.equal(fixed, loop), "ids differ (T - 1 steps)"
    assert (loop[:, 1:] > 1).any(), "the cuts split nothing: the case tests little"


def check_generated_regions() -> None:
    """models.evaluation.regions_batched with the kernel equals scipy's linkage canvas by canvas."""
    from models.evaluation.metrics import regions_from_canvas
    from models.evaluation.regions_batched import regions_batched

    rng = np.random.default_rng(6)
    ids = rng.integers(0, 4, (3, 20))
    canvases = (np.take_along_axis(rng.normal(size=(3, 4, 8)), ids[..., None], 1)
                + 0.2 * rng.normal(size=(3, 20, 8))).astype(np.float32)
    got = regions_batched(torch.from_numpy(canvases), 0.3, linkage="triton").numpy()
    expected = np.stack([regions_from_canvas(c, 0.3) for c in canvases])
    assert (got == expected).all(), f"{got} != {expected}"
    assert expected.max() > 0, "one region everywhere: the case tests little"


CHECKS = {
    "kernel_T24_all_steps": lambda: check_kernel(24, 23),      # idle tail after the last merge
    "kernel_T19_fewer_steps": lambda: check_kernel(19, 10),    # T not a power of two; stops mid-way
    "kernel_T2_one_step": lambda: check_kernel(2, 1),
    "hierarchies": check_hierarchies,
    "generated_regions": check_generated_regions,
}


if __name__ == "__main__":
    run_checks(CHECKS)
