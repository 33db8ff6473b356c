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
  first `structure_samples` samples, computed on CPU, in `structure_workers` spawned processes that
  read the canvases from memory-mapped files (no pickling of tensors). Default cap 10,000: they are
  per-sample means (bootstrap intervals), and they cost ~50 CPU-ms a sample (region clustering of
  three levels plus plan adherence; measured on the H200 host), so all 50,000 would need ~2,400
  CPU-s, more than the whole GPU pass; None takes every sample;
- re-encode agreement (ARI, Hungarian mIoU per level) for the first `reencode_samples` samples:
  their decoded final image is encoded again (encoder on `device`) and the hierarchy rebuilt on CPU;
- the first `keep` trajectories whole: every level's canvas and decoded image, regions, seeds, labels.

Noise is drawn with models.trajectory.level_noises (per-sample CPU generators, so every sample is
the same in any batch), in `noise_threads` threads one batch ahead, into pinned memory.
With `overlap_features` (default on cuda) the feature passes of batch b run in a thread (on
cuda on a side stream) while batch b+1 is sampled and decoded. Timing is main-thread wall time
per phase, with a synchronisation of the main stream at each phase boundary: "features" is then
the wait for the features, "features_busy" the feature thread's own time, "structure_copy" the
copies into the structure workers' shared memory (inside "structure").

