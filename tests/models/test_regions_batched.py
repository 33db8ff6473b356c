"""Generated regions found in batch (the batched merge loop) against scipy's per-canvas average linkage."""
import numpy as np
import pytest
import torch

from models.evaluation.metrics import regions_from_canvas
from models.evaluation.regions_batched import cosine_distances, regions_batched


def _canvases(rng, n, tokens, channels, regions, noise):
    ids = rng.integers(0, regions, (n, tokens))
    means = rng.normal(size=(n, regions, channels))
    return (np.take_along_axis(means, ids[..., None], 1) + noise * rng.normal(size=(n, tokens, channels))).astype(
        np.float32)


@pytest.mark.parametrize("regions,noise", [(2, 0.05), (4, 0.2), (8, 0.4), (16, 0.6)])
def test_batched_regions_equal_scipys_canvas_by_canvas(regions, noise):
    rng = np.random.default_rng(regions)
    canvases = _canvases(rng, 16, 64, 32, regions, noise)
    canvases[0, :5] = 0.0   # zero tokens: distance 0 among themselves, 1 to the rest
    canvases[1] = canvases[1, :1]   # one token repeated: a single region
    got = regions_batched(torch.from_numpy(canvases), 0.3, linkage="torch").numpy()
    expected = np.stack([regions_from_canvas(c, 0.3) for c in canvases])
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(expected[2])) > 1 or regions == 2   # the cases are not trivially one region


def test_distances_follow_the_reference_rule_for_zero_tokens():
    x = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    d = cosine_distances(x)[0]
    assert d[0, 1] == 0.0 and d[0, 2] == 1.0 and d[3, 0] == 1.0 and d[2, 3] == pytest.approx(1.0)
    assert torch.isinf(torch.diagonal(d)).all()


def test_empty_and_single_token_batches():
    assert regions_batched(torch.zeros((0, 5, 3)), 0.3).shape == (0, 5)
    assert regions_batched(torch.ones((2, 1, 3)), 0.3).tolist() == [[0], [0]]


def test_batched_plan_adherence_equals_the_per_sample_reference():
    """plan_adherence_batched against models.evaluation.metrics.plan_adherence sample by sample (NumPy, float64),
    with zero tokens in a canvas and in a final, a one-region sample, and chunks smaller than the batch."""
    from models.evaluation.metrics import plan_adherence
    from models.evaluation.regions_batched import plan_adherence_batched

    rng = np.random.default_rng(7)
    canvas, final = _canvases(rng, 9, 48, 16, 4, 0.3), _canvases(rng, 9, 48, 16, 3, 0.3)
    ids = regions_batched(torch.from_numpy(canvas), 0.3, linkage="torch")
    canvas[0, :4] = 0.0           # zero canvas tokens: cosine 0
    final[1, ids[1] == ids[1, 0]] = 0.0   # a whole region of the final at zero: its mean is zero
    ids[2] = 0                    # one region
    got = plan_adherence_batched(torch.from_numpy(canvas), torch.from_numpy(final), ids, chunk=4).numpy()
    expected = np.array([plan_adherence(c, f, i) for c, f, i in zip(canvas, final, ids.numpy())])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert got.dtype == np.float64 and np.ptp(got) > 0.05   # the cases differ
