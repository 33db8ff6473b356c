"""Generated canvases' regions for a whole batch on the device (evaluation structure scoring).

The same partition as models.evaluation.metrics.regions_from_canvas, which runs scipy per canvas on the
CPU (about 9 of the 12 CPU-ms a sample the structure metrics cost; on the GPU machine they bounded the first
10,000 samples of a 50,000-sample evaluation, docs/gpu.md): average linkage (UPGMA) under cosine
distance, every merge at height <= threshold taken, ids 0..k-1 in raster order of first appearance.
Distances are formed in float64 as the reference forms them, then merged in float32 by the batched
hierarchy's loop (models.hierarchy.batched.merge_loop: the Triton kernel on CUDA). All-zero tokens are
at distance 0 from each other and 1 from everything else. No I/O here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.hierarchy.batched import _INF, _canonical, merge_loop


def cosine_distances(canvases: Tensor) -> Tensor:
    """float32 [n, T, T]: 1 - cos between the tokens of each canvas [n, T, C] (computed in float64, clipped
    to [0, 2], symmetric), the zero-token rule above, inf on the diagonal (no self-merge)."""
    x = canvases.to(torch.float64)
    norms = x.norm(dim=2)
    zero = norms == 0
    unit = x / torch.where(zero, torch.ones_like(norms), norms)[..., None]
    dist = (1.0 - unit @ unit.transpose(1, 2)).clamp(0.0, 2.0)
    both_zero = zero[:, :, None] & zero[:, None, :]
    one_zero = zero[:, :, None] ^ zero[:, None, :]
    dist = torch.where(both_zero, torch.zeros_like(dist), torch.where(one_zero, torch.ones_like(dist), dist))
    dist = 0.5 * (dist + dist.transpose(1, 2))
    eye = torch.eye(dist.shape[1], dtype=torch.bool, device=dist.device)[None]
    return torch.where(eye, torch.full_like(dist, _INF), dist).to(torch.float32)


@torch.no_grad()
def regions_batched(canvases: Tensor, threshold: float, linkage: str = "auto") -> Tensor:
    """long [n, T] region ids of each canvas [n, T, C] (any float dtype, any device)."""
    n, tokens = canvases.shape[0], canvases.shape[1]
    if n == 0 or tokens <= 1:
        return torch.zeros((n, tokens), dtype=torch.long, device=canvases.device)
    valid = torch.ones((n, tokens), dtype=torch.bool, device=canvases.device)
    heights, snapshots, steps = merge_loop(cosine_distances(canvases), valid, linkage)
    # UPGMA has no inversions, so the merges at height <= threshold are a prefix of the loop's
    taken = ((heights <= threshold) & torch.isfinite(heights)).sum(1).clamp(max=steps)
    labels = snapshots[taken, torch.arange(n, device=canvases.device)].long()
    return _canonical(labels, valid) - 1


@torch.no_grad()
def plan_adherence_batched(canvas: Tensor, final: Tensor, ids: Tensor, chunk: int = 128) -> Tensor:
    """float64 [n]: models.evaluation.metrics.plan_adherence of each sample, for a batch on its device:
    (1/T) sum_t cos(canvas_t, the mean of `final` over t's region), a zero vector at cosine 0 with anything.
    canvas, final [n, T, C]; ids long [n, T] in 0..T-1 (regions_batched's). In float64 as the reference,
    `chunk` samples at a time (a chunk's region sums are [chunk, T, C] float64)."""
    out = []
    for start in range(0, canvas.shape[0], chunk):
        c, f = canvas[start:start + chunk].double(), final[start:start + chunk].double()
        labels = ids[start:start + chunk].long()
        spread = labels[..., None].expand(-1, -1, f.shape[2])
        sums = torch.zeros_like(f).scatter_add_(1, spread, f)
        counts = torch.zeros(labels.shape, dtype=torch.float64, device=f.device).scatter_add_(
            1, labels, torch.ones_like(labels, dtype=torch.float64))
        means = sums.gather(1, spread) / counts.gather(1, labels)[..., None]
        denominator = c.norm(dim=2) * means.norm(dim=2)
        dots = (c * means).sum(2)
        cosine = torch.where(denominator > 0, dots / torch.where(denominator > 0, denominator, 1.0), 0.0)
        out.append(cosine.mean(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64, device=canvas.device)
