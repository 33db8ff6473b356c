"""The mean-flow objective (DESIGN.md section 3): x-prediction, improved-MeanFlow compound target.

Convention: z_t = (1 - t) x + t e, e ~ N(0, I), t = 1 is pure noise; as the reference (pmf.py), both
heads predict x and become velocities through (z_t - x_pred) / clip(t, t_floor, 1): the x head gives
the average velocity u on [r, t], the v head the instantaneous velocity v, both from one forward at
h = t - r, and the target of both is v_t = (z_t - x) / clip(t, t_floor, 1). Compound target
V = u + (t - r) * stopgrad(du/dt), du/dt from one forward-mode JVP of (z, t, r) -> u along (v_c, 1, 0);
v_c is the v head in its own forward at h = 0 (reference; `v_tangent: same` reuses u's forward).
Losses ||V - v_t||^2 and ||v - v_t||^2 summed per sample, each adaptively weighted by
1 / stopgrad(loss + eps), plus a region-variance term on levels 0..2. Times: the plateau
logit-normal of the reference's utils/time_sampler.py (or the plain shifted one).

All randomness comes from the generator argument, drawn in this order: (t, r), e, label dropout
(`draw`; a data-parallel rank takes its rows of one global draw, so N ranks equal one process).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.generator.dit import math_attention
from models.generator.dit import XPathValues
from models.generator.dit_jvp import average_velocity_tangent


@dataclass(kw_only=True)
class MeanFlowConfig:
    """The objective. No defaults: every field is a setting of storage.config.GeneratorConfig, which
    defines and validates it (tasks.plan.objective_config builds this from it)."""
    logit_mean: float
    logit_std: float
    time_shift: float             # s: mu_eff = mu + log(s) (equivalently t' = s t / (1 + (s - 1) t))
    time_dist: str                # plateau (reference) | shifted: see sample_times
    uniform_share: float          # pairs drawn from Uniform(0, 1) instead
    equal_share: float            # pairs forced to r = t (plain flow matching)
    t_floor: float
    adaptive_eps: float
    v_weight: float
    region_weight: float
    label_dropout: float          # reference: 0, no label dropout without guidance
    v_tangent: str                # h0: the v head in its own forward at h = 0 (reference) | same: from u's forward
    jvp_attention: str            # kernel | math | auto (kernel on CUDA): see time_derivative
    cond_noise: float             # condition augmentation (not in the reference, 0 = off): a non-zero
                                  # condition canvas gets N(0, s^2) per element, s ~ U(0, cond_noise) per
                                  # sample, so a level learns from the imperfect canvases it will be given


def shift_time(t: Tensor, shift: float) -> Tensor:
    return shift * t / (1 + (shift - 1) * t)


def _logit_normal_pdf(t: float, mu: float, sigma: float) -> float:
    z = math.log(t) - math.log1p(-t)
    return math.exp(-0.5 * ((z - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi) * t * (1 - t))


def plateau_constants(mu: float, sigma: float, shift: float) -> tuple[float, float, float]:
    """(m, A, p_m) of the plateau logit-normal: its mode m (Newton in logit space on
    2 sigmoid(z) - 1 = (z - mu_eff) / sigma^2), the shifted logit-normal's mass A left of m, and the
    density p_m at m, which is the plateau's height on [m, 1]. The normaliser is A + p_m (1 - m)."""
    mu_eff = mu + math.log(shift)
    z = mu_eff
    for _ in range(100):
        s = 1 / (1 + math.exp(-z))
        step = ((2 * s - 1) - (z - mu_eff) / sigma ** 2) / (2 * s * (1 - s) - 1 / sigma ** 2)
        z -= step
        if abs(step) < 1e-15:
            break
    m = 1 / (1 + math.exp(-z))
    mass_left = 0.5 * (1 + math.erf((z - mu_eff) / (sigma * math.sqrt(2))))
    return m, mass_left, _logit_normal_pdf(m, mu_eff, sigma)


def plateau_density(t: Tensor, mu: float, sigma: float, shift: float) -> Tensor:
    """The plateau logit-normal's density on (0, 1): the shifted logit-normal's left of its mode m, the
    constant density at m right of it, renormalised."""
    m, mass_left, p_m = plateau_constants(mu, sigma, shift)
    mu_eff = mu + math.log(shift)
    z = torch.log(t) - torch.log1p(-t)
    left = torch.exp(-0.5 * ((z - mu_eff) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi) * t * (1 - t))
    return torch.where(t <= m, left, torch.full_like(t, p_m)) / (mass_left + p_m * (1 - m))


