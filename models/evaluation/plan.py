"""What a streamed evaluation computes and how it runs: the grouped arguments of
models.evaluation.streaming_eval.evaluate_streaming.

- `EvalPlan`: the sizes and seeds (how many samples get which treatment, which tokens feed the
  token FD, the reservoir caps) and the sampler (mode, snapping). Metric entries read it too.
- `Scorers`: the networks and specs that score samples (feature extractors, the scenes judge, the
  re-encoding encoder and the hierarchy it rebuilds).
- `Runtime`: where and how it runs; none of it changes a value.

Pure dataclasses: no torch at import.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from models.hierarchy.reference import HierarchySpec


@dataclass(frozen=True, kw_only=True)
class EvalPlan:
    """Sizes and seeds. keep: trajectories returned whole; structure_samples: the first ones scored on
    CPU (None: all); reencode_samples: the first ones re-encoded (at most structure_samples);
    tokens_per_sample: tokens per sample in the "tokens" FD variant (chosen by sample index alone);
    kid_reservoir / is_reservoir: the first Inception pool / logit vectors kept for KID / IS. Samples
    are i.i.d. (one seed each), so the first k are a uniform subset; taking the first k keeps every
    value independent of the batch size. Labels are default_rng(label_seed).choice(label_pool, N).
    mode "flat": the one-step baseline. snap_threshold: sample with snapped canvases
    (models.generator.trajectory.snap_to_regions); None is the reference sampler.
    No defaults for what the config sets (tasks.plan.eval_plan: the evaluate section, the generator's
    mode, the trajectories kept); token_seed and the reservoir caps are this module's fixed constants."""
    batch_size: int
    keep: int
    structure_samples: int | None
    reencode_samples: int
    tokens_per_sample: int
    token_seed: int = 0               # fixed: the seed of the token FD's picks
    kid_reservoir: int = 10_000       # fixed: the first 10k Inception pool vectors are kept for KID
    is_reservoir: int = 50_000        # fixed: the first 50k logit vectors are kept for IS
    label_seed: int
    region_threshold: float
    snap_threshold: float | None
    mode: str

    def __post_init__(self):
        if self.mode not in ("staged", "flat"):
            raise ValueError(f"mode must be 'staged' or 'flat', got {self.mode!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class Scorers:
    """dinov2: uint8 [n,H,W,3] -> [n, D] (FD-DINOv2); inception (optional): -> {"pool": [n, 2048],
    "logits": [n, 1008]}; judge (optional, models.evaluation.judge.judge_fn at the token grid): -> {"features"
    [n, D], "logits" [n, classes], "regions" [n, L-1, T]}. Re-encode agreement needs `encoder` and
    `hierarchy_spec` (spec.partition_levels = L-1; the flat mode needs the spec for its level count);
    latent_stats: (mean, std) [C] of the normalised latents, so the hierarchy rebuilt on re-encoded
    tokens sees the teacher's scale."""
    dinov2: Callable[[Any], Any] | None = None
    inception: Callable[[Any], dict] | None = None
    judge: Callable[[Any], dict] | None = None
    encoder: nn.Module | None = None
    hierarchy_spec: HierarchySpec | None = None
    latent_stats: tuple | None = None


@dataclass(frozen=True)
class Runtime:
    """device / dtype: every network runs under autocast(dtype) (default bf16 on cuda, none on cpu).
    structure_runner: a factory with models.evaluation.structure_stream.InlineStructure's signature
    (tasks.evaluate.structure_pool.process_structure for worker processes). noise_threads=0 draws noise in
    this thread. overlap_features: feature passes in a side thread (None: on for cuda).
    progress(done, total, timing) is called after every batch. regions_on_device: the generated regions of the
    structure-scored samples found on the device in batch (models.evaluation.regions_batched; None: on
    cuda), the same partition the structure workers would find with scipy."""
    device: str | torch.device = "cpu"
    dtype: torch.dtype | None = None
    structure_runner: Callable[..., Any] | None = None
    noise_threads: int = 0
    overlap_features: bool | None = None
    progress: Callable[[int, int, dict], None] | None = None
    regions_on_device: bool | None = None
