"""Optimisers for the generator and decoder: AdamW alone, or Muon as the reference trains with it.

`muon` is `optax.contrib.muon(learning_rate=lr, adam_b2=0.95)` with optax's other defaults (optax
0.2.5, the reference's pin; utils/trainstate_util.py of the reference), written in torch:
- the parameters it orthogonalises are those optax labels "muon", `ndim == 2` in the reference's Flax
  tree: the Dense kernels. Embedding tables, learned tokens and positions are (1, N, D) there, norms
  and biases 1-D, all "adam". In torch an nn.Embedding is 2-D, so the rule that makes the same split
  here is "the weight of every nn.Linear"; a linear that fuses several of the reference's matrices
  (attention's qkv: the reference has q, k and v projections) names its blocks in `fused_linears`,
  and each block is orthogonalised on its own;
- Muon (optax scale_by_muon): momentum mu = beta mu + (1 - beta) g, beta 0.95; Nesterov with optax's
  bias corrections, m = beta mu / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t); Newton-Schulz on m:
  the wide orientation, m / (|m|_F + 1e-8), then 5 x  X <- a X + (b A + c A A) X with A = X X^T,
  (a, b, c) = (3.4445, -4.7750, 2.0315); times sqrt(max(1, fan_out / fan_in)) (optax's
  sqrt(max(1, shape[-1] / shape[-2])) of a Flax kernel [fan_in, fan_out]); weight decay times the
  weights added (0 by default); the step is -lr times that;
- the rest: optax's adamw(b1=0.9, b2=0.95, eps=1e-8, eps_root=0, weight_decay=0, nesterov=True),
  i.e. NAdam: m as above with b1, v = b2 v + (1 - b2) g^2, step -lr m / (sqrt(v / (1 - b2^t)) + eps).
On CUDA the Newton-Schulz matmuls run in TF32, as JAX computes the reference's float32 dots on recent
GPUs by default (its matmul precision leans to speed: TF32 there, bfloat16 on TPU); in full float32 they
were about 4.8 TFLOP of slow float32 arithmetic per step for the B preset, beside 104 TFLOP of bf16 model
work at batch 256. On the CPU they stay float32 (the tests compare them with float64 formulas).
No gradient clipping in the reference (generator.grad_clip: 0) and its rate is constant with no
warm-up (generator.warmup_steps: 0); both are the loop's, not this optimiser's.

`adamw` is torch's AdamW with betas (0.9, 0.95) on every parameter. The learning rate warms up
linearly over `warmup_steps`, then stays constant, for either.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(kw_only=True)
class OptimConfig:
    """One training run's optimiser. No defaults for a setting of storage.config.GeneratorConfig (every
    field but muon_momentum): tasks.plan.generator_optim / decoder_optim build this from the config.
    muon_momentum is this module's fixed constant, not a setting."""
    steps: int
    batch_size: int
    device_batch: int | None          # the most samples one forward/backward takes (None: the rank's whole share)
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float                  # 0: no clipping (the reference clips none)
    ema_decays: list[float]           # constant-decay EMAs
    ema_halflives_kimg: list[float]   # EDM EMAs (models.generator.train_state.EMA)
    ema_rampup: float                 # EDM: half-life at most this share of the images seen
    optimizer: str                    # "adamw" | "muon"
    muon_momentum: float = 0.95       # fixed: optax.contrib.muon's beta
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
        if self.device_batch is not None and self.device_batch < 1:
            raise ValueError(f"device_batch must be >= 1 (None: the whole batch at once), got {self.device_batch}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")


# optax.contrib.muon's defaults (optax 0.2.5, what the reference pins)
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-8            # Newton-Schulz's normaliser and Adam's denominator (optax passes its one eps to both)
ADAM_B1 = 0.9
ADAM_B2 = 0.95        # the reference's adam_b2 (configs/TF_B_config.yml); also torch AdamW's beta2 here


def muon_blocks(model: nn.Module) -> dict[str, int]:
    """{parameter name: row blocks} of the weights Muon orthogonalises: every nn.Linear's weight, with
    the number of the reference's matrices it fuses (a module's `fused_linears`, e.g. {"qkv": 3})."""
    blocks = {}
    for module_name, module in model.named_modules():
        fused = getattr(module, "fused_linears", {})
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                prefix = f"{module_name}.{child_name}" if module_name else child_name
                blocks[f"{prefix}.weight"] = fused.get(child_name, 1)
    return blocks


def param_groups(model: nn.Module, optimizer: str) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(muon params, adam params) as (name, parameter) lists; muon is empty for "adamw"."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if optimizer == "adamw":
        return [], named
    linear = muon_blocks(model)
    return [(n, p) for n, p in named if n in linear], [(n, p) for n, p in named if n not in linear]


NS_TF32 = True   # bench/generators.py --ns-float32 turns it off, to time what TF32 saves


