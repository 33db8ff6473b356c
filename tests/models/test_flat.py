"""The flat baseline: a one-step model straight to the latent, trained by the same loop as a level."""
import pytest
import torch

from models.generator.dit import TrajectoryDiT
from models.generator.flat import flat_level, flat_level_data, sample_flat
from models.generator.meanflow import one_step
from models.generator.train_loop import train_generator
from specs import dit, objective, optim

TINY = dict(token_dim=8, grid=4, width=32, depth=2, head_depth=1, heads=2, num_classes=3)


pytestmark = pytest.mark.usefixtures("single_thread")   # tests/models/conftest.py


def test_flat_data_has_no_plan_and_trains_at_the_last_level():
    g = torch.Generator().manual_seed(0)
    tokens, label = torch.randn(16, 16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    data = flat_level_data(tokens, torch.zeros(8), torch.ones(8), label)
    target, cond, _, regions = data.batch(torch.arange(16), "cpu")
    assert torch.equal(target, tokens) and regions is None
    assert float(cond.abs().max()) == 0.0
    assert flat_level(4) == 3

    torch.manual_seed(0)
    model = TrajectoryDiT(dit(**TINY))
    state = train_generator(model, data, flat_level(4), objective(),
                            optim(steps=4, batch_size=8, lr=1e-2, ema_decays=[0.0], ema_halflives_kimg=[]), "cpu")
    assert len(state.history["loss"]) == 4 and state.history["loss_region"] == [0.0] * 4

    sampler = state.ema(0.0)   # decay 0: the trained weights themselves
    z1 = torch.randn(5, 16, 8, generator=g)
    label5 = torch.tensor([0, 1, 2, 3, 1])   # 3 = the null (unconditional) label
    out = sample_flat(sampler, z1, label5, num_levels=4)
    expected = one_step(sampler, z1, torch.zeros_like(z1), label5, torch.full((5,), 3))
    assert out.shape == (5, 16, 8) and torch.equal(out, expected)
    other_level = one_step(sampler, z1, torch.zeros_like(z1), label5, torch.full((5,), 0))
    assert not torch.equal(out, other_level)   # the level embedding is part of what it learned
