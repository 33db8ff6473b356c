"""Streaming evaluation of sampled trajectories (DESIGN §4 metrics, §7 "50k samples in 3 minutes").

`evaluate_streaming` samples N trajectories batch by batch, so that N = 50,000 never sits in
memory, and folds every batch into:

- running Gaussian statistics (count, mean, M2; float64, kept on `device`) of the FD features:
  "fd_dinov2" (dinov2_fn of the decoded final image), "fid" (Inception pool features), and per
  level "level{l}.mean_pooled" (canvas mean over tokens) and "level{l}.tokens" (`tokens_per_sample`
  tokens per sample, chosen by `token_subsample`, so the choice depends on the sample index alone);
- reservoirs of Inception features for KID / IS: the first `kid_reservoir` pool vectors and the
  first `is_reservoir` logit vectors. Samples are i.i.d. (one seed each), so the first k are a
  uniform subset; taking the first k keeps the result independent of the batch size. Defaults:
  10,000 pool vectors (80 MB, float64 KID math on 100 subsets of 1,000) and 50,000 logits
  (the protocol's 10 splits of 5,000; 200 MB in float32);
- per-sample structure values (nesting, plan adherence) from models.trajectory_metrics for the
  first `structure_samples` samples, computed on CPU by `structure_runner` (models.structure_stream's
  InlineStructure by default; tasks.structure_pool.process_structure runs them in spawned processes
  over memory-mapped batches). Default cap 10,000: they are
  per-sample means (bootstrap intervals), and they cost ~50 CPU-ms a sample (region clustering of
  three levels plus plan adherence; measured on the H200 host), so all 50,000 would need ~2,400
  CPU-s, more than the whole GPU pass; None takes every sample;
- re-encode agreement (ARI, Hungarian mIoU per level) for the first `reencode_samples` samples:
  their decoded final image is encoded again (encoder on `device`) and the hierarchy rebuilt on CPU;
- the first `keep` trajectories whole: every level's canvas and decoded image, regions, seeds, labels;
- with `judge_fn` (the scenes judge, models.judge.judge_fn), for every decoded final image: its
  penultimate features folded into "fd_scenes" statistics, whether its predicted class is the
  conditioning label ("class_correct"), and, for the structure-scored samples, its partition per token
  against the trajectory's own regions (ARI / Hungarian mIoU per level, "judge_plan_ari" / "_miou").

mode="flat" evaluates the flat baseline (models.flat) the same way: `generators` is the one flat
model, sampled in one step from the last level's noise (the noise a staged run's final level gets
for the same seed) straight to the final latent. Its trajectory is the final latent alone: the
level-(L-1) FD statistics, FD-DINOv2 / FID / KID / IS of the decoded final, and re-encode agreement
against the hierarchy rebuilt on the final ("final_hierarchy", which a staged run gets too); no
per-level canvases, so no per-level FD below L-1, no nesting, plan adherence or plan re-encode values.

Noise is drawn with models.trajectory.level_noises (per-sample CPU generators, so every sample is
the same in any batch), in `noise_threads` threads one batch ahead, into pinned memory.
With `overlap_features` (default on cuda) the feature passes of batch b run in a thread (on
cuda on a side stream) while batch b+1 is sampled and decoded. Timing is main-thread wall time
per phase, with a synchronisation of the main stream at each phase boundary: "features" is then
the wait for the features, "features_busy" the feature thread's own time, "structure_copy" the
copies into the structure workers' shared memory (inside "structure").

models.eval_stats has the statistics: `reference_stats` computes the real side the same way
(flat dict of arrays, keys "<feature>.mean|cov|count" and "kid.features"), and `metric_values`
turns a result and a reference into models.trajectory_metrics.MetricValues. No I/O here.
"""
from __future__ import annotations

import concurrent.futures as cf
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from models.decoder import tensor_to_images
from models.encoder import encode_images
from models.eval_stats import (DINOV2, FID, JUDGE, KID_FEATURES, RunningMoments, autocast_for, level_key,  # noqa: F401
                               metric_values, moment_folder, reference_stats, token_subsample)
from models.hierarchy import HierarchySpec
from models.metrics import REGION_THRESHOLD, StreamingStats
from models.flat import sample_flat
from models.noise_feeder import NoiseFeeder
from models.structure_stream import InlineStructure
from models.trajectory import own_regions_cut, sample_trajectory

PHASES = ("noise", "sampling", "decode", "judge", "features", "stats", "reencode", "structure")
DEFAULT_STRUCTURE_SAMPLES = 10_000


@dataclass
class KeptTrajectories:
    seeds: np.ndarray        # [K] int64
    labels: np.ndarray       # [K] int64
    canvases: np.ndarray     # [K, L, T, C] float32
    images: np.ndarray       # [K, L, H, W, 3] uint8, every level decoded
    regions: np.ndarray      # [K, L-1, T] int64 ([K, L-1, 0] when structure was skipped)