def _draw_times(count: int, cfg: MeanFlowConfig, generator: torch.Generator, device) -> Tensor:
    """[2, count] times from the configured distribution (three uniforms per time for the plateau:
    which side, the left side's inverse-CDF draw, the plateau's uniform)."""
    if cfg.time_dist == "shifted":
        logit = cfg.logit_mean + cfg.logit_std * torch.randn(2, count, generator=generator, device=device)
        return shift_time(torch.sigmoid(logit), cfg.time_shift)
    if cfg.time_dist != "plateau":
        raise ValueError(f"time_dist must be plateau or shifted, got {cfg.time_dist!r}")
    m, mass_left, p_m = plateau_constants(cfg.logit_mean, cfg.logit_std, cfg.time_shift)
    side, left_u, right_u = torch.rand(3, 2, count, generator=generator, device=device, dtype=torch.float64)
    mu_eff = cfg.logit_mean + math.log(cfg.time_shift)
    left = torch.sigmoid(mu_eff + cfg.logit_std * torch.special.ndtri(left_u * mass_left))
    right = m + (1 - m) * right_u
    return torch.where(side < mass_left / (mass_left + p_m * (1 - m)), left, right).float()


def sample_times(batch: int, cfg: MeanFlowConfig, generator: torch.Generator, device=None) -> tuple[Tensor, Tensor]:
    """(t, r), float32 [batch] each, 0 <= r <= t <= 1: t and r drawn independently from the time
    distribution, a `uniform_share` of pairs from Uniform(0, 1) instead, then ordered; an `equal_share`
    of pairs gets r = t."""
    device = generator.device if device is None else device
    pair = _draw_times(batch, cfg, generator, device)
    uniform = torch.rand(2, batch, generator=generator, device=device)
    use_uniform = torch.rand(batch, generator=generator, device=device) < cfg.uniform_share
    pair = torch.where(use_uniform, uniform, pair)
    t, r = pair.max(dim=0).values, pair.min(dim=0).values
    use_equal = torch.rand(batch, generator=generator, device=device) < cfg.equal_share
    return t, torch.where(use_equal, t, r)


def velocity(z: Tensor, x_pred: Tensor, t: Tensor, t_floor: float) -> Tensor:
    """An x-prediction turned into a velocity: (z - x_pred) / clip(t, t_floor, 1) (t <= 1 always)."""
    return (z - x_pred) / t.clamp_min(t_floor)[:, None, None]


def average_velocity(model: nn.Module, z: Tensor, t: Tensor, r: Tensor, cond: Tensor, label: Tensor,
                     level: Tensor, t_floor: float = 0.05) -> tuple[Tensor, Tensor]:
    """(u, v): the average velocity on [r, t] from the x head and the instantaneous velocity from the v
    head, both x-predictions of one forward at h = t - r."""
    x_hat, x_v = model(z, t - r, cond, label, level)
    return velocity(z, x_hat, t, t_floor), velocity(z, x_v, t, t_floor)


def region_slots(regions: Tensor) -> Tensor:
    """[B, T] region ids (any integers) -> [B, T] index of the first token of each token's region: dense
    per-image slots found without reading ids back to the host, so the training step never waits on it."""
    same = regions[:, :, None] == regions[:, None, :]
    return same.to(torch.uint8).argmax(dim=-1)   # argmax returns the first maximal index


def region_variance_loss(x_hat: Tensor, target: Tensor, regions: Tensor) -> Tensor:
    """Per token (1 - cos(x_hat, mean of target over the token's region))^2, averaged within each
    region, then over the regions of each image, then over the batch."""
    slots = region_slots(regions)
    wide = slots[..., None].expand(-1, -1, target.shape[-1])
    work = torch.promote_types(target.dtype, torch.float32)   # half-precision sums lose too much
    sums = torch.zeros(target.shape, dtype=work, device=target.device).scatter_add_(1, wide, target.to(work))
    counts = torch.zeros(slots.shape, dtype=work, device=target.device).scatter_add_(
        1, slots, torch.ones(slots.shape, dtype=work, device=target.device))
    region_size = counts.gather(1, slots)              # [B, T]: each region's tokens sum to weight 1
    region_mean = sums.gather(1, wide) / region_size[..., None]
    per_token = (1 - F.cosine_similarity(x_hat, region_mean.to(target.dtype), dim=-1)) ** 2
    per_image = (per_token / region_size).sum(dim=1) / (counts > 0).sum(dim=1)
    return per_image.mean()


def adaptive_mean(per_sample: Tensor, eps: float) -> Tensor:
    """mean(loss / stopgrad(loss + eps)): gradient of log(loss + eps), value bounded by 1."""
    return (per_sample / (per_sample.detach() + eps)).mean()


