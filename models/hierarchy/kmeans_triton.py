"""Level-0 k-means of models.hierarchy.batched (k-means++ start, Lloyd iterations) as one Triton kernel.

The torch loop (`hierarchy_batched._kmeans_torch`) costs ~200 ms per 1024 images of 256 tokens
on an H200: 50 iterations of cdist / one-hot / bmm over float64 [B, T, 770] features, 1.6 GB
read twice per iteration, plus k-means++ on a [B, trials, T, D] difference tensor. Here the
same algorithm runs on the Gram matrix G = X X^T (float64 [B, T, T], X the centred features),
since every quantity k-means needs is an inner product of tokens:

- ||x_i - x_c||^2 = G_ii - 2 G_ic + G_cc  (k-means++ distances to candidate tokens c);
- a centre is a weighted sum of tokens, c_j = X^T w_j: the k-means++ token (w_j = e_c) or the
  mean of cluster j (w_j = m_j / n_j, m_j its 0/1 membership), so x_i . c_j = (G w_j)_i and
  ||c_j||^2 = w_j^T G w_j; an empty cluster keeps its previous centre, as in the torch loop;
- the membership sums S = G M [T, k] are updated incrementally: only the G rows of tokens whose
  label changed are read (masked loads), all of them in the first iteration, a few after;
- once no label changes, the centres are exactly the previous ones, so the remaining
  iterations would change nothing: the program stops there (the torch loop's fixed count of
  iterations gives the same labels).

One program per image; k-means++ draws are scikit-learn's (the first token and the local-trial
uniforms of `hierarchy_batched.sklearn_plusplus_draws`, the same for every image), the searchsorted
of the torch code is a count of cumulative potentials below each target. Arithmetic is float64
throughout; labels agree with the torch loop except where two distances are equal to ~1e-15
(rounding of a different but equally exact formula), as the torch loop and scikit-learn do.

On an H200 (bench/linkage_check.py --kmeans, 1024 images of 16x16 768-d tokens): the kernel 0.55 ms,
the Gram matrices 4.2 ms (float64 batched GEMM), object_masks 6 ms instead of 205 ms, labels equal
token for token.

Triton is imported lazily (models.hierarchy.linkage_triton.triton_available says whether it is there); with
TRITON_INTERPRET=1 set before the first call it runs on CPU tensors through the interpreter
(tests/models/test_kmeans_triton.py). Pure math, no I/O.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from models.hierarchy import linkage_triton

tl = None   # triton.language, bound by _kernel(); the kernel body refers to it as a global
_KERNELS: dict[bool, object] = {}


def _kmeans_kernel(gram_ptr, unif_ptr, scratch_ptr, labels_ptr, centres_ptr, tokens, first, iterations,
                   BLOCK: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, TRIALS: tl.constexpr,
                   TP: tl.constexpr, JB: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    inf = float("inf")
    idx = tl.arange(0, BLOCK)
    valid = idx < tokens
    kk = tl.arange(0, KP)
    base = gram_ptr + b * tokens * tokens
    diag = tl.load(base + idx * (tokens + 1), mask=valid, other=0.0)

    # k-means++ (greedy local trials), in squared distances from the Gram matrix
    row_first = tl.load(base + first * tokens + idx, mask=valid, other=0.0)
    g_first = tl.load(base + first * (tokens + 1))
    closest = tl.where(valid, tl.maximum(diag - 2.0 * row_first + g_first, 0.0), 0.0)
    centre = tl.where(kk == 0, first, 0)
    tt = tl.arange(0, TP)
    trial_ok = tt < TRIALS
    for c in tl.static_range(1, K):
        potential = tl.sum(closest, axis=0)
        cumulative = tl.cumsum(closest, axis=0)
        draws = tl.load(unif_ptr + (c - 1) * TP + tt, mask=trial_ok, other=0.0)
        targets = draws * potential
        # torch.searchsorted(cumulative, target) (left side) = how many cumulative values are below it
        below = (cumulative[None, :] < targets[:, None]) & valid[None, :]
        candidate = tl.minimum(tl.sum(below.to(tl.int32), axis=1), tokens - 1)          # [TP]
        rows = tl.load(base + candidate[:, None].to(tl.int64) * tokens + idx[None, :],
                       mask=trial_ok[:, None] & valid[None, :], other=0.0)                # [TP, BLOCK]
        g_cand = tl.load(base + candidate.to(tl.int64) * (tokens + 1), mask=trial_ok, other=0.0)
        to_candidate = tl.maximum(diag[None, :] - 2.0 * rows + g_cand[:, None], 0.0)
        to_candidate = tl.where(valid[None, :], tl.minimum(to_candidate, closest[None, :]), 0.0)
        total = tl.where(trial_ok, tl.sum(to_candidate, axis=1), inf)
        lowest = tl.min(total, axis=0)
        best = tl.min(tl.where(total == lowest, tt, TP), axis=0)                           # first on ties
        closest = tl.sum(tl.where(tt[:, None] == best, to_candidate, 0.0), axis=0)
        chosen = tl.sum(tl.where(tt == best, candidate, 0), axis=0)
        centre = tl.where(kk == c, chosen, centre)
    tl.store(centres_ptr + b * KP + kk, centre)

    # projections of the tokens on the centres: proj[i, j] = x_i . c_j, norm[j] = ||c_j||^2
    live_k = kk < K
    proj = tl.load(base + centre[None, :].to(tl.int64) * tokens + idx[:, None],
                   mask=valid[:, None] & live_k[None, :], other=0.0)                        # [BLOCK, KP]
    norm = tl.load(base + centre.to(tl.int64) * (tokens + 1), mask=live_k, other=0.0)
    sums = tl.zeros([BLOCK, KP], dtype=tl.float64)                                          # S = G M
    old = tl.full([BLOCK], -1, tl.int32)
    scratch = scratch_ptr + b * 2 * tokens
    tl.store(scratch + idx, old, mask=valid)
    jj = tl.arange(0, JB)
    it = tl.full([], 0, tl.int32)
    moving = tl.full([], 1, tl.int32)
    while (it < iterations) & (moving > 0):
        dist = tl.maximum(diag[:, None] + norm[None, :] - 2.0 * proj, 0.0)
        dist = tl.where(live_k[None, :], dist, inf)
        nearest = tl.min(dist, axis=1)
        new = tl.min(tl.where(dist == nearest[:, None], kk[None, :], KP), axis=1).to(tl.int32)
        new = tl.where(valid, new, -1)
        moving = tl.sum((new != old).to(tl.int32), axis=0)
        slot_old = scratch + (it % 2) * tokens
        slot_new = scratch + ((it + 1) % 2) * tokens
        tl.debug_barrier()   # every thread is done reading the slot written now (two iterations ago)
        tl.store(slot_new + idx, new, mask=valid)
        tl.debug_barrier()   # the labels are visible to every thread of the program
        for j0 in range(0, tokens, JB):
            rows_j = j0 + jj
            ok_j = rows_j < tokens
            was = tl.load(slot_old + rows_j, mask=ok_j, other=-1)
            now = tl.load(slot_new + rows_j, mask=ok_j, other=-1)
            changed = (was != now) & ok_j
            if tl.sum(changed.to(tl.int32), axis=0) > 0:
                g = tl.load(base + rows_j[:, None].to(tl.int64) * tokens + idx[None, :],
                            mask=changed[:, None] & valid[None, :], other=0.0)               # [JB, BLOCK]
                for c in tl.static_range(0, K):
                    delta = (now == c).to(tl.float64) - (was == c).to(tl.float64)
                    column = tl.sum(g * delta[:, None], axis=0)                              # [BLOCK]
                    sums += tl.where(kk[None, :] == c, column[:, None], 0.0)
        member = (new[:, None] == kk[None, :]) & valid[:, None]
        count = tl.sum(member.to(tl.float64), axis=0)                                       # [KP]
        filled = count > 0
        safe = tl.maximum(count, 1.0)
        proj = tl.where(filled[None, :], sums / safe[None, :], proj)
        norm = tl.where(filled, tl.sum(tl.where(member, sums, 0.0), axis=0) / (safe * safe), norm)
        old = new
        it += 1
    dist = tl.maximum(diag[:, None] + norm[None, :] - 2.0 * proj, 0.0)
    dist = tl.where(live_k[None, :], dist, inf)
    nearest = tl.min(dist, axis=1)
    label = tl.min(tl.where(dist == nearest[:, None], kk[None, :], KP), axis=1).to(tl.int32)
    tl.store(labels_ptr + b * tokens + idx, label, mask=valid)


def _kernel():
    global tl
    triton = linkage_triton._load_triton()
    tl = linkage_triton.tl
    interpret = linkage_triton._interpreting()
    if interpret not in _KERNELS:   # jit decides interpreter or compiler when it wraps the function
        _KERNELS[interpret] = triton.jit(_kmeans_kernel)
    return _KERNELS[interpret]


@functools.lru_cache(maxsize=16)
def _draw_table(device: torch.device, k: int, tp: int, uniforms: tuple) -> Tensor:
    """The k-means++ draws as a float64 [k - 1, tp] device table, made once per (device, draws): a copy
    from the host each batch would make the encode pass wait for the device."""
    table = torch.zeros((max(k - 1, 1), tp), dtype=torch.float64)
    for row, draws in enumerate(uniforms):
        table[row, :len(draws)] = torch.as_tensor(draws, dtype=torch.float64)
    return table.to(device)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def kmeans_gram_triton(gram: Tensor, k: int, first: int, uniforms: list, iterations: int,
                       num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """k-means on the Gram matrices float64 [B, T, T] of centred features -> (labels long [B, T]
    after `iterations` Lloyd steps, k-means++ centre tokens long [B, k]).

    `first` and `uniforms` are sklearn_plusplus_draws(T, k, seed). Runs on CUDA tensors, or on CPU
    tensors when TRITON_INTERPRET=1 was set (slow: tests only)."""
    if gram.ndim != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram must be [B, T, T], got {tuple(gram.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    batch, tokens, _ = gram.shape
    kernel = _kernel()
    if not gram.is_cuda and not linkage_triton._interpreting():
        raise RuntimeError("the Triton k-means runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)")
    device = gram.device
    gram = gram.to(torch.float64).contiguous()
    trials = len(uniforms[0]) if uniforms else 1
    kp, tp = max(2, _next_pow2(k)), max(2, _next_pow2(trials))
    table = _draw_table(device, k, tp, tuple(tuple(float(u) for u in draws) for draws in uniforms))
    labels = torch.empty((batch, tokens), dtype=torch.int32, device=device)
    centres = torch.empty((batch, kp), dtype=torch.int32, device=device)
    if batch == 0 or tokens == 0:
        return labels.long(), centres[:, :k].long()
    scratch = torch.empty((batch, 2, tokens), dtype=torch.int32, device=device)
    block = max(16, _next_pow2(tokens))
    if num_warps is None:
        num_warps = max(1, min(8, block // 32))
    kernel[(batch,)](gram, table, scratch, labels, centres, tokens, int(first), int(iterations),
                     BLOCK=block, K=k, KP=kp, TRIALS=trials, TP=tp, JB=min(16, block), num_warps=num_warps)
    return labels.long(), centres[:, :k].long()