@dataclass
class StreamingEvalResult:
    num_samples: int
    num_levels: int
    stats: dict[str, StreamingStats]           # generated side, keys DINOV2, FID, level_key(l, variant)
    per_sample: dict[str, np.ndarray]          # "nesting" [S, L-2], "plan_adherence" [S, L-1],
                                               # "reencode_ari" / "reencode_miou" [R, L-1] (float64);
                                               # with a judge: "class_correct" [N], "judge_plan_ari" /
                                               # "judge_plan_miou" [S, L-1]
    kept: KeptTrajectories
    inception_pool: np.ndarray | None          # [min(N, kid_reservoir), 2048] float32
    inception_logits: np.ndarray | None        # [min(N, is_reservoir), 1008] float32
    timing: dict[str, float]                   # seconds per phase (PHASES), "structure_cpu", "total"
    counts: dict[str, int]
    labels: np.ndarray = field(repr=False, default=None)   # [N] the drawn labels
    seeds: np.ndarray = field(repr=False, default=None)    # [N]
    mode: str = "staged"                                   # "flat": canvases / images hold the final only



class _FeatureRunner:
    """DINOv2 / Inception features of decoded batches, in a side thread (and CUDA stream) when overlapping."""

    def __init__(self, dinov2_fn, inception_fn, device: torch.device, dtype: torch.dtype | None, overlap: bool):
        self.dinov2_fn, self.inception_fn, self.device, self.dtype = dinov2_fn, inception_fn, device, dtype
        self.pool = cf.ThreadPoolExecutor(1) if overlap else None
        self.stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
        self.busy = 0.0

    def _run(self, images: np.ndarray):
        started = time.perf_counter()
        # no_grad, autocast and the current stream are per thread: set them here.
        stream = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with torch.no_grad(), stream, autocast_for(self.device, self.dtype):
            dino = self.dinov2_fn(images)
            inception = self.inception_fn(images) if self.inception_fn is not None else None
            if self.stream is not None:
                self.stream.synchronize()
        self.busy += time.perf_counter() - started
        return dino, inception

    def submit(self, images: np.ndarray) -> cf.Future:
        if self.pool is not None:
            return self.pool.submit(self._run, images)
        future: cf.Future = cf.Future()
        future.set_result(self._run(images))
        return future

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)



def _token_shape(decoder: nn.Module, token_shape: tuple[int, int] | None) -> tuple[int, int]:
    if token_shape is not None:
        return int(token_shape[0]), int(token_shape[1])
    config = getattr(decoder, "config", None)
    if config is None or not hasattr(config, "grid") or not hasattr(config, "token_dim"):
        raise ValueError("pass token_shape=(T, C): the decoder has no config.grid / config.token_dim")
    return config.grid * config.grid, config.token_dim


class _Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.timing = {phase: 0.0 for phase in PHASES}
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        self.timing[phase] += now - self.last
        self.last = now