@dataclass
class Draws:
    """The random inputs of one loss evaluation: times, noise and which labels are dropped."""
    t: Tensor          # [B]
    r: Tensor          # [B]
    e: Tensor          # [B, T, C]
    dropped: Tensor    # [B] bool
    cond_e: Tensor | None = None       # [B, T, C] condition noise (cond_noise > 0), already scaled per sample

    def rows(self, start: int, stop: int) -> "Draws":
        """A slice of the batch: data-parallel ranks take their share of one global draw."""
        return Draws(self.t[start:stop], self.r[start:stop], self.e[start:stop], self.dropped[start:stop],
                     None if self.cond_e is None else self.cond_e[start:stop])


def draw(shape: tuple[int, ...], cfg: MeanFlowConfig, generator: torch.Generator, device=None,
         dtype: torch.dtype = torch.float32) -> Draws:
    """All randomness of meanflow_loss for a batch of this shape, in the documented order."""
    device = generator.device if device is None else device
    t, r = (s.to(dtype) for s in sample_times(shape[0], cfg, generator, device))
    e = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    dropped = torch.rand(shape[0], generator=generator, device=device) < cfg.label_dropout
    cond_e = None
    if cfg.cond_noise > 0:   # drawn last, and only when on: the reference's draws stay bit-identical
        scale = torch.rand(shape[0], generator=generator, device=device, dtype=dtype) * cfg.cond_noise
        cond_e = scale.view(-1, *[1] * (len(shape) - 1)) * torch.randn(shape, generator=generator, device=device,
                                                                        dtype=dtype)
    return Draws(t, r, e, dropped, cond_e)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def time_derivative(model: nn.Module, z: Tensor, t: Tensor, r: Tensor, cond: Tensor, label: Tensor, level: Tensor,
                    v_c: Tensor, t_floor: float, kind: str = "math",
                    forward: tuple[Tensor, XPathValues] | None = None) -> Tensor:
    """du/dt along (dz, dt, dr) = (v_c, 1, 0). kind "math": torch.func.jvp of (z, t, r) -> u, to be
    called inside math_attention(model) (the fused attention kernels have no forward-mode AD);
    "kernel": the written-out tangent pass of models.generator.dit_jvp (tangent kernel for attention), reusing
    `forward` = (x_hat, values) of model(z, t - r, ..., keep_values=True) when given."""
    if kind == "kernel":
        plain = unwrap(model)
        if forward is None:
            x_hat, _, values = plain(z, t - r, cond, label, level, keep_values=True)
        else:
            x_hat, values = forward
        return average_velocity_tangent(plain, x_hat, values, z, t, r, label, level, v_c, torch.ones_like(t),
                                        torch.zeros_like(r), t_floor)

    def u_of(z_: Tensor, t_: Tensor, r_: Tensor) -> Tensor:
        return average_velocity(model, z_, t_, r_, cond, label, level, t_floor)[0]

    return torch.func.jvp(u_of, (z, t, r), (v_c, torch.ones_like(t), torch.zeros_like(r)))[1]


def tangent_velocity(model: nn.Module, z: Tensor, t: Tensor, cond: Tensor, label: Tensor, level: Tensor,
                     t_floor: float) -> Tensor:
    """v_c, the JVP's z tangent as the reference takes it: the v head in its own forward at h = 0."""
    _, x_v = model(z, torch.zeros_like(t), cond, label, level)
    return velocity(z, x_v, t, t_floor)


