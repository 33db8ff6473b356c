"""Per-sample structure values of streamed trajectories, computed on CPU (DESIGN §4).

`structure_chunk` scores one block of samples: nesting and plan adherence from the
generated regions, and re-encode agreement (ARI, Hungarian mIoU) for those whose decoded
image was encoded again. `InlineStructure` collects the blocks of a streamed evaluation in
arrays indexed by sample; tasks.structure_pool runs the same chunks in worker processes.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from models.hierarchy import HierarchySpec, build_hierarchies
from models.trajectory_metrics import MetricValues, generated_regions, reencode_agreement, structural_consistency


def structure_chunk(canvases: np.ndarray, reencoded: np.ndarray | None, threshold: float,
                     spec: HierarchySpec | None, want_regions: int) -> dict:
    """canvases [L, n, T, C]; reencoded [r, g, g, Ce] raw tokens of the first r samples (or None)."""
    started = time.process_time()
    levels = [np.asarray(canvases[level]) for level in range(canvases.shape[0])]
    regions = generated_regions(levels, threshold)
    values = structural_consistency(levels, regions)
    n = canvases.shape[1]

    def stack(metric_values: list[MetricValues], metric: str, rows: int) -> np.ndarray:
        chosen = [v.values for v in metric_values if v.metric == metric]
        return np.stack(chosen, 1).astype(np.float64) if chosen else np.empty((rows, 0))

    out = {"nesting": stack(values, "nesting", n), "plan_adherence": stack(values, "plan_adherence", n),
           "regions": np.stack(regions, 1)[:want_regions].astype(np.int64)}
    if reencoded is not None and len(reencoded):
        r = len(reencoded)
        rebuilt = build_hierarchies(np.asarray(reencoded), spec)
        agreement = reencode_agreement([ids[:r] for ids in regions], rebuilt.reshape(r, rebuilt.shape[1], -1))
        out["reencode_ari"] = stack(agreement, "reencode_ari", r)
        out["reencode_miou"] = stack(agreement, "reencode_miou", r)
    out["cpu_s"] = time.process_time() - started
    return out



class InlineStructure:
    """Structure values of the first `num_samples` samples (re-encode values of the first `reencode`),
    computed in the calling thread as batches arrive."""

    def __init__(self, num_samples: int, reencode: int, levels: int, batch: int, tokens: int, channels: int,
                 reencode_shape: tuple | None, threshold: float, spec: HierarchySpec | None, want_regions: int):
        self.levels, self.threshold, self.spec, self.want = levels, threshold, spec, want_regions
        self.nesting = np.full((num_samples, max(levels - 2, 0)), np.nan)
        self.plan = np.full((num_samples, levels - 1), np.nan)
        self.ari = np.full((reencode, levels - 1), np.nan)
        self.miou = np.full((reencode, levels - 1), np.nan)
        self.regions = np.zeros((min(want_regions, num_samples), levels - 1, tokens), dtype=np.int64)
        self.cpu_s = 0.0
        self.copy_s = 0.0

    def store(self, start: int, out: dict) -> None:
        """Put one structure_chunk result for samples start.. in place."""
        n = len(out["nesting"])
        self.nesting[start:start + n] = out["nesting"]
        self.plan[start:start + n] = out["plan_adherence"]
        regions = out["regions"]
        self.regions[start:start + len(regions)] = regions
        if "reencode_ari" in out:
            r = len(out["reencode_ari"])
            self.ari[start:start + r] = out["reencode_ari"]
            self.miou[start:start + r] = out["reencode_miou"]
        self.cpu_s += out["cpu_s"]

    def submit(self, batch_index: int, start: int, canvases: Sequence[Tensor], reencoded: np.ndarray | None) -> None:
        """canvases: L tensors [s, T, C] (any device) of samples start..start+s; reencoded [r, g, g, Ce]."""
        want = max(0, min(self.want - start, canvases[0].shape[0]))
        arrays = np.stack([c.float().cpu().numpy() for c in canvases])
        self.store(start, structure_chunk(arrays, reencoded, self.threshold, self.spec, want))

    def finish(self) -> None:
        """Wait for every submitted batch (nothing is pending inline)."""

    def close(self) -> None:
        """Release workers and shared memory (none inline)."""
