"""Training loops for one level's generator and for the decoder, resumable bit-for-bit.

AdamW or the reference's Muon (models/generator/optim.py), linear warmup, optional gradient clipping,
EMA copies at several decays, optional torch.compile, bf16 autocast on CUDA. A diverged run stops with
NonFiniteTraining (models/nonfinite.py), read from a device-side flag at a cadence, not every step.
Pure torch: data arrives as tensors, progress leaves through `on_step` (a step's stats one step late, so
the host never waits for the GPU between steps; LaggedStats), and every `checkpoint_every`
steps `on_checkpoint(state)` gets the whole TrainState (export it with
models.generator.train_state.export_state); nothing is written here. `resume=(tensors, meta)`
continues an exported state exactly where it stopped.

Data parallel: with `world` > 1 every rank draws the same global batch indices and the same
global noise (identical generators) and keeps its own rows; the wrapper given by `wrap` (DDP)
averages the gradients, so N ranks follow the same trajectory as one process up to float sums.

Gradient accumulation: with cfg.device_batch set, a rank's rows run as near-equal micro-batches, each
loss weighted by its share of the rows, their gradients summed before the one optimiser step; the
step's random choices are drawn once for the whole batch, so only float rounding differs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from models.decoder import decoder_loss
from models.generator.meanflow import MeanFlowConfig, draw, meanflow_loss, time_derivative
from models.generator.optim import OptimConfig, build_optimizers
from models.generator.train_state import EMA, TrainState, import_state
from models.hierarchy.reference import region_canvas
from models.nonfinite import DivergenceWatch

__all__ = ["OptimConfig", "LevelData", "EMA", "TrainState", "new_state", "train_generator", "train_decoder"]

Exported = tuple[dict[str, Tensor], dict]
# One micro-batch of a step: its sample count and the forward that returns its (mean loss, stats)
MicroBatch = tuple[int, Callable[[], tuple[Tensor, dict]]]


@dataclass
class LevelData:
    """One level's training data. Canvases are built per batch on the device, never held as [N, T, C] floats
    per level (50k B-sized latents are 20 GB as stored, 40 GB a canvas in float32): the latents as stored,
    their channel statistics, and the region ids of the level's canvas (the target) and of the level before
    (the condition). One `tokens` tensor serves every level of a run."""
    tokens: Tensor              # [N, T, C] latents as stored (float16 / bfloat16 / float32), not normalised
    mean: Tensor                # [C] float32: a token is used as (token - mean) / std
    std: Tensor                 # [C] float32
    label: Tensor               # [N] int64
    target_ids: Tensor | None   # [N, T] level-l region ids (the region-variance loss's too); None: the latent
    cond_ids: Tensor | None     # [N, T] level-(l-1) region ids; None: no condition (zeros), level 0 and flat
    host_tokens: HostRows | None = field(default=None, repr=False, compare=False)   # resident(): tokens left on
    # the host, gathered through pinned buffers

    def batch(self, index: Tensor, device) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(target canvas, condition canvas, label, target region ids) of rows `index`, float32 on `device`:
        the same values as canvases of the whole set (each image's region means are its own)."""
        tokens = self.host_tokens.to_device(index, device) if self.host_tokens is not None else \
            self.tokens[without_waiting(index, self.tokens.device)].to(device, non_blocking=True)
        index = without_waiting(index, self.label.device)
        x = (tokens.float() - self.mean.to(device)) / self.std.to(device)
        bound = x.shape[1] + 1   # a teacher's ids: background 0, regions 1..k <= T (no host sync per step)
        ids = self.target_ids[index].to(device).long() if self.target_ids is not None else None
        target = x if ids is None else region_canvas(x, ids, bound)
        cond = torch.zeros_like(x) if self.cond_ids is None else \
            region_canvas(x, self.cond_ids[index].to(device).long(), bound)
        return target, cond, self.label[index].to(device), ids


