"""The flat baseline (DESIGN §3): one one-step mean-flow model straight to the full latent.

Same backbone, objective and budget as a level generator, but no hierarchy: the target is the
latent itself, the condition canvas is zeros and there is no region-variance term. It uses the
last level's embedding, so it is a level generator of the final level with the plan taken away.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.generator.meanflow import one_step
from models.generator.train_loop import LevelData


def flat_level(num_levels: int) -> int:
    """The level index the flat model is trained and sampled at (the raw-latent level)."""
    return num_levels - 1


def flat_level_data(tokens: Tensor, mean: Tensor, std: Tensor, label: Tensor) -> LevelData:
    """The latent itself as the target, no condition, no regions."""
    return LevelData(tokens, mean, std, label, target_ids=None, cond_ids=None)


@torch.no_grad()
def sample_flat(model: nn.Module, z1: Tensor, label: Tensor, num_levels: int) -> Tensor:
    """z1 [B, T, C] noise -> [B, T, C] latents in one network call."""
    level = torch.full((z1.shape[0],), flat_level(num_levels), dtype=torch.long, device=z1.device)
    return one_step(model, z1, torch.zeros_like(z1), label, level)