@torch.no_grad()
def evaluate_streaming(
    generators: Sequence[nn.Module],
    decoder: nn.Module,
    seeds: Sequence[int] | np.ndarray,
    label_pool: np.ndarray,
    dinov2_fn: Callable[[np.ndarray], np.ndarray],
    *,
    inception_fn: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
    encoder: nn.Module | None = None,
    hierarchy_spec: HierarchySpec | None = None,
    label_seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    region_threshold: float = REGION_THRESHOLD,
    snap_threshold: float | None = None,
    keep: int = 64,
    reencode_samples: int = 512,
    structure_samples: int | None = DEFAULT_STRUCTURE_SAMPLES,
    tokens_per_sample: int = 4,
    token_seed: int = 0,
    kid_reservoir: int = 10_000,
    is_reservoir: int = 50_000,
    structure_runner: Callable[..., InlineStructure] | None = None,
    noise_threads: int = 0,
    overlap_features: bool | None = None,
    token_shape: tuple[int, int] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    mode: str = "staged",
    latent_stats: tuple[np.ndarray, np.ndarray] | None = None,
    judge_fn: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
) -> StreamingEvalResult:
    """Sample len(seeds) trajectories in batches and fold them into streaming metric state.

    generators: one module per level (eval mode, on `device`); decoder: tokens [B,T,C] -> images
    [B,3,H,W] in [0,1]. Labels are default_rng(label_seed).choice(label_pool, N). dtype: autocast
    dtype for every network (default bf16 on cuda, none on cpu). dinov2_fn: uint8 [n,H,W,3] ->
    [n, D]; inception_fn (optional): -> {"pool": [n, 2048], "logits": [n, 1008]}; both run under
    the same autocast. Re-encode agreement needs `encoder` and `hierarchy_spec` (spec.num_levels
    must be L-1). structure_runner: a factory with InlineStructure's signature (default:
    InlineStructure, in this thread; tasks.structure_pool.process_structure(workers, inflight) for
    worker processes). noise_threads=0 draws noise in this thread. overlap_features: None = on for cuda.
    progress(done, total, timing) is called after every batch. mode="flat": generators is [the flat
    model], L = hierarchy_spec.num_levels + 1 (required). latent_stats: (mean, std) [C] of the
    normalised latents, so the hierarchy rebuilt on a final latent sees the encoder's scale.
    judge_fn (optional): uint8 [n,H,W,3] -> {"features" [n, D], "logits" [n, classes], "regions"
    [n, L-1, T]} (models.judge.judge_fn at the token grid), run in this thread in float32.
    snap_threshold: sample with snapped canvases (models.trajectory.snap_to_regions); None is the
    reference sampler.
    """
    device = torch.device(device)
    if mode not in ("staged", "flat"):
        raise ValueError(f"mode must be 'staged' or 'flat', got {mode!r}")
    flat = mode == "flat"
    if flat and (len(generators) != 1 or hierarchy_spec is None):
        raise ValueError("mode='flat' takes one generator and a hierarchy_spec (it sets the number of levels)")
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    autocast = autocast_for(device, dtype)
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
    n_total = len(seeds)
    levels = hierarchy_spec.num_levels + 1 if flat else len(generators)
    if n_total == 0:
        raise ValueError("no seeds")
    if levels < 2:
        raise ValueError("need at least two levels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    tokens, channels = _token_shape(decoder, token_shape)
    labels = np.random.default_rng(label_seed).choice(np.asarray(label_pool), n_total).astype(np.int64)
    label_device = torch.from_numpy(labels).to(device)
    structure_n = n_total if structure_samples is None else max(0, min(int(structure_samples), n_total))
    reencode_n = 0
    if encoder is not None and hierarchy_spec is not None:
        if hierarchy_spec.num_levels != levels - 1:
            raise ValueError(f"hierarchy spec has {hierarchy_spec.num_levels} levels, trajectories {levels - 1}")
        reencode_n = max(0, min(int(reencode_samples), structure_n))
    keep_n = max(0, min(int(keep), n_total))
    batch = min(batch_size, n_total)

    clock = _Clock(device)
    started = clock.last
    moments: dict[str, RunningMoments] = {}
    pools, logits = [], []
    pool_kept = logit_kept = 0
    kept_canvas, kept_images = [], []
    reencode_shape = None
    feeder = NoiseFeeder(seeds, batch, (levels, tokens, channels), device, noise_threads)
    features = _FeatureRunner(dinov2_fn, inception_fn, device, dtype,
                              device.type == "cuda" if overlap_features is None else overlap_features)
    fold = moment_folder(moments, device)
    pending = None   # (start, n, future) of the batch whose features are in flight
    runner = None
    class_correct = []

    def fold_features(start: int, n: int, future: cf.Future) -> None:
        nonlocal pool_kept, logit_kept
        dino, inception = future.result()
        fold(DINOV2, dino)
        if inception is None:
            return
        fold(FID, inception["pool"])
        take = max(0, min(kid_reservoir - pool_kept, n))
        if take:
            pools.append(np.asarray(inception["pool"][:take], dtype=np.float32))
            pool_kept += take
        take = max(0, min(is_reservoir - logit_kept, n))
        if take:
            logits.append(np.asarray(inception["logits"][:take], dtype=np.float32))
            logit_kept += take

    try:
        for b, start in enumerate(range(0, n_total, batch)):
            stop = min(start + batch, n_total)
            n = stop - start
            noise = feeder.get(b)
            clock.lap("noise")

            with autocast:
                if flat:   # one network call from the final level's noise: the latent alone
                    trajectory = [sample_flat(generators[0], noise[levels - 1], label_device[start:stop], levels)]
                else:
                    trajectory = sample_trajectory(generators, [noise[level] for level in range(levels)],
                                                   label_device[start:stop], snap_threshold=snap_threshold)
            trajectory = [c.float() for c in trajectory]
            del noise
            clock.lap("sampling")

            with autocast:
                images = tensor_to_images(decoder(trajectory[-1]))
                k = max(0, min(keep_n - start, n))
                if k:
                    kept_canvas.append(torch.stack([c[:k] for c in trajectory], 1).cpu().numpy())
                    kept_images.append(np.stack([tensor_to_images(decoder(c[:k])) for c in trajectory[:-1]]
                                                + [images[:k]], 1))
            clock.lap("decode")

            judged = None
            if judge_fn is not None:   # small network: in this thread, so its regions go with this batch
                verdict = judge_fn(images)
                fold(JUDGE, verdict["features"])
                class_correct.append(np.asarray(verdict["logits"]).argmax(1) == labels[start:stop])
                judged = np.asarray(verdict["regions"], dtype=np.int64).reshape(n, -1, tokens)   # [n, P, T]
            clock.lap("judge")

            r = max(0, min(reencode_n - start, n))
            reencoded = None
            if r:
                if pending is not None:   # the encoder may be the feature thread's DINOv2: not both at once
                    fold_features(*pending)
                    pending = None
                with autocast:
                    reencoded = encode_images(encoder, images[:r], device=device, batch_size=r, dtype=dtype)
                reencode_shape = (reencode_n, *reencoded.shape[1:])
            clock.lap("reencode")

            future = features.submit(images)
            if pending is not None:
                fold_features(*pending)
            pending = (start, n, future)
            clock.lap("features")

            rows = torch.arange(n, device=device)[:, None]
            picks = torch.from_numpy(token_subsample(np.arange(start, stop), tokens, tokens_per_sample,
                                                     token_seed)).to(device)
            for level, canvas in enumerate(trajectory, start=levels - len(trajectory)):
                fold(level_key(level, "mean_pooled"), canvas.mean(1, dtype=torch.float64))
                if tokens_per_sample > 0:
                    fold(level_key(level, "tokens"), canvas[rows, picks].reshape(-1, channels))
            clock.lap("stats")

            s = max(0, min(structure_n - start, n))
            if s:
                if runner is None:
                    make_runner = structure_runner or InlineStructure
                    extra = {} if latent_stats is None else {"latent_stats": latent_stats}
                    runner = make_runner(structure_n, reencode_n, levels, batch, tokens, channels,
                                         reencode_shape, own_regions_cut(region_threshold, snap_threshold),
                                         hierarchy_spec, max(keep_n, reencode_n),
                                         **extra)
                runner.submit(b, start, [c[:s] for c in trajectory], reencoded,
                              **({} if judged is None or flat else {"judged": judged[:s]}))
            del trajectory
            clock.lap("structure")
            if progress is not None:
                progress(stop, n_total, dict(clock.timing))
        fold_features(*pending)
        clock.lap("features")
        if runner is not None:
            runner.finish()
        clock.lap("structure")
    finally:
        feeder.close()
        features.close()
        if runner is not None:
            runner.close()

    per_sample = {"nesting": np.empty((0, max(levels - 2, 0))), "plan_adherence": np.empty((0, levels - 1)),
                  "reencode_ari": np.empty((0, levels - 1)), "reencode_miou": np.empty((0, levels - 1))}
    regions = np.zeros((keep_n, levels - 1, 0), dtype=np.int64)
    structure_cpu = 0.0
    if runner is not None:
        per_sample = {"nesting": runner.nesting, "plan_adherence": runner.plan,
                      "reencode_ari": runner.ari, "reencode_miou": runner.miou}
        if hasattr(runner, "ari_final"):
            per_sample.update(reencode_ari_final=runner.ari_final, reencode_miou_final=runner.miou_final)
        if judge_fn is not None and not flat:
            per_sample.update(judge_plan_ari=runner.judge_ari, judge_plan_miou=runner.judge_miou)
        if flat:   # no plan: these stay out (the caller writes them as skipped)
            for key in ("nesting", "plan_adherence", "reencode_ari", "reencode_miou"):
                per_sample[key] = np.empty((0, per_sample[key].shape[1]))
        regions = runner.regions[:keep_n]
        structure_cpu = runner.cpu_s
    if class_correct:
        per_sample["class_correct"] = np.concatenate(class_correct).astype(np.float64)
    timing = dict(clock.timing)
    timing["structure_cpu"] = structure_cpu
    timing["structure_copy"] = runner.copy_s if runner is not None else 0.0
    timing["features_busy"] = features.busy
    timing["total"] = time.perf_counter() - started
    empty_images = np.zeros((0, levels, 0, 0, 3), np.uint8)
    kept = KeptTrajectories(seeds[:keep_n], labels[:keep_n],
                            np.concatenate(kept_canvas) if kept_canvas else np.zeros((0, levels, tokens, channels), np.float32),
                            np.concatenate(kept_images) if kept_images else empty_images, regions)
    counts = {"samples": n_total, "batches": math.ceil(n_total / batch), "batch_size": batch,
              "structure_samples": structure_n, "reencode_samples": reencode_n, "kept": keep_n,
              "kid_reservoir": pool_kept, "is_reservoir": logit_kept, "tokens_per_sample": tokens_per_sample}
    return StreamingEvalResult(
        num_samples=n_total, num_levels=levels, stats={name: m.stats() for name, m in moments.items()},
        per_sample=per_sample, kept=kept,
        inception_pool=np.concatenate(pools) if pools else None,
        inception_logits=np.concatenate(logits) if logits else None,
        timing=timing, counts=counts, labels=labels, seeds=seeds, mode=mode)