def without_waiting(tensor: Tensor, device) -> Tensor:
    """`tensor` on `device`; a host tensor goes to a GPU through pinned memory, without the host waiting: the
    driver may stage a copy from pageable memory only after every kernel queued on the stream has run."""
    if tensor.is_cuda or torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class HostRows:
    """Rows of a host tensor gathered into one of two pinned buffers and copied to the GPU without the host
    waiting: a copy from pageable memory first waits for every kernel queued on the stream, so each
    micro-batch's start drained the GPU's queue before its forward was launched. The compiled B step at batch
    1,024 over 50k latents (which stay on the host) took 1.2-1.25 s on an H100 before, 1.06 s with these
    (another H100; docs/gpu.md). A buffer is reused two gathers later, once its copy has landed.

    The copy runs on a stream of its own, and only the micro-batch's first kernel waits for it: on the compute
    stream each copy (256 B-sized rows, 100 MB) left the GPU's cores idle for as long as it took, four
    times a step, while the host is queued a micro-batch ahead of the GPU (1.063-1.068 s a step in `tf
    pipeline`; 1.040 s after, 1.038 s with the latents resident: bench/train_profile.py, H100s)."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
        self.buffers: list[tuple[Tensor, torch.cuda.Event | None]] = []
        self.turn = 0
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def to_device(self, index: Tensor, device) -> Tensor:
        rows = len(index)
        if len(self.buffers) < 2 or self.buffers[0][0].shape[0] < rows:
            shape = (rows, *self.tensor.shape[1:])
            self.buffers = [(torch.empty(shape, dtype=self.tensor.dtype, pin_memory=True), None) for _ in range(2)]
        buffer, copied = self.buffers[self.turn]
        if copied is not None:
            copied.synchronize()   # this buffer's last copy (two micro-batches ago) has landed: long done
        torch.index_select(self.tensor, 0, index.cpu(), out=buffer[:rows])
        device = torch.device(device)
        compute = torch.cuda.current_stream(device)
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        side = self.streams[device]
        with torch.cuda.stream(side):   # allocated and written in the side stream's order
            out = buffer[:rows].to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        compute.wait_event(event)
        out.record_stream(compute)   # its memory is reused only once the compute stream is done with it
        self.buffers[self.turn] = (buffer, event)
        self.turn = 1 - self.turn
        return out


# Of the GPU's memory, at most, for a run's training data: the B preset's step at batch 256 takes ~58 GB
# uncompiled, so 20 GB of resident latents (50k) ran an H100 (79 GB) out of memory; on an H200 they fit.
DEVICE_RESIDENT_SHARE = 0.2


def resident(datasets: list[LevelData], device: str) -> list[LevelData]:
    """The levels' data moved to the GPU once when it fits (DEVICE_RESIDENT_SHARE of its memory), each
    tensor once however many levels share it: gathering a batch on the host and copying it every step
    otherwise bounds the step rate, far below what the GPU computes. When the latents do not fit, everything
    else (labels, region ids, statistics) still moves, and the latents are gathered through pinned buffers
    (HostRows): no micro-batch waits for the GPU's queue to drain."""
    if torch.device(device).type != "cuda":
        return datasets
    tensors = {id(t): t for d in datasets for t in (d.tokens, d.mean, d.std, d.label, d.target_ids, d.cond_ids)
               if t is not None}
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    fits = sum(t.numel() * t.element_size() for t in tensors.values()) <= DEVICE_RESIDENT_SHARE * total
    host = {id(d.tokens): HostRows(d.tokens) for d in datasets if not fits and d.tokens.device.type == "cpu"}
    moved = {key: t if key in host else t.to(device) for key, t in tensors.items()}
    out = [LevelData(*(moved[id(t)] if t is not None else None for t in (d.tokens, d.mean, d.std, d.label,
                                                                         d.target_ids, d.cond_ids)))
           for d in datasets]
    for level_data, original in zip(out, datasets):
        level_data.host_tokens = host.get(id(original.tokens))
    return out


def new_state(model: nn.Module, cfg: OptimConfig, device: str, resume: Exported | None = None) -> TrainState:
    """Fresh optimisers, EMAs and generators for `model`; then the exported state on top, if given."""
    model = model.to(device).train()
    optimizers, schedules = build_optimizers(model, cfg)
    emas = [EMA(model, decay) for decay in sorted(set(cfg.ema_decays))] + \
        [EMA(model, halflife_kimg=h, rampup=cfg.ema_rampup) for h in sorted(set(cfg.ema_halflives_kimg))]
    generators = {"sampler": torch.Generator().manual_seed(cfg.seed),
                  "noise": torch.Generator(device=device).manual_seed(cfg.seed)}
    state = TrainState(model, optimizers, schedules, emas, generators)
    return import_state(state, *resume) if resume is not None else state


