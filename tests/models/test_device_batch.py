"""generator.device_batch: a step's batch run as accumulated micro-batches is the whole batch's step.

The accumulated gradient must equal the whole batch's mean-loss gradient up to float32 rounding, and
a run must draw exactly what a run without the split draws (same batch, same noise, same generators after).
"""
from pathlib import Path

import pytest
import torch

from models.generator.train_loop import _batch_index, micro_batch_rows, new_state, train_generator
from specs import objective, optim, tiny_data, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")   # tests/models/conftest.py
IMAGENET = Path(__file__).parents[2] / "configs" / "imagenet.yaml"


def sizes(rows: list[slice]) -> list[int]:
    return [part.stop - part.start for part in rows]


def test_micro_batches_are_as_equal_as_possible_and_cover_the_rows_in_order():
    assert sizes(micro_batch_rows(0, 12, None)) == [12]
    assert sizes(micro_batch_rows(0, 12, 5)) == [4, 4, 4]   # three passes either way; equal sizes, one graph
    assert sizes(micro_batch_rows(0, 10, 4)) == [4, 3, 3]
    assert sizes(micro_batch_rows(0, 3, 8)) == [3]
    assert sizes(micro_batch_rows(0, 3, 1)) == [1, 1, 1]
    assert micro_batch_rows(6, 6, 4) == [slice(6, 9), slice(9, 12)]   # rank 1 of 2: inside its own rows


def test_a_rank_splits_only_its_own_share_of_the_one_global_draw():
    model = tiny_model()
    cfg = optim(batch_size=12, device_batch=4, ema_decays=[0.9], ema_halflives_kimg=[])
    whole = optim(batch_size=12, ema_decays=[0.9], ema_halflives_kimg=[])
    index, parts = _batch_index(new_state(model, cfg, "cpu"), 20, cfg, rank=1, world=2)
    same, [rows] = _batch_index(new_state(model, whole, "cpu"), 20, whole, rank=1, world=2)
    assert torch.equal(index, same) and rows == slice(6, 12)
    assert parts == [slice(6, 9), slice(9, 12)]


def one_step(device_batch: int | None, batch_size: int, shared: bool):
    """A state after one step of float32 AdamW with no clipping: every parameter's .grad is the step's."""
    cfg = optim(steps=1, batch_size=batch_size, device_batch=device_batch, optimizer="adamw", lr=1e-3,
                warmup_steps=1, grad_clip=0.0, ema_decays=[0.9], ema_halflives_kimg=[])
    data, level = ([tiny_data(seed=0), tiny_data(seed=1)], [1, 2]) if shared else (tiny_data(), 1)
    # label dropout and condition noise on: every draw of draw() is used
    return train_generator(tiny_model(), data, level, objective(label_dropout=0.3, cond_noise=0.2), cfg, "cpu")


@pytest.mark.parametrize("device_batch, batch_size, shared", [
    (6, 12, False),    # 6 + 6
    (4, 12, False),    # 4 + 4 + 4
    (4, 10, True),     # 4 + 3 + 3: uneven, one level drawn for the whole step
])
def test_accumulated_micro_batches_give_the_whole_batchs_gradient_and_draws(device_batch, batch_size, shared):
    whole, split = one_step(None, batch_size, shared), one_step(device_batch, batch_size, shared)
    assert whole.step == split.step == 1
    assert set(whole.history) == set(split.history)
    if shared:
        assert split.history["level"] == whole.history["level"]   # exact: one level, not an average of rounded ones
    for name, values in whole.history.items():
        assert split.history[name] == pytest.approx(values, rel=1e-4, abs=1e-6), name
    names = [name for name, _ in whole.model.named_parameters()]
    wanted = [p.grad for p in whole.model.parameters()]
    got = [p.grad for p in split.model.parameters()]
    for name, want, have in zip(names, wanted, got):
        torch.testing.assert_close(have, want, rtol=0, atol=1e-4 * float(want.abs().max()), msg=name)
    # the weighting: an unweighted sum would be 2x or 3x the whole batch's gradient
    norm = torch.nn.utils.get_total_norm(wanted)
    assert float(torch.nn.utils.get_total_norm(got) / norm) == pytest.approx(1.0, abs=1e-4)
    assert float(norm) > 0
    for key in ("sampler", "noise"):   # the step drew exactly what the unsplit step drew
        after = [torch.rand(1, generator=state.generators[key]) for state in (whole, split)]
        assert torch.equal(*after), key


def test_a_device_batch_at_least_the_batch_is_todays_step_bit_for_bit():
    whole, one_pass = one_step(None, 12, False), one_step(12, 12, False)
    assert whole.history == one_pass.history
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(whole.model.parameters(), one_pass.model.parameters()))


def test_the_imagenet_config_runs_its_global_batch_as_micro_batches_of_256():
    from storage.config import load_config
    from tasks.plan import generator_optim

    cfg = load_config(IMAGENET)
    assert (cfg.generator.batch_size, cfg.generator.device_batch) == (1024, 256)
    assert generator_optim(cfg, seed=0).device_batch == 256
    with pytest.raises(ValueError, match="device_batch must be >= 1"):   # the loop's own check too
        optim(device_batch=0)