@contextlib.contextmanager
def tf32_matmuls(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """float32 matmuls on `device` through TF32 tensor cores when it is CUDA and `enabled` (restored after)."""
    if device.type != "cuda" or not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def newton_schulz(x: Tensor, steps: int = NS_STEPS, coeffs: tuple[float, float, float] = NS_COEFFS,
                  eps: float = EPS, scale: float = 1.0) -> Tensor:
    """optax's orthogonalize_via_newton_schulz over a stack [n, rows, cols] of matrices of one shape, times
    `scale`. Each step is three batched matmuls whose multiply-adds carry the polynomial's coefficients
    (b A + c A A, then a X + (...) X): no elementwise pass over the stack between them, and `scale` rides on
    the last step's coefficients (on CUDA those passes were a share of Muon's step beside the matmuls)."""
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)   # Frobenius: spectral norm at most 1
    a, b, c = coeffs
    for step in range(steps):
        last = scale if step == steps - 1 else 1.0
        gram = x @ x.mT
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)   # b A + c A A
        x = torch.baddbmm(x, polynomial, x, beta=a * last, alpha=last)   # (a X + (b A + c A A) X) * last
    if steps == 0 and scale != 1.0:
        x = x * scale
    return x.mT if transposed else x


class ReferenceMuon(torch.optim.Optimizer):
    """optax.contrib.muon as the module docstring states it. Two groups: `muon` (linear weights in
    torch's [fan_out, fan_in] layout, each with its row blocks) and `adam` (the rest). The step count
    t is the group's (optax keeps one count per transform)."""

    def __init__(self, muon: list[tuple[nn.Parameter, int]], adam: list[nn.Parameter], lr: float,
                 weight_decay: float = 0.0, beta: float = 0.95):
        groups = [{"params": [p for p, _ in muon], "blocks": [b for _, b in muon], "kind": "muon", "step": 0},
                  {"params": list(adam), "kind": "adam", "step": 0, "weight_decay": 0.0}]   # optax: adam_weight_decay 0
        super().__init__([g for g in groups if g["params"]], {"lr": lr, "weight_decay": weight_decay, "beta": beta})

    def _momentum(self, group: dict, beta: float) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(params, grads, Nesterov momentum m) of the group's parameters that have a gradient; updates
        the stored first moment."""
        params = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        mus = []
        for p in params:
            if "mu" not in self.state[p]:
                self.state[p]["mu"] = torch.zeros_like(p)
            mus.append(self.state[p]["mu"])
        torch._foreach_lerp_(mus, grads, 1 - beta)   # mu = beta mu + (1 - beta) g
        t = group["step"]
        nesterov = torch._foreach_mul(mus, beta / (1 - beta ** (t + 1)))
        torch._foreach_add_(nesterov, grads, alpha=(1 - beta) / (1 - beta ** t))
        return params, grads, nesterov

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            group["step"] += 1
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adam_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        params, _, nesterov = self._momentum(group, group["beta"])
        blocks = dict(zip(map(id, group["params"]), group["blocks"]))
        by_shape: dict[tuple, list[tuple[int, Tensor]]] = {}   # one batched Newton-Schulz per block shape
        for i, (p, m) in enumerate(zip(params, nesterov)):
            parts = m.reshape(blocks[id(p)], -1, m.shape[-1])
            by_shape.setdefault(tuple(parts.shape[1:]), []).append((i, parts))
        updates: list[Tensor | None] = [None] * len(params)
        for (fan_out, fan_in), items in by_shape.items():
            stacked = torch.cat([parts for _, parts in items])
            with tf32_matmuls(stacked.device, NS_TF32):
                stacked = newton_schulz(stacked, scale=math.sqrt(max(1.0, fan_out / fan_in)))
            for (i, parts), chunk in zip(items, stacked.split([len(parts) for _, parts in items])):
                updates[i] = chunk.reshape(params[i].shape)
        if group["weight_decay"]:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        torch._foreach_add_(params, updates, alpha=-group["lr"])

    def _adam_step(self, group: dict) -> None:
        params, grads, nesterov = self._momentum(group, ADAM_B1)
        nus = []
        for p in params:
            if "nu" not in self.state[p]:
                self.state[p]["nu"] = torch.zeros_like(p)
            nus.append(self.state[p]["nu"])
        torch._foreach_mul_(nus, ADAM_B2)
        torch._foreach_addcmul_(nus, grads, grads, value=1 - ADAM_B2)
        denominator = torch._foreach_sqrt(nus)
        torch._foreach_div_(denominator, math.sqrt(1 - ADAM_B2 ** group["step"]))
        torch._foreach_add_(denominator, EPS)
        torch._foreach_addcdiv_(params, nesterov, denominator, value=-group["lr"])


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> tuple[list[torch.optim.Optimizer], list]:
    """Optimisers plus one linear-warmup LambdaLR per optimiser (same schedule for all)."""
    if cfg.optimizer == "muon":
        muon_params, adam_params = param_groups(model, "muon")
        blocks = muon_blocks(model)
        optimizers: list[torch.optim.Optimizer] = [ReferenceMuon(
            [(p, blocks[n]) for n, p in muon_params], [p for _, p in adam_params], lr=cfg.lr,
            weight_decay=cfg.weight_decay, beta=cfg.muon_momentum)]
    else:
        optimizers = [torch.optim.AdamW([p for _, p in param_groups(model, "adamw")[1]], lr=cfg.lr,
                                        weight_decay=cfg.weight_decay, betas=(ADAM_B1, ADAM_B2))]
    warmup = max(cfg.warmup_steps, 1)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: min(1.0, (step + 1) / warmup)) for o in optimizers]
    return optimizers, schedules