def _fit(state: TrainState, cfg: OptimConfig, loss_fn: Callable[[], list[MicroBatch]],
         on_step: Callable[[int, dict], None] | None, on_checkpoint: Callable[[TrainState], None] | None) -> TrainState:
    """The steps up to cfg.steps; `loss_fn` draws a step's batch and returns its micro-batches. A NaN
    or infinite loss, gradient or weight raises NonFiniteTraining at the next read of the device-side
    flag (models/nonfinite.py: every CHECK_EVERY steps, before each snapshot, at the end), so no
    snapshot and no returned state holds diverged weights."""
    params = [p for p in state.model.parameters() if p.requires_grad]
    watch = DivergenceWatch(params[0].device, start=state.step)
    lagged = LaggedStats()

    def record(done: tuple[int, dict[str, float]] | None) -> None:
        if done is None:
            return
        step, values = done
        for name, value in values.items():
            state.history.setdefault(name, []).append(value)
        if on_step is not None:
            on_step(step, values)

    while state.step < cfg.steps:
        micro_batches = loss_fn()
        for optimizer in state.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss, stats = _accumulate(micro_batches)
        stats["grad_norm"] = gradient_norm(params, cfg.grad_clip)
        watch.observe(loss, stats["grad_norm"])
        for optimizer, schedule in zip(state.optimizers, state.schedules):
            optimizer.step()
            schedule.step()
        for ema in state.emas:   # the reference's k-th update uses the new step k (utils/ema_util.py)
            ema.update(state.model, state.step + 1)
        record(lagged.push(state.step, stats))   # this step's stats copy out; the last step's are read
        state.step += 1
        snapshot = on_checkpoint is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 \
            and state.step < cfg.steps
        if snapshot:
            watch.check(trained_weights(state))
        elif watch.due(state.step):
            watch.check()
        if snapshot:
            record(lagged.pop())   # a snapshot holds the history up to its own step
            on_checkpoint(state)
    record(lagged.pop())
    watch.check(trained_weights(state))   # cfg.steps may have been lowered by on_step (a clock-bound run)
    return state


def _accumulate(micro_batches: list[MicroBatch]) -> tuple[Tensor, dict]:
    """Forward and backward of each micro-batch in turn (one graph alive at a time), each loss weighted
    by its share of the samples: the summed gradient is the whole batch's mean-loss gradient. Returns
    the step's loss and stats, size-weighted means of the micro-batches' (left as they are for one)."""
    if len(micro_batches) == 1:
        loss, stats = micro_batches[0][1]()
        loss.backward()
        return loss, stats
    total = sum(size for size, _ in micro_batches)
    loss_sum, stat_sums = 0.0, {}
    for size, forward in micro_batches:
        loss, stats = forward()
        (loss * (size / total)).backward()
        # summed times the (integer) sizes, divided once: a stat equal in every micro-batch stays exact
        loss_sum = loss_sum + loss.detach() * size
        for name, value in stats.items():
            stat_sums[name] = stat_sums.get(name, 0.0) + value.detach() * size
    return loss_sum / total, {name: value / total for name, value in stat_sums.items()}


