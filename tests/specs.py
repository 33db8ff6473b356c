"""Model specs for the tests, built as the product builds them: the config's defaults (storage.config.TFConfig)
through tasks.plan, then the test's own values. The models' dataclasses keep no default for a setting the
config defines (tests/tasks/test_plan.py checks), so a test names what it changes and the config gives the rest.

Imported as `from specs import ...`: pytest puts tests/ on sys.path for tests/conftest.py (rootdir
conftest, prepend import mode), as tests/models/ for its helpers; `tests` itself is not importable as a
package here (torch-fidelity installs a top-level `tests`).
"""
from __future__ import annotations

import dataclasses

import torch

from models.evaluation.plan import EvalPlan
from models.generator.dit import DiTConfig, TrajectoryDiT
from models.generator.meanflow import MeanFlowConfig
from models.generator.optim import OptimConfig
from models.generator.train_loop import LevelData
from models.hierarchy.reference import HierarchySpec
from storage.config import TFConfig
from tasks import plan

# The default config's data: the scenes at 112 px through DINOv2-S/14, i.e. 8 x 8 tokens of 384, 6 classes.
GRID, TOKEN_DIM, NUM_CLASSES = 8, 384, 6


def hierarchy_spec(**overrides) -> HierarchySpec:
    return dataclasses.replace(plan.hierarchy_spec(TFConfig().hierarchy), **overrides)


def objective(**overrides) -> MeanFlowConfig:
    return dataclasses.replace(plan.objective_config(TFConfig()), **overrides)


def optim(**overrides) -> OptimConfig:
    """A generator's optimiser (seed 0)."""
    return dataclasses.replace(plan.generator_optim(TFConfig(), seed=0), **overrides)


def dit(**overrides) -> DiTConfig:
    """The default preset's backbone at the default data's shapes, any field overridden."""
    base = plan.generator_config(TFConfig(), grid=GRID, dim=TOKEN_DIM, num_classes=NUM_CLASSES)
    return dataclasses.replace(base, **overrides)


def eval_plan(**overrides) -> EvalPlan:
    cfg = TFConfig()
    return dataclasses.replace(plan.eval_plan(cfg, keep=cfg.evaluate.keep_trajectories), **overrides)


# A generator small enough for a few CPU training steps, and a middle level's data for it.
TINY = dict(token_dim=8, grid=4, width=32, depth=2, head_depth=1, heads=2, num_classes=3)


def tiny_model(seed: int = 0) -> TrajectoryDiT:
    torch.manual_seed(seed)
    return TrajectoryDiT(dit(**TINY))


def tiny_data(n: int = 12, seed: int = 0) -> LevelData:
    """A middle level's data: random latents (float16, as stored), statistics, labels, two partitions."""
    g = torch.Generator().manual_seed(seed)
    tokens = (torch.randn(n, 16, 8, generator=g) * 2 + 1).half()
    mean, std = torch.full((8,), 1.0), torch.full((8,), 2.0)
    target_ids, cond_ids = torch.randint(0, 3, (n, 16), generator=g), torch.randint(0, 2, (n, 16), generator=g)
    return LevelData(tokens, mean, std, torch.randint(0, 3, (n,), generator=g), target_ids, cond_ids)
