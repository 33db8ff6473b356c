"""The written-out forward-mode pass (models/generator/dit_jvp.py) against torch.func.jvp of the same model with the
math attention, in float64, and the mean-flow tangent of both kinds against finite differences."""
from __future__ import annotations

import pytest
import torch

from models.generator.dit import TrajectoryDiT, math_attention
from models.generator.dit_jvp import x_head_jvp
from models.generator.meanflow import time_derivative
from specs import dit


def perturbed_model(seed: int = 0) -> TrajectoryDiT:
    torch.manual_seed(seed)
    model = TrajectoryDiT(dit(token_dim=6, grid=4, width=32, heads=4, num_classes=3)).double()
    with torch.no_grad():   # adaLN-Zero starts gates and outputs at zero: perturb so every path matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z, cond, dz = (torch.randn(n, 16, 6, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.9, 0.5, 0.03], dtype=torch.float64)   # the last one below t_floor
    r = torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64)
    return z, t, r, cond, torch.tensor([0, 1, 3]), torch.tensor([0, 2, 3]), dz


def test_x_head_value_and_tangent_equal_func_jvp():
    model = perturbed_model()
    z, t, r, cond, label, level, dz = inputs()
    h, dh = t - r, torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    with torch.no_grad(), math_attention(model):
        value, tangent = torch.func.jvp(lambda z_, h_: model(z_, h_, cond, label, level)[0], (z, h), (dz, dh))
        got_value, got_tangent = x_head_jvp(model, z, h, cond, label, level, dz, dh)
    assert tangent.abs().max() > 1e-2
    torch.testing.assert_close(got_value, value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_tangent, tangent, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["math", "kernel"])
def test_time_derivative_matches_finite_differences(kind):
    """du/dt along (dz, dt, dr) = (v, 1, 0), against a central difference of u in float64."""
    from models.generator.meanflow import average_velocity

    model = perturbed_model(2)
    z, t, r, cond, label, level, v = inputs(seed=3)
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)   # away from the t_floor kink
    with torch.no_grad(), math_attention(model):
        got = time_derivative(model, z, t, r, cond, label, level, v, 0.05, kind)
        eps = 1e-8   # h enters as sin/cos(1000 f h): third derivatives are large, so a small step

        def u(s: float) -> torch.Tensor:
            return average_velocity(model, z + s * v, t + s, r, cond, label, level, 0.05)[0]

        finite = (u(eps) - u(-eps)) / (2 * eps)
    assert finite.abs().max() > 1e-2
    torch.testing.assert_close(got, finite, rtol=1e-5, atol=1e-6)


def test_kinds_agree_below_the_time_floor():
    model = perturbed_model(4)
    z, t, r, cond, label, level, v = inputs(seed=5)   # t[2] = 0.03 < t_floor: u's denominator is fixed
    with torch.no_grad(), math_attention(model):
        math = time_derivative(model, z, t, r, cond, label, level, v, 0.05, "math")
    with torch.no_grad():
        kernel = time_derivative(model, z, t, r, cond, label, level, v, 0.05, "kernel")
    torch.testing.assert_close(kernel, math, rtol=1e-9, atol=1e-11)
