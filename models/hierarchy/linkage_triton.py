"""Average-linkage (UPGMA) merge loop of models.hierarchy.batched as one fused Triton kernel.

One program per image runs all merge steps itself: the [T, T] distance matrix stays in global
memory (L2), and the program keeps in registers, per row, the row's minimum and the first column
that holds it (a row-minimum cache), the cluster sizes and the labels. A step then costs O(T)
instead of the O(T^2) full-matrix argmin of the torch loop:

- the global minimum is the minimum of the T cached row minima; the first row holding it and
  that row's cached column give exactly the first minimum in row-major order of the full
  matrix (`dist.reshape(B, -1).min(1)`), so ties break as in `_Linkage.run`;
- rows i and j are read, the Lance-Williams average (si * d_i + sj * d_j) / max(si + sj, 1)
  becomes row and column i, row and column j become inf;
- every other row's cache changes only at columns i and j: a row whose cached column was i or
  j is rescanned (one row read each, typically a handful per step), the others compare their
  new column-i value with the cached minimum (ties: the smaller column wins);
- heights[step] (inf once an image has no finite pair left: it idles) and the labels after
  the step (int16 snapshot) are written every step.

The arithmetic is the torch loop's, operation for operation (IEEE division, no fused
multiply-add), so heights and ids agree exactly, not only up to rounding.

Triton is imported lazily: this module imports (and `triton_available()` answers False) where it
is missing. With TRITON_INTERPRET=1 set before the first call, the kernel runs on CPU tensors
through Triton's interpreter (tests/models/test_linkage_triton.py). Pure math, no I/O.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

tl = None   # triton.language, bound by _load_triton(); the kernel body refers to it as a global
_KERNELS: dict[bool, object] = {}


def triton_available() -> bool:
    """Whether triton can be imported here (no import is done when it is absent)."""
    return importlib.util.find_spec("triton") is not None


def _load_triton():
    global tl
    import triton
    import triton.language as language

    tl = language
    return triton


def _interpreting() -> bool:
    triton = _load_triton()
    knobs = getattr(triton, "knobs", None)   # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _linkage_kernel(dist_ptr, size_ptr, heights_ptr, snap_ptr, tokens, steps, batch, heights_stride,
                    BLOCK: tl.constexpr, ROWS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    inf = float("inf")
    idx = tl.arange(0, BLOCK)
    valid = idx < tokens
    base = dist_ptr + b * tokens * tokens

    # row-minimum cache: rowmin[r] = min_c d(r, c), rowarg[r] = first such c (BLOCK if none finite)
    rowmin = tl.full([BLOCK], inf, tl.float32)
    rowarg = tl.full([BLOCK], BLOCK, tl.int32)
    rr = tl.arange(0, ROWS)
    for r0 in range(0, tokens, ROWS):
        rows = r0 + rr
        tile = tl.load(base + rows[:, None] * tokens + idx[None, :],
                       mask=(rows[:, None] < tokens) & valid[None, :], other=inf)
        low = tl.min(tile, axis=1)
        first = tl.min(tl.where(tile == low[:, None], idx[None, :], BLOCK), axis=1)
        first = tl.where(low < inf, first, BLOCK)
        hit = idx[None, :] == rows[:, None]
        rowmin = tl.minimum(rowmin, tl.min(tl.where(hit, low[:, None], inf), axis=0))
        rowarg = tl.minimum(rowarg, tl.min(tl.where(hit, first[:, None], BLOCK), axis=0))

    size = tl.load(size_ptr + b * tokens + idx, mask=valid, other=0.0)
    label = idx
    plane = (b * 0 + batch) * tokens   # int64: snapshots can pass 2**31 elements
    snap = snap_ptr + b * tokens + idx
    tl.store(snap, label.to(tl.int16), mask=valid)
    tl.debug_barrier()
    for step in range(0, steps):
        best = tl.min(rowmin, axis=0)
        if best < inf:
            i = tl.min(tl.where(rowmin == best, idx, BLOCK), axis=0)
            j = tl.sum(tl.where(idx == i, rowarg, 0), axis=0)
            row_i = tl.load(base + i * tokens + idx, mask=valid, other=inf)
            row_j = tl.load(base + j * tokens + idx, mask=valid, other=inf)
            si = tl.sum(tl.where(idx == i, size, 0.0), axis=0)
            sj = tl.sum(tl.where(idx == j, size, 0.0), axis=0)
            merged = tl.math.div_rn(si * row_i + sj * row_j, tl.maximum(si + sj, 1.0))
            merged = tl.where((idx == i) | (idx == j) | (idx >= tokens), inf, merged)
            tl.debug_barrier()   # every thread has read rows i and j before they are overwritten
            tl.store(base + i * tokens + idx, merged, mask=valid)
            tl.store(base + idx * tokens + i, merged, mask=valid)
            tl.store(base + j * tokens + idx, tl.full([BLOCK], inf, tl.float32), mask=valid)
            tl.store(base + idx * tokens + j, tl.full([BLOCK], inf, tl.float32), mask=valid)
            size = tl.where(idx == i, si + sj, size)
            label = tl.where(label == j, i, label)

            # cache: rows whose cached column was i or j are rescanned; the others see column i
            # take the merged value (column j only grew to inf, and it was not their first minimum)
            others = valid & (idx != i) & (idx != j)
            stale = others & ((rowarg == i) | (rowarg == j))
            lower = others & ~stale & (merged < rowmin)
            tie = others & ~stale & (merged == rowmin) & (merged < inf) & (i < rowarg)
            rowarg = tl.where(lower | tie, i, rowarg)
            rowmin = tl.where(lower, merged, rowmin)
            low_i = tl.min(merged, axis=0)
            first_i = tl.min(tl.where(merged == low_i, idx, BLOCK), axis=0)
            first_i = tl.where(low_i < inf, first_i, BLOCK)
            rowmin = tl.where(idx == i, low_i, rowmin)
            rowarg = tl.where(idx == i, first_i, rowarg)
            rowmin = tl.where(idx == j, inf, rowmin)
            rowarg = tl.where(idx == j, BLOCK, rowarg)
            tl.debug_barrier()   # the column stores are visible to the row reads below
            r = tl.min(tl.where(stale, idx, BLOCK), axis=0)
            while r < BLOCK:
                row = tl.load(base + r * tokens + idx, mask=valid, other=inf)
                low = tl.min(row, axis=0)
                first = tl.min(tl.where(row == low, idx, BLOCK), axis=0)
                first = tl.where(low < inf, first, BLOCK)
                rowmin = tl.where(idx == r, low, rowmin)
                rowarg = tl.where(idx == r, first, rowarg)
                stale = stale & (idx != r)
                r = tl.min(tl.where(stale, idx, BLOCK), axis=0)
        tl.store(heights_ptr + b * heights_stride + step, best)
        tl.store(snap + (step + 1) * plane, label.to(tl.int16), mask=valid)


def _kernel():
    triton = _load_triton()
    interpret = _interpreting()
    if interpret not in _KERNELS:   # jit decides interpreter or compiler when it wraps the function
        _KERNELS[interpret] = triton.jit(_linkage_kernel)
    return _KERNELS[interpret]


def run_linkage_triton(dist: Tensor, size: Tensor, steps: int, *, inplace: bool = False,
                       num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """UPGMA merge loop of `_Linkage.run`, fused: dist float32 [B, T, T], size [B, T] ->
    (heights float32 [B, max(steps, 1)], inf where no merge; snapshots int16 [steps + 1, B, T],
    the labels before any merge and after each).

    dist is overwritten when `inplace` (it is scratch for the kernel). Runs on CUDA tensors, or on
    CPU tensors when TRITON_INTERPRET=1 was set (slow: tests only). num_warps defaults to one
    thread per token up to 8 warps (best measured on an H200 at T = 256: bench/linkage_check.py)."""
    if dist.ndim != 3 or dist.shape[1] != dist.shape[2] or size.shape != dist.shape[:2]:
        raise ValueError(f"dist must be [B, T, T] and size [B, T], got {tuple(dist.shape)} and {tuple(size.shape)}")
    batch, tokens, _ = dist.shape
    if tokens > 32767:
        raise ValueError("int16 snapshots hold at most 32767 tokens")
    kernel = _kernel()
    if not dist.is_cuda and not _interpreting():
        raise RuntimeError("the Triton linkage runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)")
    work = dist.to(torch.float32).contiguous()
    if not inplace and work.data_ptr() == dist.data_ptr():
        work = work.clone()
    sizes = size.to(device=dist.device, dtype=torch.float32).contiguous()
    heights = torch.full((batch, max(steps, 1)), float("inf"), dtype=torch.float32, device=dist.device)
    snapshots = torch.empty((steps + 1, batch, tokens), dtype=torch.int16, device=dist.device)
    if batch == 0:
        return heights, snapshots
    block = max(16, 1 << (tokens - 1).bit_length())
    rows = max(1, min(16, 4096 // block))
    if num_warps is None:
        num_warps = max(1, min(8, block // 32))
    kernel[(batch,)](work, sizes, heights, snapshots, tokens, steps, batch, heights.stride(0),
                     BLOCK=block, ROWS=rows, num_warps=num_warps, enable_fp_fusion=False)
    return heights, snapshots
