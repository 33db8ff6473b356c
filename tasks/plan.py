"""The plan: every model spec derived from the one typed config (storage.config.TFConfig).

The pydantic config is the only place a setting is defined, defaulted and validated. The math in
models/ takes small frozen parameter objects (HierarchySpec, DiTConfig, MeanFlowConfig, OptimConfig,
DecoderSpec); `project` fills each of them from the config's same-named fields, so nothing is
copied by hand and a parameter the config does not define fails here, loudly, instead of taking a
default nobody set. Stage keys and folders come from storage.keys (`Layout(root, cfg)`); the two
level counts are the config's: `hierarchy.partition_levels` (the teacher's partitions, len(cuts) + 1)
and `hierarchy.generator_levels` (the trajectory's states, one more: the full latent).

The walk of `hierarchy.cuts` from the CLI to the teacher store, 5 arrows and one conversion:
flows.cli (storage.config.load_config: a validated TFConfig) -> flows.stages (the hierarchy stage) ->
tasks.hierarchy.stage.build_teacher (cfg.hierarchy; its model_dump into the store's attributes) ->
hierarchy_spec (here: the frozen HierarchySpec of the same-named fields) -> tasks.chunk_workers.hierarchy_chunk
on a Dask worker -> models.hierarchy.reference.build_hierarchies, whose regions hierarchy_chunk writes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from models.decoder import DecoderSpec
from models.generator.dit import PRESETS, DiTConfig, dit_config
from models.evaluation.plan import EvalPlan
from models.hierarchy.reference import HierarchySpec
from models.generator.meanflow import MeanFlowConfig
from models.generator.optim import OptimConfig
from models.generator.train_state import ema_name
from models.evaluation.registry import signature as metric_signature
from storage.config import HierarchyConfig, TFConfig
from storage.keys import Layout

Spec = TypeVar("Spec")

# Settings the models take that are not config fields: the data decides them (token_dim, grid,
# classes), they are the models' own fixed constants (the dataclass fields that keep a default, read
# here as class attributes), or they are fixed here with the reason beside them.
DECODER_EMA_KIMG = 500.0   # the decoder's sampled EMA: EDM half-life, ramped up with the images seen
DECODER_EMA_RAMPUP = 0.05  # its ramp-up: half-life at most 5% of the images seen (as generator.ema_rampup)
DECODER_WARMUP_STEPS = 20


def project(spec_type: type[Spec], part: Any, **given: Any) -> Spec:
    """`spec_type` (a models dataclass) with each field from `given`, else from `part`'s same-named
    setting. A field neither names is an error: every parameter of the math is set by the config."""
    values = {}
    for f in dataclasses.fields(spec_type):
        if f.name in given:
            values[f.name] = given.pop(f.name)
        elif f.name in type(part).model_fields:   # a setting, never a method or property of the section
            values[f.name] = getattr(part, f.name)
        else:
            raise TypeError(f"{spec_type.__name__}.{f.name} is not set by the config section "
                            f"{type(part).__name__}; give it explicitly")
    if given:
        raise TypeError(f"{spec_type.__name__} has no field(s) {sorted(given)}")
    return spec_type(**values)


def layout(root, cfg: TFConfig) -> Layout:
    """Where every stage of this config writes under `root`, the evaluation's key included (it hashes
    the metric registry's signature: a metric added, removed or revised moves it)."""
    return Layout(root, cfg, metrics=metric_signature())


def hierarchy_spec(h: HierarchyConfig) -> HierarchySpec:
    return project(HierarchySpec, h, cuts=tuple(h.cuts))


def generator_config(cfg: TFConfig, grid: int, dim: int, num_classes: int) -> DiTConfig:
    """The backbone: the preset's sizes, any size the config sets, the data's shapes and the level count."""
    g = cfg.generator
    sizes = {name: getattr(g, name) for name in PRESETS[g.preset] if getattr(g, name) is not None}
    return dit_config(g.preset, token_dim=dim, grid=grid, num_classes=num_classes,
                      num_levels=cfg.hierarchy.generator_levels, **sizes)


def objective_config(cfg: TFConfig) -> MeanFlowConfig:
    return project(MeanFlowConfig, cfg.generator)


def sampled_ema(cfg: TFConfig) -> str:
    """The name of the EMA the sampler uses (models.generator.train_state.ema_name)."""
    g = cfg.generator
    return ema_name(halflife_kimg=g.ema_halflife_kimg) if g.ema_kind == "edm" else ema_name(g.ema_decay)


def generator_optim(cfg: TFConfig, seed: int, steps: int | None = None) -> OptimConfig:
    """The optimiser of one generator: the EMAs tracked are the listed ones plus the sampled one."""
    g = cfg.generator
    decays = set(g.ema_decays) | ({g.ema_decay} if g.ema_kind == "constant" else set())
    halflives = set(g.ema_halflives_kimg) | ({g.ema_halflife_kimg} if g.ema_kind == "edm" else set())
    return project(OptimConfig, g, steps=g.steps if steps is None else steps, ema_decays=sorted(decays),
                   ema_halflives_kimg=sorted(halflives), muon_momentum=OptimConfig.muon_momentum, seed=seed)


def decoder_spec(cfg: TFConfig, grid: int, dim: int) -> DecoderSpec:
    return project(DecoderSpec, cfg.decoder, token_dim=dim, grid=grid, patch=cfg.source.image_size // grid,
                   mlp_ratio=DecoderSpec.mlp_ratio)


def decoder_optim(cfg: TFConfig) -> OptimConfig:
    d = cfg.decoder
    return project(OptimConfig, d, warmup_steps=DECODER_WARMUP_STEPS, weight_decay=0.0, grad_clip=1.0,
                   device_batch=None, ema_decays=[], ema_halflives_kimg=[DECODER_EMA_KIMG], ema_rampup=DECODER_EMA_RAMPUP,
                   optimizer="adamw", muon_momentum=OptimConfig.muon_momentum, compile=False, compile_tuning=False)


def eval_plan(cfg: TFConfig, keep: int) -> EvalPlan:
    """What the streamed evaluation computes: the evaluate section's sizes, the sampler's mode and cut."""
    ev = cfg.evaluate
    return project(EvalPlan, ev, keep=keep, label_seed=ev.seed, snap_threshold=ev.snap_threshold(),
                   mode=cfg.generator.mode, token_seed=EvalPlan.token_seed, kid_reservoir=EvalPlan.kid_reservoir,
                   is_reservoir=EvalPlan.is_reservoir)
