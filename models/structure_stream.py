"""Per-sample structure values of streamed trajectories, computed on CPU (DESIGN §4).

`structure_chunk` scores one block of samples: nesting and plan adherence from the
generated regions, and re-encode agreement (ARI, Hungarian mIoU) for those whose decoded
image was encoded again, against two references: the trajectory's own regions (its plan), and
the hierarchy rebuilt on its final latent ("final_hierarchy": the reference both a staged run and
the flat baseline have). A block of one level is a flat-baseline block (the final latent only):
no plan, so no nesting / plan adherence (NaN), and its regions are those of the rebuilt hierarchy. `InlineStructure` collects the blocks of a streamed evaluation in
arrays indexed by sample; tasks.structure_pool runs the same chunks in worker processes.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from models.hierarchy import HierarchySpec, build_hierarchies
from models.trajectory_metrics import MetricValues, generated_regions, reencode_agreement, structural_consistency


def final_hierarchy(final: np.ndarray, spec: HierarchySpec, latent_stats: tuple | None = None) -> np.ndarray:
    """Region ids [n, spec.num_levels, T] of the teacher hierarchy rebuilt on final latents [n, T, C].
    They are normalised latents, which is what the teacher clusters (the standardised latents), so
    they are clustered as they are; latent_stats is not needed here (kept for callers)."""
    n, tokens, channels = final.shape
    grid = int(round(tokens ** 0.5))
    return build_hierarchies(np.asarray(final, np.float32).reshape(n, grid, grid, channels), spec).reshape(n, -1, tokens)


def structure_chunk(canvases: np.ndarray, reencoded: np.ndarray | None, threshold: float,
                     spec: HierarchySpec | None, want_regions: int, latent_stats: tuple | None = None,
                     judged: np.ndarray | None = None) -> dict:
    """canvases [L, n, T, C] (L = 1: the flat baseline's final latent alone); reencoded [r, g, g, Ce]
    raw tokens of the first r samples (or None); latent_stats (mean, std) of the normalised latents;
    judged [n, P, T]: the scenes judge's partition of each decoded final image (pixel-space plan
    adherence against the trajectory's own regions, levels beyond P NaN)."""
    started = time.process_time()
    levels = [np.asarray(canvases[level]) for level in range(canvases.shape[0])]
    n = canvases.shape[1]
    r = 0 if reencoded is None else len(reencoded)
    flat = len(levels) == 1
    rebuilt_final = None
    if spec is not None and (r or flat and want_regions):
        rebuilt_final = final_hierarchy(levels[-1][:max(r, want_regions if flat else 0)], spec, latent_stats)

    def stack(metric_values: list[MetricValues], metric: str, rows: int) -> np.ndarray:
        chosen = [v.values for v in metric_values if v.metric == metric]
        return np.stack(chosen, 1).astype(np.float64) if chosen else np.empty((rows, 0))

    if flat:   # no plan: nothing to nest or adhere to; the rebuilt hierarchy stands in for the regions
        partitions = 0 if spec is None else spec.num_levels
        out = {"nesting": np.full((n, max(partitions - 1, 0)), np.nan), "plan_adherence": np.full((n, partitions), np.nan),
               "regions": (rebuilt_final[:want_regions] if rebuilt_final is not None
                           else np.zeros((min(n, want_regions), partitions, levels[0].shape[1]))).astype(np.int64)}
    else:
        regions = generated_regions(levels, threshold)
        values = structural_consistency(levels, regions)
        out = {"nesting": stack(values, "nesting", n), "plan_adherence": stack(values, "plan_adherence", n),
               "regions": np.stack(regions, 1)[:want_regions].astype(np.int64)}
    if r:   # raw re-encoded tokens, standardised like the teacher's input when the stats are known
        rebuilt = build_hierarchies(np.asarray(reencoded), spec, stats=latent_stats)
        rebuilt = rebuilt.reshape(r, rebuilt.shape[1], -1)
        if not flat:
            agreement = reencode_agreement([ids[:r] for ids in regions], rebuilt)
            out["reencode_ari"] = stack(agreement, "reencode_ari", r)
            out["reencode_miou"] = stack(agreement, "reencode_miou", r)
        final_ids = rebuilt_final[:r]
        agreement = reencode_agreement([final_ids[:, level] for level in range(final_ids.shape[1])], rebuilt)
        out["reencode_ari_final"] = stack(agreement, "reencode_ari", r)
        out["reencode_miou_final"] = stack(agreement, "reencode_miou", r)
    if judged is not None and not flat:   # the same agreement as re-encoding, the judge's partition in its place
        ari, miou = np.full((n, len(regions)), np.nan), np.full((n, len(regions)), np.nan)
        shared = min(len(regions), judged.shape[1])
        agreement = reencode_agreement(regions[:shared], np.asarray(judged))
        ari[:, :shared], miou[:, :shared] = stack(agreement, "reencode_ari", n), stack(agreement, "reencode_miou", n)
        out["judge_plan_ari"], out["judge_plan_miou"] = ari, miou
    out["cpu_s"] = time.process_time() - started
    return out



class InlineStructure:
    """Structure values of the first `num_samples` samples (re-encode values of the first `reencode`),
    computed in the calling thread as batches arrive."""

    def __init__(self, num_samples: int, reencode: int, levels: int, batch: int, tokens: int, channels: int,
                 reencode_shape: tuple | None, threshold: float, spec: HierarchySpec | None, want_regions: int,
                 latent_stats: tuple | None = None):
        self.levels, self.threshold, self.spec, self.want = levels, threshold, spec, want_regions
        self.latent_stats = latent_stats
        self.nesting = np.full((num_samples, max(levels - 2, 0)), np.nan)
        self.plan = np.full((num_samples, levels - 1), np.nan)
        self.ari = np.full((reencode, levels - 1), np.nan)
        self.miou = np.full((reencode, levels - 1), np.nan)
        self.ari_final = np.full((reencode, levels - 1), np.nan)
        self.miou_final = np.full((reencode, levels - 1), np.nan)
        self.judge_ari = np.full((num_samples, levels - 1), np.nan)
        self.judge_miou = np.full((num_samples, levels - 1), np.nan)
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
        if "reencode_ari_final" in out:
            r = len(out["reencode_ari_final"])
            self.ari_final[start:start + r] = out["reencode_ari_final"]
            self.miou_final[start:start + r] = out["reencode_miou_final"]
        if "judge_plan_ari" in out:
            self.judge_ari[start:start + n] = out["judge_plan_ari"]
            self.judge_miou[start:start + n] = out["judge_plan_miou"]
        self.cpu_s += out["cpu_s"]

    def submit(self, batch_index: int, start: int, canvases: Sequence[Tensor], reencoded: np.ndarray | None,
               judged: np.ndarray | None = None) -> None:
        """canvases: L tensors [s, T, C] (any device) of samples start..start+s (one tensor: the flat
        baseline's final latent); reencoded [r, g, g, Ce]; judged [s, P, T] the judge's regions."""
        want = max(0, min(self.want - start, canvases[0].shape[0]))
        arrays = np.stack([c.float().cpu().numpy() for c in canvases])
        self.store(start, structure_chunk(arrays, reencoded, self.threshold, self.spec, want, self.latent_stats,
                                          judged))

    def finish(self) -> None:
        """Wait for every submitted batch (nothing is pending inline)."""

    def close(self) -> None:
        """Release workers and shared memory (none inline)."""