`reference_stats` computes the real side the same way (flat dict of arrays, keys
"<feature>.mean|cov|count" and "kid.features"), and `metric_values` turns a result and a
reference into models.trajectory_metrics.MetricValues. Pure torch / numpy: no I/O.
"""
from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from models.decoder import tensor_to_images
from models.encoder import encode_images
from models.hierarchy import HierarchySpec, build_hierarchies
from models.metrics import StreamingStats, frechet_distance
from models.trajectory import level_noises, sample_trajectory
from models.trajectory_metrics import MetricValues, generated_regions, reencode_agreement, structural_consistency

DINOV2, FID = "fd_dinov2", "fid"
KID_FEATURES = "kid.features"
PHASES = ("noise", "sampling", "decode", "features", "stats", "reencode", "structure")
DEFAULT_STRUCTURE_SAMPLES = 10_000
_U64 = np.uint64


def level_key(level: int, variant: str) -> str:
    """Statistics name of a per-level FD feature, variant "mean_pooled" or "tokens"."""
    return f"level{level}.{variant}"


def token_subsample(sample_index: np.ndarray, tokens: int, per_sample: int, seed: int = 0) -> np.ndarray:
    """Token positions [n, per_sample] (with replacement) for the "tokens" FD variant.

    A hash (splitmix64) of (seed, sample index, draw), so sample i gets the same tokens in any batch.
    """
    index = np.asarray(sample_index, dtype=np.uint64).reshape(-1, 1)
    draw = np.arange(per_sample, dtype=np.uint64)[None, :]
    key = np.full(1, int(seed) % 2**64, dtype=np.uint64) * _U64(0x9E3779B97F4A7C15)   # arrays wrap silently
    x = key ^ (index << _U64(20)) ^ draw
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    x = x ^ (x >> _U64(31))
    return (x % _U64(tokens)).astype(np.int64)


class _Moments:
    """Count, mean and M2 of features on a torch device (float64), the StreamingStats update."""

    def __init__(self, dim: int, device: torch.device):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x: Tensor) -> None:
        x = x.to(self.mean.device, torch.float64).reshape(len(x), -1)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(0)
        centred = x - batch_mean
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += centred.T @ centred + torch.outer(delta, delta) * (self.count * n / total)
        self.count = total

    def stats(self) -> StreamingStats:
        out = StreamingStats(self.mean.numel())
        # StreamingStats has no constructor from moments; these are its documented state (count, mean, M2).
        out.count, out._mean, out._m2 = self.count, self.mean.cpu().numpy(), self.m2.cpu().numpy()
        return out


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
                                               # "reencode_ari" / "reencode_miou" [R, L-1] (float64)
    kept: KeptTrajectories
    inception_pool: np.ndarray | None          # [min(N, kid_reservoir), 2048] float32
    inception_logits: np.ndarray | None        # [min(N, is_reservoir), 1008] float32
    timing: dict[str, float]                   # seconds per phase (PHASES), "structure_cpu", "total"
    counts: dict[str, int]
    labels: np.ndarray = field(repr=False, default=None)   # [N] the drawn labels
    seeds: np.ndarray = field(repr=False, default=None)    # [N]


# ---------------------------------------------------------------------------
# Noise, one batch ahead, in threads
# ---------------------------------------------------------------------------


class _NoiseFeeder:
    def __init__(self, seeds: np.ndarray, batch: int, shape: tuple[int, int, int], device: torch.device,
                 threads: int):
        self.seeds, self.batch, self.shape, self.device = seeds, batch, shape, device
        self.threads = max(1, threads)
        self.pool = cf.ThreadPoolExecutor(self.threads) if threads > 0 else None
        levels, tokens, channels = shape
        pin = device.type == "cuda"
        self.buffers = [torch.empty((levels, batch, tokens, channels), pin_memory=pin)
                        for _ in range(2 if self.pool else 1)]
        self.copied = [None] * len(self.buffers)   # CUDA event: the buffer's last copy to the device is done
        self.pending: dict[int, list] = {}

    def _fill(self, slot: int, seeds: np.ndarray, offset: int) -> None:
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()
        noises = level_noises(self.shape[0], self.shape[1], self.shape[2], seeds.tolist(), "cpu")
        for level, x in enumerate(noises):
            self.buffers[slot][level, offset:offset + len(seeds)].copy_(x)

    def _submit(self, b: int) -> None:
        start = b * self.batch
        seeds = self.seeds[start:start + self.batch]
        slot = b % len(self.buffers)
        step = math.ceil(len(seeds) / self.threads)
        jobs = [(slot, seeds[i:i + step], i) for i in range(0, len(seeds), step)]
        if self.pool is None:
            for job in jobs:
                self._fill(*job)
            self.pending[b] = []
        else:
            self.pending[b] = [self.pool.submit(self._fill, *job) for job in jobs]

    def get(self, b: int) -> Tensor:
        """[L, n, T, C] noise of batch b on the device (the next batch is started right after)."""
        if b not in self.pending:
            self._submit(b)
        for future in self.pending.pop(b):
            future.result()
        slot = b % len(self.buffers)
        n = len(self.seeds[b * self.batch:(b + 1) * self.batch])
        view = self.buffers[slot][:, :n]
        if self.device.type == "cpu":
            out = view.clone()
        else:
            out = view.to(self.device, non_blocking=True)
            self.copied[slot] = torch.cuda.Event()
            self.copied[slot].record()
        if (b + 1) * self.batch < len(self.seeds) and self.pool is not None:
            self._submit(b + 1)
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------
# Structure (CPU): per-sample nesting / plan adherence, re-encode agreement
# ---------------------------------------------------------------------------


def _structure_chunk(canvases: np.ndarray, reencoded: np.ndarray | None, threshold: float,
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


def _structure_chunk_mapped(canvas_file: str, canvas_shape: tuple, lo: int, hi: int,
                            reencode_file: str | None, reencode_shape: tuple | None, r_lo: int, r_hi: int,
                            threshold: float, spec: HierarchySpec | None, want_regions: int) -> dict:
    canvases = np.memmap(canvas_file, dtype=np.float32, mode="r", shape=canvas_shape)[:, lo:hi]
    reencoded = None
    if reencode_file is not None and r_hi > r_lo:
        reencoded = np.memmap(reencode_file, dtype=np.float32, mode="r", shape=reencode_shape)[r_lo:r_hi]
    return _structure_chunk(canvases, reencoded, threshold, spec, want_regions)


def _worker_init() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    torch.set_num_threads(1)


def _shared_dir(needed_bytes: int) -> str:
    base = "/dev/shm"
    if os.path.isdir(base) and os.access(base, os.W_OK) and shutil.disk_usage(base).free > 2 * needed_bytes:
        return tempfile.mkdtemp(prefix="tf-eval-", dir=base)
    return tempfile.mkdtemp(prefix="tf-eval-")


class _StructureRunner:
    """Runs _structure_chunk inline (workers=0) or in spawned processes over memory-mapped batches."""

    def __init__(self, num_samples: int, reencode: int, levels: int, batch: int, tokens: int, channels: int,
                 reencode_shape: tuple | None, threshold: float, spec: HierarchySpec | None, want_regions: int,
                 workers: int, inflight: int):
        self.levels, self.threshold, self.spec, self.want = levels, threshold, spec, want_regions
        self.nesting = np.full((num_samples, max(levels - 2, 0)), np.nan)
        self.plan = np.full((num_samples, levels - 1), np.nan)
        self.ari = np.full((reencode, levels - 1), np.nan)
        self.miou = np.full((reencode, levels - 1), np.nan)
        self.regions = np.zeros((min(want_regions, num_samples), levels - 1, tokens), dtype=np.int64)
        self.cpu_s = 0.0
        self.copy_s = 0.0
        self.workers = workers
        self.pool = None
        self.dir = None
        if workers > 0 and num_samples > 0:
            slot_bytes = levels * batch * tokens * channels * 4
            r_bytes = int(np.prod(reencode_shape)) * 4 if reencode_shape else 0
            self.dir = _shared_dir(inflight * slot_bytes + r_bytes)
            self.slot_shape = (levels, batch, tokens, channels)
            inflight = max(1, min(inflight, math.ceil(num_samples / batch)))
            self.slots = [os.path.join(self.dir, f"slot{i}.f32") for i in range(inflight)]
            self.slot_maps = [np.memmap(p, dtype=np.float32, mode="w+", shape=self.slot_shape) for p in self.slots]
            self.slot_futures: list[list] = [[] for _ in self.slots]
            self.reencode_file = None
            if reencode_shape and reencode_shape[0] > 0:
                self.reencode_file = os.path.join(self.dir, "reencode.f32")
                self.reencode_map = np.memmap(self.reencode_file, dtype=np.float32, mode="w+", shape=reencode_shape)
            self.reencode_shape = reencode_shape
            self.pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=_worker_init)

    def _store(self, start: int, out: dict) -> None:
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
        s = canvases[0].shape[0]
        want = max(0, min(self.want - start, s))
        if self.pool is None:
            arrays = np.stack([c.float().cpu().numpy() for c in canvases])
            self._store(start, _structure_chunk(arrays, reencoded, self.threshold, self.spec, want))
            return
        slot = batch_index % len(self.slots)
        self._drain(slot)
        copy_started = time.perf_counter()
        target = torch.from_numpy(self.slot_maps[slot])
        for level, c in enumerate(canvases):
            target[level, :s].copy_(c)
        r = 0 if reencoded is None else len(reencoded)
        if r:
            self.reencode_map[start:start + r] = reencoded
        self.copy_s += time.perf_counter() - copy_started
        step = max(1, math.ceil(s / (2 * self.workers)))
        for lo in range(0, s, step):
            hi = min(lo + step, s)
            r_lo, r_hi = start + lo, start + min(hi, r)
            future = self.pool.submit(_structure_chunk_mapped, self.slots[slot], self.slot_shape, lo, hi,
                                      self.reencode_file if r_hi > r_lo else None, self.reencode_shape,
                                      r_lo, r_hi, self.threshold, self.spec, max(0, min(want - lo, hi - lo)))
            self.slot_futures[slot].append((start + lo, future))

    def _drain(self, slot: int) -> None:
        for start, future in self.slot_futures[slot]:
            self._store(start, future.result())
        self.slot_futures[slot] = []

    def finish(self) -> None:
        if self.pool is not None:
            for slot in range(len(self.slots)):
                self._drain(slot)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.dir is not None:
            self.slot_maps, self.reencode_map = [], None
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


# ---------------------------------------------------------------------------
# Feature passes, optionally overlapped with the next batch
# ---------------------------------------------------------------------------


class _FeatureRunner:
    def __init__(self, dinov2_fn, inception_fn, device: torch.device, dtype: torch.dtype | None, overlap: bool):
        self.dinov2_fn, self.inception_fn, self.device, self.dtype = dinov2_fn, inception_fn, device, dtype
        self.pool = cf.ThreadPoolExecutor(1) if overlap else None
        self.stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None
        self.busy = 0.0

    def _run(self, images: np.ndarray):
        started = time.perf_counter()
        # no_grad, autocast and the current stream are per thread: set them here.
        stream = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with torch.no_grad(), stream, _autocast(self.device, self.dtype):
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


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------


def _as_device_tensor(x, device: torch.device) -> Tensor:
    return x.to(device) if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x)).to(device)


def _folder(moments: dict[str, _Moments], device: torch.device) -> Callable[[str, object], None]:
    """fold(name, features [n, ...]): update (creating on first use) the named running statistics."""
    def fold(name: str, x) -> None:
        x = _as_device_tensor(x, device)
        x = x.reshape(len(x), -1)
        if name not in moments:
            moments[name] = _Moments(x.shape[1], device)
        moments[name].update(x)

    return fold


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
    region_threshold: float = 0.05,
    keep: int = 64,
    reencode_samples: int = 512,
    structure_samples: int | None = DEFAULT_STRUCTURE_SAMPLES,
    tokens_per_sample: int = 4,
    token_seed: int = 0,
    kid_reservoir: int = 10_000,
    is_reservoir: int = 50_000,
    structure_workers: int = 0,
    noise_threads: int = 0,
    max_inflight: int = 3,
    overlap_features: bool | None = None,
    token_shape: tuple[int, int] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> StreamingEvalResult:
    """Sample len(seeds) trajectories in batches and fold them into streaming metric state.

    generators: one module per level (eval mode, on `device`); decoder: tokens [B,T,C] -> images
    [B,3,H,W] in [0,1]. Labels are default_rng(label_seed).choice(label_pool, N). dtype: autocast
    dtype for every network (default bf16 on cuda, none on cpu). dinov2_fn: uint8 [n,H,W,3] ->
    [n, D]; inception_fn (optional): -> {"pool": [n, 2048], "logits": [n, 1008]}; both run under
    the same autocast. Re-encode agreement needs `encoder` and `hierarchy_spec` (spec.num_levels
    must be L-1). structure_workers=0 computes structure in this thread; noise_threads=0 draws
    noise in this thread; max_inflight bounds the batches handed to structure workers and not yet
    done (each a shared-memory slot of L*B*T*C float32). overlap_features: None = on for cuda.
    progress(done, total, timing) is called after every batch.
    """
    device = torch.device(device)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    autocast = _autocast(device, dtype)
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
    n_total, levels = len(seeds), len(generators)
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
    moments: dict[str, _Moments] = {}
    pools, logits = [], []
    pool_kept = logit_kept = 0
    kept_canvas, kept_images = [], []
    reencode_shape = None
    feeder = _NoiseFeeder(seeds, batch, (levels, tokens, channels), device, noise_threads)
    features = _FeatureRunner(dinov2_fn, inception_fn, device, dtype,
                              device.type == "cuda" if overlap_features is None else overlap_features)
    fold = _folder(moments, device)
    pending = None   # (start, n, future) of the batch whose features are in flight
    runner = None

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
                trajectory = sample_trajectory(generators, [noise[level] for level in range(levels)],
                                               label_device[start:stop])
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
            for level, canvas in enumerate(trajectory):
                fold(level_key(level, "mean_pooled"), canvas.mean(1, dtype=torch.float64))
                if tokens_per_sample > 0:
                    fold(level_key(level, "tokens"), canvas[rows, picks].reshape(-1, channels))
            clock.lap("stats")

            s = max(0, min(structure_n - start, n))
            if s:
                if runner is None:
                    runner = _StructureRunner(structure_n, reencode_n, levels, batch, tokens, channels,
                                              reencode_shape, region_threshold, hierarchy_spec,
                                              max(keep_n, reencode_n), structure_workers, max(1, max_inflight))
                runner.submit(b, start, [c[:s] for c in trajectory], reencoded)
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
        regions = runner.regions[:keep_n]
        structure_cpu = runner.cpu_s
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
        timing=timing, counts=counts, labels=labels, seeds=seeds)


# ---------------------------------------------------------------------------
# Real side and metric values
# ---------------------------------------------------------------------------


@torch.no_grad()
def reference_stats(
    batches: Iterable[tuple[np.ndarray, Sequence[np.ndarray | Tensor]]],
    dinov2_fn: Callable[[np.ndarray], np.ndarray],
    *,
    inception_fn: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokens_per_sample: int = 4,
    token_seed: int = 0,
    kid_reservoir: int = 10_000,
) -> dict[str, np.ndarray]:
    """Real-side statistics, streamed like evaluate_streaming's generated side.

    batches yield (images uint8 [b,H,W,3], canvases: L arrays [b,T,C], the teacher canvases of
    those images in the generators' normalised space, the last level the latent itself).
    Returns a flat dict of arrays: "<name>.mean" [D], "<name>.cov" [D,D], "<name>.count" (int64
    scalar) for DINOV2, FID (with inception_fn) and level_key(l, "mean_pooled" | "tokens"), and
    KID_FEATURES [min(M, kid_reservoir), 2048] (the first real pool vectors).
    """
    device = torch.device(device)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    autocast = _autocast(device, dtype)
    moments: dict[str, _Moments] = {}
    fold = _folder(moments, device)
    kid, kid_kept, seen = [], 0, 0

    for images, canvases in batches:
        n = len(images)
        with autocast:
            fold(DINOV2, dinov2_fn(images))
            inception = inception_fn(images) if inception_fn is not None else None
        if inception is not None:
            fold(FID, inception["pool"])
            take = max(0, min(kid_reservoir - kid_kept, n))
            if take:
                kid.append(np.asarray(inception["pool"][:take], dtype=np.float32))
                kid_kept += take
        rows = torch.arange(n, device=device)[:, None]
        for level, canvas in enumerate(canvases):
            canvas = _as_device_tensor(canvas, device).float()
            if len(canvas) != n:
                raise ValueError(f"level {level}: {len(canvas)} canvases for {n} images")
            fold(level_key(level, "mean_pooled"), canvas.mean(1, dtype=torch.float64))
            if tokens_per_sample > 0:
                picks = torch.from_numpy(token_subsample(np.arange(seen, seen + n), canvas.shape[1],
                                                         tokens_per_sample, token_seed)).to(device)
                fold(level_key(level, "tokens"), canvas[rows, picks].reshape(-1, canvas.shape[-1]))
        seen += n
    out: dict[str, np.ndarray] = {}
    for name, m in moments.items():
        stats = m.stats()
        out[f"{name}.mean"], out[f"{name}.cov"] = stats.mean, stats.cov
        out[f"{name}.count"] = np.asarray(stats.count, dtype=np.int64)
    if kid:
        out[KID_FEATURES] = np.concatenate(kid)
    return out


def _isc_splits(num_images: int, splits: int) -> int:
    """At most `splits`, at least 2 images per split (a 1-image split always scores IS = 1)."""
    return max(1, min(splits, num_images // 2))


def metric_values(
    result: StreamingEvalResult,
    reference: dict[str, np.ndarray],
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 0,
    is_splits: int = 10,
) -> list[MetricValues]:
    """Metric values of a streamed evaluation against real reference statistics.

    Pooled (one number, extra["n"] = generated count): quality fd_dinov2, fid, kid (extra "std"),
    is (extra "std", "splits"); per_level fd_level, variants "mean_pooled" and "tokens". Per sample:
    structure nesting (levels 0..L-3), plan_adherence (0..L-2), reencode_ari / reencode_miou
    (0..L-2). A metric whose inputs are missing (no Inception features, no reference entry, no
    samples) is left out; the caller writes it as skipped.
    """
    out: list[MetricValues] = []

    def fd(name: str) -> float | None:
        stats = result.stats.get(name)
        if stats is None or stats.count < 2 or f"{name}.mean" not in reference:
            return None
        return frechet_distance(stats.mean, stats.cov, reference[f"{name}.mean"], reference[f"{name}.cov"])

    for name in (DINOV2, FID):
        value = fd(name)
        if value is not None:
            out.append(MetricValues("quality", name, np.array([value]), pooled=True,
                                    extra={"n": result.stats[name].count}))
    if result.inception_pool is not None and KID_FEATURES in reference:
        from models.fidelity import kid_from_features   # torch-fidelity only where Inception is used

        mean, std = kid_from_features(result.inception_pool, reference[KID_FEATURES], subsets=kid_subsets,
                                      subset_size=kid_subset_size, seed=kid_seed)
        out.append(MetricValues("quality", "kid", np.array([mean]), pooled=True,
                                extra={"n": len(result.inception_pool), "std": std}))
    if result.inception_logits is not None and len(result.inception_logits) >= 2:
        from models.fidelity import inception_score_from_logits

        splits = _isc_splits(len(result.inception_logits), is_splits)
        mean, std = inception_score_from_logits(result.inception_logits, splits=splits)
        out.append(MetricValues("quality", "is", np.array([mean]), pooled=True,
                                extra={"n": len(result.inception_logits), "std": std, "splits": splits}))
    for level in range(result.num_levels):
        for variant in ("mean_pooled", "tokens"):
            name = level_key(level, variant)
            value = fd(name)
            if value is not None:
                out.append(MetricValues("per_level", "fd_level", np.array([value]), level, variant, pooled=True,
                                        extra={"n": result.stats[name].count}))
    for metric in ("nesting", "plan_adherence", "reencode_ari", "reencode_miou"):
        values = result.per_sample.get(metric)
        if values is None or len(values) == 0:
            continue
        for level in range(values.shape[1]):
            out.append(MetricValues("structure", metric, values[:, level].copy(), level))
    return out