def micro_batch_rows(start: int, count: int, device_batch: int | None) -> list[slice]:
    """`count` rows from `start` cut into ceil(count / device_batch) slices (one for None), their sizes
    as equal as possible, larger first: with compile, equal sizes run one compiled graph."""
    pieces = 1 if device_batch is None else -(-count // device_batch)
    size, larger = divmod(count, pieces)
    bounds = [start]
    for piece in range(pieces):
        bounds.append(bounds[-1] + size + (piece < larger))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def graph_regions(regions: Tensor | None, x: Tensor, objective: MeanFlowConfig,
                  compiled: bool) -> tuple[Tensor | None, Tensor | None]:
    """(regions, region_scale) for meanflow_loss. Compiled, every level runs one graph: the latent level,
    which has no regions, gets one region per image and a region loss scaled by 0 (the same loss and
    gradients), instead of a graph of its own (a second compile, about two minutes for the B preset)."""
    if not compiled or objective.region_weight <= 0:
        return regions, None
    if regions is None:
        return torch.zeros(x.shape[:2], dtype=torch.long, device=x.device), torch.zeros((), device=x.device)
    return regions, torch.ones((), device=x.device)


@functools.cache
def compiled_loss():
    """One compiled meanflow_loss per process: the per-level generators of a run share the architecture, so
    the second level's step reuses the first's compiled graph (parameters are graph inputs, guarded by
    shape and dtype) instead of compiling again, a minute or more each for the B preset."""
    return torch.compile(meanflow_loss)


def gradient_norm(params: list[Tensor], clip: float) -> Tensor:
    """The gradients' total 2-norm, after clipping them to `clip` (0: no clipping, as the reference)."""
    if clip:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def trained_weights(state: TrainState) -> list[Tensor]:
    """The weights a snapshot or the final checkpoints hold: the model's and every EMA's."""
    return list(state.model.parameters()) + [p for ema in state.emas for p in ema.shadow.parameters()]


def compile_settings(cfg: OptimConfig, device: str):
    """Inductor settings for the steps compiled inside this context (compiles happen at the first
    step). With compile on CUDA: multi-kernel reductions (each row reduction is generated both
    persistent and looped, and the faster is kept at its first launch: inductor otherwise loops over
    the layer-norm tangents' 768-wide rows; +1.8 % img/s on an H200), and so no FX graph cache: with
    torch 2.11 / triton 3.6 a multi-kernel module loaded from that cache fails in a second process
    (TypeError in triton's JITFunction.cache_key; reproduced on the H200). With compile_tuning also
    coordinate-descent tuning of every generated kernel's launch parameters."""
    import torch._inductor.config as inductor

    settings = {"coordinate_descent_tuning": cfg.compile and cfg.compile_tuning}
    if cfg.compile and torch.device(device).type == "cuda":
        settings.update({"triton.multi_kernel": 1, "fx_graph_cache": False})
    return inductor.patch(settings)


class LaggedStats:
    """A step's stats reach the host one step late. At the end of step k they are stacked into one tensor
    and copied into pinned memory without blocking; they are read at the end of step k + 1, by when the
    host has queued step k + 1. Reading them at once (one sync a step) left the GPU idle while the host
    prepared every next step: the batch, the launches of the compiled graph, the optimiser and the EMAs."""

    def __init__(self):
        self.pending: tuple[int, list[str], Tensor, object] | None = None

    def push(self, step: int, stats: dict[str, Tensor]) -> tuple[int, dict[str, float]] | None:
        """Start copying `step`'s stats; returns the step before it as (step, floats), or None."""
        names = list(stats)
        stacked = torch.stack([stats[name].detach().float().reshape(()) for name in names])
        event = None
        if stacked.device.type == "cuda":
            host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            host.copy_(stacked, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            stacked = host
        ready = self.pop()
        self.pending = (step, names, stacked, event)
        return ready

    def pop(self) -> tuple[int, dict[str, float]] | None:
        """The pending step's stats as floats (waiting for their copy only), or None."""
        if self.pending is None:
            return None
        step, names, values, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return step, dict(zip(names, values.tolist()))


def _batch_index(state: TrainState, n: int, cfg: OptimConfig, rank: int, world: int) -> tuple[Tensor, list[slice]]:
    """The step's global batch of row indices (the same draw on every rank) and this rank's positions in
    it, as the micro-batches of at most cfg.device_batch rows that run one after the other."""
    size = min(cfg.batch_size, n)
    if size % world:
        raise ValueError(f"global batch {size} is not divisible by {world} ranks")
    index = torch.randint(n, (size,), generator=state.generators["sampler"])
    share = size // world
    return index, micro_batch_rows(rank * share, share, cfg.device_batch)


def train_generator(model: nn.Module, data: LevelData | list[LevelData], level: int | list[int],
                    objective: MeanFlowConfig, cfg: OptimConfig, device: str,
                    on_step: Callable[[int, dict], None] | None = None, *,
                    resume: Exported | None = None, on_checkpoint: Callable[[TrainState], None] | None = None,
                    rank: int = 0, world: int = 1, wrap: Callable[[nn.Module], nn.Module] | None = None) -> TrainState:
    """Trains `model` for level `level` up to cfg.steps; returns the final TrainState (EMAs: state.ema(decay
    or name)). Given lists of levels and their data, one model learns them all (generator.sharing:
    shared): each step draws one level uniformly and a batch from that level alone (the reference's
    sample_single_level_per_batch); stats then carry `level`."""
    datasets, levels_of = (data, level) if isinstance(data, list) else ([data], [level])
    if len(datasets) != len(levels_of):
        raise ValueError(f"{len(datasets)} level data sets for levels {levels_of}")
    datasets = resident(datasets, device)
    state = new_state(model, cfg, device, resume)
    net = wrap(state.model) if wrap is not None else state.model
    tangent_fn, step_loss = time_derivative, meanflow_loss
    if cfg.compile and wrap is None:   # forward, tangent pass and loss: one graph, no launch gaps between them
        step_loss = compiled_loss()
    elif cfg.compile:   # DDP's hooks need its own module call: the forward and the JVP compile separately
        net, tangent_fn = torch.compile(net), torch.compile(time_derivative)
    on_cuda = torch.device(device).type == "cuda"   # "cuda:3" on a DDP rank too
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)

    def loss_fn() -> list[MicroBatch]:
        # every random choice of the step is drawn here, once for the whole global batch, whatever the split
        which = 0 if len(datasets) == 1 else int(torch.randint(len(datasets), (1,),
                                                                generator=state.generators["sampler"]))
        chosen, chosen_level = datasets[which], levels_of[which]
        shape = tuple(chosen.tokens.shape[1:])
        index, parts = _batch_index(state, len(chosen.tokens), cfg, rank, world)
        index = without_waiting(index, chosen.tokens.device)
        draws = draw((len(index), *shape), objective, state.generators["noise"], device, torch.float32)

        def forward(rows: slice) -> tuple[Tensor, dict]:
            mine = index[rows]
            x, cond, label, regions = chosen.batch(mine, device)
            levels = torch.full((len(mine),), chosen_level, dtype=torch.long, device=device)
            regions, region_scale = graph_regions(regions, x, objective, step_loss is not meanflow_loss)
            with amp:
                # jvp_model: the tangent pass bypasses DDP's one-forward-per-backward hooks
                loss, stats = step_loss(net, x, cond, label, levels, regions, objective,
                                        draws=draws.rows(rows.start, rows.stop), jvp_model=state.model,
                                        tangent_fn=tangent_fn, region_scale=region_scale)
            if len(datasets) > 1:
                # on the loss's device: LaggedStats stacks every stat into one tensor (a CPU scalar among
                # CUDA ones fails)
                stats["level"] = torch.full((), float(chosen_level), device=loss.device)
            return loss, stats

        return [(rows.stop - rows.start, functools.partial(forward, rows)) for rows in parts]

    with compile_settings(cfg, device):
        return _fit(state, cfg, loss_fn, on_step, on_checkpoint)


def train_decoder(decoder: nn.Module, tokens: Tensor, images: Tensor, cfg: OptimConfig, device: str,
                  on_step: Callable[[int, dict], None] | None = None, *, resume: Exported | None = None,
                  on_checkpoint: Callable[[TrainState], None] | None = None) -> TrainState:
    """tokens [N, T, C] normalised latents, images [N, 3, H, W] in [0, 1]. Returns the final TrainState."""
    state = new_state(decoder, cfg, device, resume)
    net = torch.compile(state.model) if cfg.compile else state.model

    def loss_fn() -> list[MicroBatch]:
        index, parts = _batch_index(state, len(tokens), cfg, 0, 1)

        def forward(rows: slice) -> tuple[Tensor, dict]:
            return decoder_loss(net(tokens[index[rows]].to(device)), images[index[rows]].to(device))

        return [(rows.stop - rows.start, functools.partial(forward, rows)) for rows in parts]

    return _fit(state, cfg, loss_fn, on_step, on_checkpoint)
