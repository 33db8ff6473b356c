"""Training loops for one level's generator and for the decoder: AdamW, warmup, clipping, EMA.

Pure torch: data arrives as tensors, progress leaves through a callback, nothing is written.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from models.decoder import decoder_loss
from models.meanflow import MeanFlowConfig, meanflow_loss


@dataclass
class OptimConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0


@dataclass
class LevelData:
    target: Tensor            # [N, T, C] level-l canvas (normalised latents)
    cond: Tensor              # [N, T, C] level-(l-1) canvas, zeros at level 0
    label: Tensor             # [N] int64
    regions: Tensor | None    # [N, T] int64 level-l region ids (levels below the last), else None


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.shadow.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)


def _optimizer(model: nn.Module, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    warmup = max(cfg.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return optimizer, schedule


def _step(model, optimizer, schedule, loss: Tensor, clip: float) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    schedule.step()
    return float(norm)


def train_generator(model: nn.Module, data: LevelData, level: int, objective: MeanFlowConfig, cfg: OptimConfig,
                    device: str, on_step: Callable[[int, dict], None] | None = None) -> tuple[nn.Module, list[dict]]:
    """Returns (EMA model, per-step loss history)."""
    model = model.to(device).train()
    ema = EMA(model, cfg.ema_decay)
    optimizer, schedule = _optimizer(model, cfg)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    sampler = torch.Generator().manual_seed(cfg.seed)
    history = []
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    for step in range(cfg.steps):
        index = torch.randint(len(data.target), (min(cfg.batch_size, len(data.target)),), generator=sampler)
        batch = [t[index].to(device) if t is not None else None
                 for t in (data.target, data.cond, data.label, data.regions)]
        levels = torch.full((len(index),), level, dtype=torch.long, device=device)
        with amp:
            loss, stats = meanflow_loss(model, batch[0], batch[1], batch[2], levels, batch[3], objective, generator)
        stats["grad_norm"] = _step(model, optimizer, schedule, loss, cfg.grad_clip)
        ema.update(model)
        history.append({"step": step, **stats})
        if on_step is not None:
            on_step(step, stats)
    return ema.shadow, history


def train_decoder(decoder: nn.Module, tokens: Tensor, images: Tensor, cfg: OptimConfig, device: str,
                  on_step: Callable[[int, dict], None] | None = None) -> tuple[nn.Module, list[dict]]:
    """tokens [N, T, C] normalised latents, images [N, 3, H, W] in [0, 1]. Returns (EMA decoder, history)."""
    decoder = decoder.to(device).train()
    ema = EMA(decoder, cfg.ema_decay)
    optimizer, schedule = _optimizer(decoder, cfg)
    sampler = torch.Generator().manual_seed(cfg.seed)
    history = []
    for step in range(cfg.steps):
        index = torch.randint(len(tokens), (min(cfg.batch_size, len(tokens)),), generator=sampler)
        loss, stats = decoder_loss(decoder(tokens[index].to(device)), images[index].to(device))
        stats["grad_norm"] = _step(decoder, optimizer, schedule, loss, cfg.grad_clip)
        ema.update(decoder)
        history.append({"step": step, **stats})
        if on_step is not None:
            on_step(step, stats)
    return ema.shadow, history
