"""Per-sample structure values of streamed trajectories, computed on CPU (DESIGN §4).

A `StructureChunk` is one block of samples with what the per-sample metrics read, each computed once
when first asked for: the generated regions of every partitioned level (the plan), the hierarchy
rebuilt from the re-encoded decoded image, the hierarchy rebuilt on the final latent
("final_hierarchy": the reference a staged run and the flat baseline both have), and the scenes
judge's partition. `structure_chunk` runs every registered metric's `score_chunk` on it
(models.evaluation.registry). A block of one level is a flat-baseline block (the final latent only): no
plan, and its regions are those of the rebuilt hierarchy. `InlineStructure` collects the blocks of a
streamed evaluation by sample; tasks.evaluate.structure_pool runs the same chunks in worker processes.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cached_property

import numpy as np
from torch import Tensor

from models.hierarchy.reference import HierarchySpec, build_hierarchies
from models.evaluation.registry import registered
from models.evaluation.trajectory_metrics import generated_regions


def final_hierarchy(final: np.ndarray, spec: HierarchySpec, latent_stats: tuple | None = None) -> np.ndarray:
    """Region ids [n, spec.partition_levels, T] of the teacher hierarchy rebuilt on final latents [n, T, C].
    They are normalised latents, which is what the teacher clusters (the standardised latents), so
    they are clustered as they are; latent_stats is not needed here (kept for callers)."""
    n, tokens, channels = final.shape
    grid = int(round(tokens ** 0.5))
    return build_hierarchies(np.asarray(final, np.float32).reshape(n, grid, grid, channels), spec).reshape(n, -1, tokens)


class StructureChunk:
    """canvases [L, n, T, C] (L = 1: the flat baseline's final latent alone); reencoded [r, g, g, Ce]
    raw tokens of the first r samples (or None); latent_stats (mean, std) of the normalised latents
    (the re-encoded tokens are standardised with them, like the teacher's input); judged [n, P, T]:
    the scenes judge's partition of each decoded final image; regions [n, L - 1, T]: the generated
    regions when the caller found them already (on the GPU), else they are found here; adherence [n, L - 1]:
    the plan adherence found with them (models.evaluation.regions_batched.plan_adherence_batched). With
    both, the canvases need only the rows the re-encode values read (the first r): n is the regions'."""

    def __init__(self, canvases: np.ndarray, reencoded: np.ndarray | None, threshold: float,
                 spec: HierarchySpec | None, want_regions: int, latent_stats: tuple | None = None,
                 judged: np.ndarray | None = None, regions: np.ndarray | None = None,
                 adherence: np.ndarray | None = None):
        self.levels = [np.asarray(canvases[level]) for level in range(canvases.shape[0])]
        if regions is not None:   # [n, L - 1, T], found on the device (models.evaluation.regions_batched)
            self.__dict__["regions"] = [np.asarray(regions[:, level], np.int64) for level in range(regions.shape[1])]
        self.n = canvases.shape[1] if regions is None else regions.shape[0]
        self.adherence = adherence
        self.r = 0 if reencoded is None else len(reencoded)
        self.flat = len(self.levels) == 1
        self.reencoded, self.threshold, self.spec = reencoded, threshold, spec
        self.want_regions, self.latent_stats, self.judged = want_regions, latent_stats, judged

    @cached_property
    def regions(self) -> list[np.ndarray]:
        """Generated region ids [n, T] of each partitioned level (staged only: the plan)."""
        return generated_regions(self.levels, self.threshold)

    @cached_property
    def final_regions(self) -> np.ndarray:
        """[m, spec.partition_levels, T]: the hierarchy rebuilt on the final latent, for the first
        m = max(r, want_regions in flat mode) samples."""
        m = max(self.r, self.want_regions if self.flat else 0)
        return final_hierarchy(self.levels[-1][:m], self.spec, self.latent_stats)

    @cached_property
    def reencoded_regions(self) -> np.ndarray:
        """[r, spec.partition_levels, T]: the hierarchy rebuilt on the re-encoded raw tokens, standardised."""
        rebuilt = build_hierarchies(np.asarray(self.reencoded), self.spec, stats=self.latent_stats)
        return rebuilt.reshape(self.r, rebuilt.shape[1], -1)

    def kept_regions(self) -> np.ndarray:
        """Regions of the first want_regions samples: the plan, or (flat) the rebuilt final hierarchy."""
        if not self.flat:
            return np.stack(self.regions, 1)[:self.want_regions].astype(np.int64)
        wanted = min(self.n, self.want_regions)
        if self.spec is None or wanted == 0:   # nothing to rebuild, or no region wanted
            partitions = 0 if self.spec is None else self.spec.partition_levels
            return np.zeros((wanted, partitions, self.levels[0].shape[1]), np.int64)
        return self.final_regions[:self.want_regions].astype(np.int64)


def structure_chunk(canvases: np.ndarray, reencoded: np.ndarray | None, threshold: float,
                    spec: HierarchySpec | None, want_regions: int, latent_stats: tuple | None = None,
                    judged: np.ndarray | None = None, regions: np.ndarray | None = None,
                    adherence: np.ndarray | None = None) -> dict:
    """Every registered metric's per-sample values of one block (StructureChunk's arguments):
    {"values": {per_sample key: [n or r, ...]}, "regions": kept regions, "cpu_s": CPU seconds}."""
    started = time.process_time()
    chunk = StructureChunk(canvases, reencoded, threshold, spec, want_regions, latent_stats, judged, regions,
                           adherence)
    values = {}
    for metric in registered():
        values.update(metric.score_chunk(chunk))
    return {"values": values, "regions": chunk.kept_regions(), "cpu_s": time.process_time() - started}


class InlineStructure:
    """Structure values of the first `num_samples` samples (re-encode values of the first `reencode`),
    computed in the calling thread as batches arrive."""

    def __init__(self, num_samples: int, reencode: int, levels: int, batch: int, tokens: int, channels: int,
                 reencode_shape: tuple | None, threshold: float, spec: HierarchySpec | None, want_regions: int,
                 latent_stats: tuple | None = None):
        self.levels, self.threshold, self.spec, self.want = levels, threshold, spec, want_regions
        self.latent_stats = latent_stats
        self.parts: dict[str, list[tuple[int, np.ndarray]]] = {}
        self.regions = np.zeros((min(want_regions, num_samples), levels - 1, tokens), dtype=np.int64)
        self.cpu_s = 0.0
        self.copy_s = 0.0

    def store(self, start: int, out: dict) -> None:
        """Keep one structure_chunk result for samples start.."""
        for key, values in out["values"].items():
            self.parts.setdefault(key, []).append((start, values))
        regions = out["regions"]
        self.regions[start:start + len(regions)] = regions
        self.cpu_s += out["cpu_s"]

    def per_sample(self) -> dict[str, np.ndarray]:
        """Every per-sample key's values in sample order (the blocks cover the first samples, once each)."""
        return {key: np.concatenate([values for _, values in sorted(parts, key=lambda part: part[0])])
                for key, parts in self.parts.items()}

    def submit(self, batch_index: int, start: int, canvases: Sequence[Tensor], reencoded: np.ndarray | None,
               judged: np.ndarray | None = None, regions: np.ndarray | None = None,
               adherence: np.ndarray | None = None) -> None:
        """canvases: L tensors [s, T, C] (any device) of samples start..start+s (one tensor: the flat
        baseline's final latent); reencoded [r, g, g, Ce]; judged [s, P, T] the judge's regions; regions
        [s, L - 1, T] the generated regions when already found, adherence [s, L - 1] the plan adherence with
        them (then the canvases may hold only their first r rows)."""
        want = max(0, min(self.want - start, canvases[0].shape[0] if regions is None else len(regions)))
        arrays = np.stack([c.float().cpu().numpy() for c in canvases])
        self.store(start, structure_chunk(arrays, reencoded, self.threshold, self.spec, want, self.latent_stats,
                                          judged, regions, adherence))

    def finish(self) -> None:
        """Wait for every submitted batch (nothing is pending inline)."""

    def close(self) -> None:
        """Release workers and shared memory (none inline)."""
