"""Optimisers for the generator and decoder: AdamW alone, or Muon for hidden 2-D weights + AdamW for the rest.

Muon (torch.optim.Muon, Newton-Schulz orthogonalised momentum) is meant for the matrices of the
hidden layers only. The input projection (canvas fusion), the conditioning embeddings and MLP, the
output projections, every bias and every non-2-D tensor go to AdamW, as in the Muon reference
recipe. Muon uses `adjust_lr_fn="match_rms_adamw"` so one learning rate serves both optimisers.
The learning rate warms up linearly over `warmup_steps`, then stays constant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(kw_only=True)
class OptimConfig:
    """One training run's optimiser. No defaults for a setting of storage.config.GeneratorConfig (every
    field but muon_momentum): tasks.plan.generator_optim / decoder_optim build this from the config.
    muon_momentum is this module's fixed constant, not a setting."""
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    ema_decays: list[float]           # constant-decay EMAs
    ema_halflives_kimg: list[float]   # EDM EMAs (models.generator.train_state.EMA)
    ema_rampup: float                 # EDM: half-life at most this share of the images seen
    optimizer: str                    # "adamw" | "muon"
    muon_momentum: float = 0.95       # fixed: torch.optim.Muon's default
    checkpoint_every: int             # 0: no intermediate training-state snapshots
    compile: bool                     # wrap the network in torch.compile for the training steps
    compile_tuning: bool              # tune the compiled kernels' launch parameters (longer first compile)
    seed: int

    def __post_init__(self):
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if any(not 0.0 <= d < 1.0 for d in self.ema_decays):
            raise ValueError(f"ema_decays must lie in [0, 1), got {self.ema_decays}")
        if any(h <= 0 for h in self.ema_halflives_kimg):
            raise ValueError(f"ema_halflives_kimg must be positive, got {self.ema_halflives_kimg}")
        if not self.ema_decays and not self.ema_halflives_kimg:
            raise ValueError("at least one EMA is needed: ema_decays or ema_halflives_kimg")


def muon_eligible(model: nn.Module) -> set[str]:
    """Names of the 2-D weights of hidden layers: linears inside transformer blocks (modules with a
    `modulation` and an attention or MLP), excluding the model's input and output projections."""
    names = set()
    for module_name, module in model.named_modules():
        if not (hasattr(module, "attn") or hasattr(module, "mlp")):
            continue   # only transformer blocks hold hidden matrices
        for param_name, param in module.named_parameters():
            if param.ndim == 2:
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def param_groups(model: nn.Module, optimizer: str) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(muon params, adamw params) as (name, parameter) lists; muon is empty for "adamw"."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if optimizer == "adamw":
        return [], named
    hidden = muon_eligible(model)
    return [(n, p) for n, p in named if n in hidden], [(n, p) for n, p in named if n not in hidden]


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> tuple[list[torch.optim.Optimizer], list]:
    """Optimisers plus one linear-warmup LambdaLR per optimiser (same schedule for all)."""
    muon_params, adamw_params = param_groups(model, cfg.optimizer)
    optimizers: list[torch.optim.Optimizer] = []
    if muon_params:
        optimizers.append(torch.optim.Muon([p for _, p in muon_params], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw"))
    optimizers.append(torch.optim.AdamW([p for _, p in adamw_params], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        betas=(0.9, 0.95)))
    warmup = max(cfg.warmup_steps, 1)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: min(1.0, (step + 1) / warmup)) for o in optimizers]
    return optimizers, schedules
