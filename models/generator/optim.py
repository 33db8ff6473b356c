"""Optimisers for the generator and decoder: AdamW alone, or Muon for hidden 2-D weights + AdamW for the rest.

Muon (torch.optim.Muon, Newton-Schulz orthogonalised momentum) is meant for the matrices of the
hidden layers only. The input projection (canvas fusion), the conditioning embeddings and MLP, the
output projections, every bias and every non-2-D tensor go to AdamW, as in the Muon reference
recipe. Muon uses `adjust_lr_fn="match_rms_adamw"` so one learning rate serves both optimisers.
The learning rate warms up linearly over `warmup_steps`, then stays constant.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class OptimConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    ema_decays: list[float] = field(default_factory=lambda: [0.999])   # constant-decay EMAs
    ema_halflives_kimg: list[float] = field(default_factory=list)       # EDM EMAs (models.generator.train_state.EMA)
    ema_rampup: float = 0.05
    optimizer: str = "adamw"          # "adamw" | "muon"
    muon_momentum: float = 0.95
    checkpoint_every: int = 0         # 0: no intermediate training-state snapshots
    compile: bool = False             # wrap the network in torch.compile for the training steps
    compile_tuning: bool = False      # tune the compiled kernels' launch parameters (longer first compile)
    seed: int = 0

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