def meanflow_loss(model: nn.Module, x: Tensor, cond: Tensor, label: Tensor, level: Tensor, regions: Tensor | None,
                  cfg: MeanFlowConfig, generator: torch.Generator | None = None, draws: Draws | None = None,
                  jvp_model: nn.Module | None = None, tangent_fn=None,
                  region_scale: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """x: target level-l canvas [B, T, C]; cond [B, T, C]; label [B]; level [B]; regions [B, T] ids or
    None. Randomness comes from `generator`, or from pre-made `draws` (data-parallel slices).
    `jvp_model` (default `model`) runs the tangent pass and the h = 0 forward: pass the plain module
    when `model` is a DDP wrapper, whose hooks expect one forward per backward. `tangent_fn` (default
    `time_derivative`) may be its torch.compile'd version: the whole JVP then runs as one graph.
    `region_scale` (0-dim) multiplies the region loss: 0 gives the loss of regions None in the same graph.
    Both losses sum over tokens and channels per sample before the adaptive weight (reference).
    Returns (scalar loss with gradient, stats as detached 0-dim tensors: loss; loss_u and loss_v as
    per-element mean squares; loss_region; v_tangent_gap, the relative squared difference between
    the h = 0 tangent and the v of u's forward, 0 with v_tangent "same"). Nothing here reads a value
    back to the host, so a GPU step runs without a stall; callers convert the stats when they log."""
    loss_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    model_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    jvp_model = model if jvp_model is None else jvp_model
    if draws is None:
        draws = draw(tuple(x.shape), cfg, generator, x.device, loss_dtype)
    t, r, e = draws.t.to(loss_dtype), draws.r.to(loss_dtype), draws.e.to(loss_dtype)
    if draws.cond_e is not None:   # only real conditions: level 0's and the flat model's are zeros
        given = (cond != 0).flatten(1).any(1).to(cond.dtype).view(-1, *[1] * (cond.dim() - 1))
        cond = cond + given * draws.cond_e.to(cond.dtype)
    label = torch.where(draws.dropped, torch.full_like(label, unwrap(model).config.num_classes), label)

    target = x.to(loss_dtype)
    z = (1 - t[:, None, None]) * target + t[:, None, None] * e
    v_target = velocity(z, target, t, cfg.t_floor)   # = e - x for t >= t_floor

    # Network inputs in the model dtype; autocast (if active) lowers the matmuls further.
    z_in, t_in, r_in, cond_in = z.to(model_dtype), t.to(model_dtype), r.to(model_dtype), cond.to(model_dtype)
    kind = cfg.jvp_attention if cfg.jvp_attention != "auto" else ("kernel" if x.is_cuda else "math")
    forward = None
    if kind == "kernel":   # the tangent pass reuses this forward's x-path values
        x_hat, x_v, values = model(z_in, t_in - r_in, cond_in, label, level, keep_values=True)
        forward = (x_hat.detach(), values)
    else:
        x_hat, x_v = model(z_in, t_in - r_in, cond_in, label, level)
    u = velocity(z, x_hat.to(loss_dtype), t, cfg.t_floor)
    v = velocity(z, x_v.to(loss_dtype), t, cfg.t_floor)

    math_path = contextlib.nullcontext() if kind == "kernel" else math_attention(unwrap(jvp_model))
    with torch.no_grad():   # the tangent is a stop-gradient target: no graph needed
        gap = torch.zeros((), dtype=loss_dtype, device=x.device)
        if cfg.v_tangent == "h0":
            v_c = tangent_velocity(jvp_model, z_in, t_in, cond_in, label, level, cfg.t_floor).to(loss_dtype)
            gap = ((v_c - v.detach()) ** 2).sum() / (v.detach() ** 2).sum().clamp_min(1e-30)
        elif cfg.v_tangent == "same":
            v_c = v.detach()
        else:
            raise ValueError(f"v_tangent must be h0 or same, got {cfg.v_tangent!r}")
        with math_path:
            du_dt = (tangent_fn or time_derivative)(jvp_model, z_in, t_in, r_in, cond_in, label, level,
                                                    v_c.to(model_dtype), cfg.t_floor, kind, forward)
    compound = u + (t - r)[:, None, None] * du_dt.to(loss_dtype)

    loss_u = ((compound - v_target) ** 2).sum(dim=(1, 2))
    loss_v = ((v - v_target) ** 2).sum(dim=(1, 2))
    loss = adaptive_mean(loss_u, cfg.adaptive_eps) + cfg.v_weight * adaptive_mean(loss_v, cfg.adaptive_eps)
    loss_region = torch.zeros((), dtype=loss_dtype, device=x.device)
    if regions is not None and cfg.region_weight > 0:
        loss_region = region_variance_loss(x_hat.to(loss_dtype), target, regions)
        if region_scale is not None:   # 0: a level without regions inside a graph compiled with them
            loss_region = loss_region * region_scale.to(loss_dtype)
        loss = loss + cfg.region_weight * loss_region
    elements = x.shape[1] * x.shape[2]
    stats = {"loss": loss, "loss_u": loss_u.mean() / elements, "loss_v": loss_v.mean() / elements,
             "loss_region": loss_region, "v_tangent_gap": gap}
    return loss, {name: value.detach() for name, value in stats.items()}


@torch.no_grad()
def one_step(model: nn.Module, z1: Tensor, cond: Tensor, label: Tensor, level: Tensor) -> Tensor:
    """One-step sample x0 = z1 - u(z1, r=0, t=1) (equals the x head's prediction at h = 1). No time floor
    enters: at t = 1 the velocity divides by max(t, t_floor) = 1 whatever the floor."""
    t = torch.ones(z1.shape[0], dtype=z1.dtype, device=z1.device)
    u, _ = average_velocity(model, z1, t, torch.zeros_like(t), cond, label, level)
    return z1 - u
