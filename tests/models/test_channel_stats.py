import numpy as np

from models.channel_stats import chunk_moments, mean_std


def test_chunked_moments_match_numpy_on_the_full_array():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(103, 4, 4, 8)).astype(np.float32)
    bounds = [(0, 10), (10, 11), (11, 64), (64, 64), (64, 103)]
    moments = [chunk_moments(data[a:b]) for a, b in bounds]
    counts = np.array([m[0] for m in moments])
    means = np.stack([m[1] for m in moments])
    m2s = np.stack([m[2] for m in moments])
    mean, std = mean_std(counts, means, m2s, eps=0.0)
    flat = data.reshape(-1, 8).astype(np.float64)
    # float64 moments, returned as float32: one rounding (<= 2^-24 relative, 6e-8) apart from numpy's float64
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-6)
    # merge order does not matter: the float64 merges differ by ~1e-16, so their float32 values by <= 1 ulp
    order = [4, 0, 2, 1, 3]
    mean2, std2 = mean_std(counts[order], means[order], m2s[order], eps=0.0)
    np.testing.assert_allclose(mean2, mean, rtol=1e-6)
    np.testing.assert_allclose(std2, std, rtol=1e-6)


def test_device_moments_batch_by_batch_equal_numpy_float64_moments():
    """The encode pass's on-device accumulation (uneven batches, an empty one) against numpy's two-pass
    float64 moments of the whole array; nothing added gives chunk_moments' zeros."""
    import torch

    from models.channel_stats import DeviceMoments

    rng = np.random.default_rng(1)
    data = rng.normal(5.0, 0.5, size=(37, 3, 3, 6)).astype(np.float32)   # mean >> std: no cancellation
    moments = DeviceMoments()
    for a, b in [(0, 5), (5, 5), (5, 6), (6, 37)]:
        moments.add(torch.from_numpy(data[a:b]))
    count, mean, m2 = moments.result(6)
    flat = data.reshape(-1, 6).astype(np.float64)
    assert count == len(flat)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m2, ((flat - flat.mean(0)) ** 2).sum(0), rtol=1e-10)
    empty = DeviceMoments().result(6)
    assert empty[0] == 0 and not empty[1].any() and not empty[2].any()
