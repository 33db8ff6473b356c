import numpy as np
import pytest
import torch
from torch import nn

from models.generator.trajectory import (
    Edit,
    apply_edit,
    level_noises,
    one_step_level,
    region_mask,
    region_mean_source,
    own_regions_cut,
    sample_trajectory,
    snap_to_regions,
)
from models.evaluation.metrics import regions_from_canvas

LEVELS, T, C, CLASSES = 4, 16, 8, 5


class StandInGenerator(nn.Module):
    """Small per-level generator with the TrajectoryDiT call interface."""

    def __init__(self, channels: int, num_classes: int, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * channels, hidden), nn.Tanh(), nn.Linear(hidden, channels))
        self.label_embed = nn.Embedding(num_classes, channels)
        self.level_embed = nn.Embedding(LEVELS, channels)

    def forward(self, z, h, cond, label, level):
        x_hat = self.net(torch.cat([z, cond], dim=-1))
        x_hat = x_hat + self.label_embed(label)[:, None] + self.level_embed(level)[:, None] + 0.1 * h[:, None, None]
        return x_hat, z - x_hat


def make_models(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [StandInGenerator(C, CLASSES).eval() for _ in range(LEVELS)]


def manual_trajectory(models, noises, label, first_canvases=()):
    """Independent level-by-level loop; first_canvases fixes the leading levels."""
    canvases = list(first_canvases)
    with torch.no_grad():
        for level in range(len(canvases), len(models)):
            z1 = noises[level]
            batch = z1.shape[0]
            cond = torch.zeros_like(z1) if level == 0 else canvases[level - 1]
            h = torch.ones(batch)
            x_hat, _ = models[level](z1, h, cond, label, torch.full((batch,), level, dtype=torch.long))
            u = (z1 - x_hat) / 1.0  # t = 1, floor 0.05 inactive
            canvases.append(z1 - u)
    return canvases


@pytest.fixture
def setup():
    models = make_models()
    seeds = [11, 12, 13]
    noises = level_noises(LEVELS, T, C, seeds)
    label = torch.tensor([0, 3, 4])
    base = sample_trajectory(models, noises, label)
    return models, noises, label, base


def test_one_step_level_at_t1_equals_x_hat():
    model = make_models()[2]
    gen = torch.Generator().manual_seed(1)
    z1, cond = torch.randn(2, T, C, generator=gen), torch.randn(2, T, C, generator=gen)
    label = torch.tensor([1, 2])
    x0 = one_step_level(model, z1, cond, label, level=2)
    with torch.no_grad():
        x_hat, _ = model(z1, torch.ones(2), cond, label, torch.full((2,), 2))
    # x0 = z1 - 1 * (z1 - x_hat) / 1 in float32: the same ops give it bit for bit, and it is within two
    # roundings of x_hat (each <= eps32 / 2 x the magnitudes: a fixed 1e-6 was 1-4 ulps at |x| ~ 2-4).
    torch.testing.assert_close(x0, z1 - (z1 - x_hat), rtol=0, atol=0)
    assert ((x0 - x_hat).abs() <= torch.finfo(torch.float32).eps * (z1.abs() + x_hat.abs())).all()


def test_sample_trajectory_matches_manual_loop(setup):
    models, noises, label, base = setup
    expected = manual_trajectory(models, noises, label)
    assert len(base) == LEVELS
    for got, want in zip(base, expected):
        assert got.shape == (3, T, C)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # levels really are conditioned on each other: a different level-0 canvas changes level 1
    other = manual_trajectory(models, noises, label, first_canvases=[base[0] + 1.0])
    assert not torch.allclose(other[1], base[1])


def test_sample_trajectory_prefix_is_kept_unchanged(setup):
    models, noises, label, base = setup
    prefix = [torch.randn(3, T, C, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    out = sample_trajectory(models, noises, label, start_level=2, prefix=prefix)
    assert torch.equal(out[0], prefix[0]) and torch.equal(out[1], prefix[1])
    expected = manual_trajectory(models, noises, label, first_canvases=prefix)
    torch.testing.assert_close(out[3], expected[3], rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        sample_trajectory(models, noises, label, start_level=2, prefix=None)


def test_noise_depends_only_on_own_seed():
    batch = level_noises(LEVELS, T, C, [7, 8, 9])
    alone = level_noises(LEVELS, T, C, [8])
    reordered = level_noises(LEVELS, T, C, [9, 8])
    for level in range(LEVELS):
        assert torch.equal(batch[level][1], alone[level][0])
        assert torch.equal(batch[level][1], reordered[level][1])
        assert torch.equal(batch[level][2], reordered[level][0])
    assert not torch.allclose(batch[0][0], batch[0][1])  # seeds differ
    assert not torch.allclose(batch[0][0], batch[1][0])  # levels differ
    flat = torch.stack(level_noises(LEVELS, 64, 64, [3])).flatten()
    assert abs(flat.mean().item()) < 0.05 and abs(flat.std().item() - 1.0) < 0.05


def test_trajectory_same_alone_and_in_batch():
    models = make_models()
    seeds, labels = [21, 22, 23, 24], torch.tensor([1, 2, 3, 4])
    batched = sample_trajectory(models, level_noises(LEVELS, T, C, seeds), labels)
    alone = sample_trajectory(models, level_noises(LEVELS, T, C, [23]), labels[2:3])
    for level in range(LEVELS):
        torch.testing.assert_close(batched[level][2:3], alone[level], rtol=0, atol=1e-5)


@pytest.mark.parametrize("edit_level", [0, 1, 2])
def test_apply_edit_token_exchange(setup, edit_level):
    models, noises, label, base = setup
    donor = sample_trajectory(models, level_noises(LEVELS, T, C, [91, 92, 93]), label)
    mask = torch.zeros(3, T, dtype=torch.bool)
    mask[:, 2:7] = True
    mask[1, 10] = True
    edited = apply_edit(models, noises, label, base, Edit(edit_level, mask, donor[edit_level]))

    for level in range(edit_level):
        assert torch.equal(edited[level], base[level])
    changed = edited[edit_level]
    assert torch.equal(changed[~mask], base[edit_level][~mask])
    assert torch.equal(changed[mask], donor[edit_level][mask])
    expected_changed = base[edit_level].clone()
    expected_changed[mask] = donor[edit_level][mask]
    expected = manual_trajectory(models, noises, label, first_canvases=base[:edit_level] + [expected_changed])
    for level in range(edit_level + 1, LEVELS):
        torch.testing.assert_close(edited[level], expected[level], rtol=0, atol=1e-6)
        assert not torch.allclose(edited[level], base[level])  # the edit propagated


def test_edit_with_source_equal_to_base_is_identity(setup):
    models, noises, label, base = setup
    mask = torch.ones(3, T, dtype=torch.bool)
    edited = apply_edit(models, noises, label, base, Edit(1, mask, base[1].clone()))
    for got, want in zip(edited, base):
        assert torch.equal(got, want)


def test_edit_at_last_level_only_touches_mask(setup):
    models, noises, label, base = setup
    mask = torch.zeros(3, T, dtype=torch.bool)
    mask[:, :4] = True
    source = region_mean_source(base[3], mask, vector=torch.full((3, C), 9.0))
    edited = apply_edit(models, noises, label, base, Edit(LEVELS - 1, mask, source))
    for level in range(LEVELS - 1):
        assert torch.equal(edited[level], base[level])
    assert torch.equal(edited[3][~mask], base[3][~mask])
    assert torch.all(edited[3][mask] == 9.0)


def test_region_mask_scalar_and_per_sample():
    ids = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    assert region_mask(ids, 1).tolist() == [[False, True, False, True], [False, False, False, True]]
    per_sample = region_mask(ids, torch.tensor([2, 0]))
    assert per_sample.tolist() == [[False, False, True, False], [False, False, True, False]]
    assert per_sample.dtype == torch.bool


def test_region_mean_source_matches_numpy():
    rng = np.random.default_rng(0)
    canvas_np = rng.normal(size=(2, T, C)).astype(np.float32)
    ids_np = rng.integers(0, 3, size=(2, T))
    ids_np[:, 0] = 1  # region 1 is non-empty in both samples
    mask = region_mask(torch.from_numpy(ids_np), 1)
    source = region_mean_source(torch.from_numpy(canvas_np), mask)
    assert source.shape == (2, T, C)
    for b in range(2):
        want = canvas_np[b][ids_np[b] == 1].mean(axis=0)
        np.testing.assert_allclose(source[b].numpy(), np.broadcast_to(want, (T, C)), rtol=1e-5, atol=1e-6)
    vec = torch.arange(2 * C, dtype=torch.float32).reshape(2, C)
    given = region_mean_source(torch.from_numpy(canvas_np), mask, vector=vec)
    assert torch.equal(given, vec[:, None, :].expand(2, T, C))


def test_edit_rejects_bad_shapes():
    with pytest.raises(ValueError):
        Edit(0, torch.zeros(2, T), torch.zeros(2, T, C))  # mask not bool
    with pytest.raises(ValueError):
        Edit(0, torch.zeros(2, T, dtype=torch.bool), torch.zeros(2, T + 1, C))


def test_snap_replaces_a_noisy_piecewise_constant_canvas_by_its_own_region_means():
    gen = torch.Generator().manual_seed(5)
    ids = torch.tensor([[0] * 6 + [1] * 6 + [2] * 4, [0] * 8 + [1] * 8])
    centres = (3 * torch.eye(C)[:3]).expand(2, 3, C)   # orthogonal: cosine distance 1 between regions
    clean = torch.stack([centres[b, ids[b]] for b in range(2)])
    noisy = clean + 0.05 * torch.randn(clean.shape, generator=gen)
    snapped = snap_to_regions(noisy, threshold=0.3)
    for b in range(2):   # the mean of the noisy tokens over each true region, written out
        for region in ids[b].unique():
            inside = ids[b] == region
            torch.testing.assert_close(snapped[b, inside], noisy[b, inside].mean(0).expand(int(inside.sum()), C))


def test_snapping_sampler_keeps_partitioned_levels_piecewise_constant_and_edits_re_sample_the_same_way(setup):
    models, noises, label, _ = setup
    snapped = sample_trajectory(models, noises, label, snap_threshold=0.3)
    reference = sample_trajectory(models, noises, label)
    for level in range(LEVELS - 1):   # each level snapped from the same draw given its (snapped) condition
        cond = torch.zeros_like(noises[0]) if level == 0 else snapped[level - 1]
        raw = one_step_level(models[level], noises[level], cond, label, level)
        torch.testing.assert_close(snapped[level], snap_to_regions(raw, 0.3))
    torch.testing.assert_close(snapped[0], snap_to_regions(reference[0], 0.3))
    last = one_step_level(models[-1], noises[-1], snapped[-2], label, LEVELS - 1)
    torch.testing.assert_close(snapped[-1], last)   # the final level is never snapped
    mask = torch.zeros(3, T, dtype=torch.bool)
    mask[:, :4] = True
    edited = apply_edit(models, noises, label, snapped, Edit(1, mask, torch.zeros(3, T, C)), snap_threshold=0.3)
    assert torch.equal(edited[0], snapped[0])
    cond = torch.where(mask[..., None], torch.zeros(3, T, C), snapped[1])
    raw = one_step_level(models[2], noises[2], cond, label, 2)
    torch.testing.assert_close(edited[2], snap_to_regions(raw, 0.3))


def test_a_snapped_canvas_gives_back_exactly_the_partition_it_was_snapped_to():
    gen = torch.Generator().manual_seed(9)
    ids = torch.arange(T).reshape(1, T) % 3
    centres = torch.randn(4, 3, C, generator=gen)
    noisy = centres.gather(1, ids.expand(4, T)[..., None].expand(4, T, C)) + 0.6 * torch.randn(4, T, C, generator=gen)
    snapped = snap_to_regions(noisy, 0.3)
    assert own_regions_cut(0.3, None) == 0.3
    for b in range(4):
        snap_partition = regions_from_canvas(noisy[b].numpy(), 0.3)
        own = regions_from_canvas(snapped[b].numpy(), own_regions_cut(0.3, 0.3))
        np.testing.assert_array_equal(own, snap_partition)
