"""A suite of edits per level and the controllability metrics over it (DESIGN §3 edits, §4).

For each level l*, `edits_per_level` edits alternate between token exchange (the region
takes a donor trajectory's level-l* tokens) and region mean (the region is filled with
the donor's mean over the same region). Every edit is scored against its parent:
locality (latent and pixels), adherence to the source vs the unedited baseline, and
preservation (coarser levels bit-identical, PSNR/SSIM outside the region).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.evaluation.image_metrics import locality, psnr, ssim
from models.generator.trajectory import Edit, apply_edit, region_mean_source
from models.evaluation.trajectory_metrics import MetricValues

EDIT_KINDS = ("token_exchange", "region_mean")
PSNR_CAP_DB = 100.0   # identical pixels give inf; cap so a mean over edits stays a number


def _pick_region(ids: np.ndarray, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """A region that is neither empty nor the whole grid when one exists."""
    regions, counts = np.unique(ids, return_counts=True)
    partial = regions[counts < len(ids)]
    region = int(rng.choice(partial if len(partial) else regions))
    return region, ids == region


def _mean_cos(a: Tensor, b: Tensor, mask: Tensor) -> float:
    cos = torch.nn.functional.cosine_similarity(a[mask].float(), b[mask].float(), dim=-1)
    return float(cos.mean()) if len(cos) else float("nan")


def pixel_mask(mask: np.ndarray, grid: int, patch: int) -> np.ndarray:
    """Token mask [T] -> pixel mask [grid*patch, grid*patch]."""
    return np.kron(mask.reshape(grid, grid), np.ones((patch, patch), bool)).astype(bool)


def plan_edits(num_samples: int, regions: Sequence[np.ndarray], num_levels: int, per_level: int,
               seed: int) -> list[dict]:
    """Edit specs: parent, donor, level, kind and region (a partition region; last level uses the finest partition)."""
    rng = np.random.default_rng(seed)
    specs = []
    for level in range(num_levels):
        partition = regions[min(level, len(regions) - 1)]
        for k in range(per_level):
            parent = int(rng.integers(num_samples))
            donor = int((parent + 1 + rng.integers(num_samples - 1)) % num_samples)
            region, _ = _pick_region(partition[parent], rng)
            specs.append({"level": level, "parent": parent, "donor": donor, "region": region,
                          "kind": EDIT_KINDS[k % len(EDIT_KINDS)]})
    return specs


@torch.no_grad()
def run_edit_suite(models: Sequence[nn.Module], noises: Sequence[Tensor], label: Tensor, base: Sequence[Tensor],
                   regions: Sequence[np.ndarray], specs: list[dict],
                   decode: Callable[[Tensor], np.ndarray], grid: int, patch: int,
                   snap_threshold: float | None = None) -> tuple[list[MetricValues], list[list[Tensor]]]:
    """Apply every planned edit (batched per level) and score it; the finer levels are re-sampled with
    the base's sampler (snap_threshold). Returns (metrics, edited trajectories)."""
    values: dict[tuple[str, int, str], list[float]] = {}
    edited_all: list[list[Tensor]] = []
    base_images = decode(base[-1])

    def record(metric: str, level: int, kind: str, value: float) -> None:
        values.setdefault((metric, level, kind), []).append(value)

    for level in sorted({s["level"] for s in specs}):
        batch = [s for s in specs if s["level"] == level]
        parent = torch.tensor([s["parent"] for s in batch])
        donor = torch.tensor([s["donor"] for s in batch])
        partition = regions[min(level, len(regions) - 1)]
        mask = torch.from_numpy(np.stack([partition[s["parent"]] == s["region"] for s in batch]))
        mask = mask.to(base[level].device)
        donor_canvas = base[level][donor]
        exchange = torch.tensor([s["kind"] == "token_exchange" for s in batch], device=mask.device)
        source = torch.where(exchange[:, None, None], donor_canvas, region_mean_source(donor_canvas, mask))
        parents_base = [c[parent] for c in base]
        edited = apply_edit(models, [n[parent] for n in noises], label[parent], parents_base,
                            Edit(level=level, mask=mask, source=source), snap_threshold)
        edited_all.append(edited)
        images = decode(edited[-1])
        for i, spec in enumerate(batch):
            kind, m = spec["kind"], mask[i]
            m_np = m.cpu().numpy()
            pix = pixel_mask(m_np, grid, patch)
            before, after = parents_base[-1][i].cpu().numpy(), edited[-1][i].cpu().numpy()
            original = base_images[spec["parent"]]
            record("locality_latent", level, kind, locality(before, after, m_np))
            record("locality_pixel", level, kind, locality(original.astype(np.float64), images[i].astype(np.float64), pix))
            record("adherence", level, kind, _mean_cos(edited[-1][i], source[i], m))
            record("adherence_baseline", level, kind, _mean_cos(parents_base[-1][i], source[i], m))
            coarse_same = all(torch.equal(edited[k][i], parents_base[k][i]) for k in range(level))
            record("preservation_coarse_identical", level, kind, float(coarse_same))
            record("preservation_psnr_outside", level, kind, min(psnr(original, images[i], ~pix), PSNR_CAP_DB))
            record("preservation_ssim_outside", level, kind, ssim(original, images[i], ~pix))
    metrics = [MetricValues("control", metric, np.asarray(v, dtype=np.float64), level, kind)
               for (metric, level, kind), v in values.items()]
    return metrics, edited_all
