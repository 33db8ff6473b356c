"""Tests for models.evaluation.metrics against closed forms, hand-computed values and brute force."""

import itertools

import numpy as np
import pytest
import scipy.linalg

from models.evaluation.metrics import (
    StreamingStats,
    adjusted_rand,
    bootstrap_ci,
    fd_from_features,
    feature_stats,
    frechet_distance,
    matched_miou,
    nesting_share,
    plan_adherence,
    regions_from_canvas,
)


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


def _sqrtm_fd(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook formula with a general matrix square root (scipy.linalg.sqrtm of S1 S2, as pytorch-fid
    computes it): independent of the code's two symmetric eigendecompositions."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    assert np.abs(np.imag(covmean)).max() < 1e-6 * np.abs(covmean).max()   # round-off only
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(np.real(covmean)))


# --- feature statistics ------------------------------------------------------


def test_feature_stats_matches_explicit_sums():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    mu, sigma = feature_stats(x)
    expected_mu = np.zeros(4)
    for row in x.astype(np.float64):
        expected_mu += row
    expected_mu /= len(x)
    expected_sigma = np.zeros((4, 4))
    for row in x.astype(np.float64):
        expected_sigma += np.outer(row - expected_mu, row - expected_mu)
    expected_sigma /= len(x) - 1
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, expected_mu, atol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, atol=1e-12)


def test_streaming_stats_over_random_splits_and_merges_equals_full_array():
    rng = np.random.default_rng(1)
    x = rng.normal(loc=3.0, scale=2.0, size=(500, 6))
    cuts = np.sort(rng.choice(np.arange(1, 500), size=9, replace=False))
    batches = np.split(x, cuts)
    # Half the batches stream into one object, the rest each into their own, merged pairwise.
    streamed = StreamingStats(6)
    for batch in batches[:5]:
        streamed.update(batch)
    streamed.update(np.empty((0, 6)))
    partials = []
    for batch in batches[5:]:
        part = StreamingStats(6)
        part.update(batch)
        partials.append(part)
    merged_tail = partials[0].merge(partials[1]).merge(partials[2].merge(partials[3]).merge(partials[4]))
    total = streamed.merge(merged_tail).merge(StreamingStats(6))
    assert total.count == 500
    np.testing.assert_allclose(total.mean, x.mean(axis=0), atol=1e-10)
    np.testing.assert_allclose(total.cov, np.cov(x, rowvar=False), atol=1e-10)
    # merge must not mutate its inputs
    assert streamed.count == sum(len(b) for b in batches[:5])


def test_streaming_stats_undefined_before_enough_data():
    stats = StreamingStats(3)
    assert np.isnan(stats.mean).all() and np.isnan(stats.cov).all()
    stats.update(np.ones((1, 3)))
    np.testing.assert_array_equal(stats.mean, np.ones(3))
    assert np.isnan(stats.cov).all()
    with pytest.raises(ValueError):
        stats.update(np.ones((2, 4)))


# --- Frechet distance ---------------------------------------------------------


def test_fd_of_identical_feature_sets_is_zero():
    rng = np.random.default_rng(2)
    x = rng.normal(scale=10.0, size=(400, 16))
    scale = np.trace(np.cov(x, rowvar=False))
    assert abs(fd_from_features(x, x.copy())) < 1e-6 * scale


def test_fd_diagonal_gaussians_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    # 1 + 0 + 6.25 + (1-3)^2 + (2-1)^2 + 0 = 12.25
    assert expected == pytest.approx(12.25)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_fd_general_spd_matches_scipy_sqrtm():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    sigma1, sigma2 = _random_spd(rng, 5), _random_spd(rng, 5)
    expected = _sqrtm_fd(mu1, sigma1, mu2, sigma2)
    assert expected > 0.1
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    # symmetric in its two arguments
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=1e-8)


def test_fd_from_large_samples_approaches_closed_form():
    rng = np.random.default_rng(4)
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, -1.0, 0.5])
    sigma1, sigma2 = _random_spd(rng, 4), _random_spd(rng, 4)
    expected = _sqrtm_fd(mu1, sigma1, mu2, sigma2)
    a = rng.multivariate_normal(mu1, sigma1, size=40_000)
    b = rng.multivariate_normal(mu2, sigma2, size=40_000)
    assert fd_from_features(a, b) == pytest.approx(expected, rel=0.03)


def test_fd_singular_covariances_stays_finite_and_correct():
    sigma1, sigma2 = np.diag([1.0, 0.0]), np.diag([0.0, 1.0])
    mu = np.zeros(2)
    # diagonal closed form: (1 - 0)^2 + (0 - 1)^2
    assert frechet_distance(mu, sigma1, mu, sigma2) == pytest.approx(2.0, abs=1e-5)
    rng = np.random.default_rng(5)
    few, other = rng.normal(size=(3, 8)), rng.normal(size=(4, 8))  # rank-deficient covariances
    (mu_a, sigma_a), (mu_b, sigma_b) = feature_stats(few), feature_stats(other)
    assert fd_from_features(few, other) == pytest.approx(_sqrtm_fd(mu_a, sigma_a, mu_b, sigma_b), rel=1e-6)


# --- regions from a generated canvas -------------------------------------------


def _first_appearance_ids(labels: np.ndarray) -> np.ndarray:
    mapping: dict[int, int] = {}
    out = []
    for label in labels:
        mapping.setdefault(int(label), len(mapping))
        out.append(mapping[int(label)])
    return np.array(out)


def test_regions_from_canvas_recovers_planted_partition():
    rng = np.random.default_rng(6)
    side, channels, n_regions = 16, 32, 5
    rows, cols = np.mgrid[0:side, 0:side]
    planted = (3 * (rows // 6) + cols // 6) % n_regions  # blocky layout, ids out of raster order
    planted = (planted + 2) % n_regions
    centres = rng.normal(size=(n_regions, channels))
    canvas = centres[planted.reshape(-1)] + 1e-3 * rng.normal(size=(side * side, channels))
    ids = regions_from_canvas(canvas)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, _first_appearance_ids(planted.reshape(-1)))


def test_regions_from_canvas_threshold_and_scale_invariance():
    angle = np.arccos(1.0 - 0.03)  # two directions at cosine distance 0.03
    a, b = np.array([1.0, 0.0]), np.array([np.cos(angle), np.sin(angle)])
    canvas = np.stack([a, 5.0 * a, b, -a])  # 5a has the same direction as a
    np.testing.assert_array_equal(regions_from_canvas(canvas, threshold=0.05), [0, 0, 0, 1])
    np.testing.assert_array_equal(regions_from_canvas(canvas, threshold=0.01), [0, 0, 1, 2])
    np.testing.assert_array_equal(regions_from_canvas(np.ones((1, 4))), [0])


# --- nesting and plan adherence -----------------------------------------------


def test_nesting_share_is_one_for_a_refinement():
    rng = np.random.default_rng(7)
    fine = rng.integers(0, 12, size=64)
    coarse = fine // 4  # every fine region maps to exactly one coarse region
    assert nesting_share(fine, coarse) == 1.0


def test_nesting_share_crafted_case():
    coarse = np.array([0, 0, 0, 1, 1, 1])
    fine = np.array([0, 0, 1, 1, 2, 2])  # region 1 straddles the coarse boundary
    assert nesting_share(fine, coarse) == pytest.approx(2.0 / 3.0)
    assert nesting_share(fine.reshape(2, 3), coarse.reshape(2, 3)) == pytest.approx(2.0 / 3.0)


def test_plan_adherence_is_one_when_canvas_is_region_means():
    rng = np.random.default_rng(8)
    final = rng.normal(size=(40, 6))
    ids = rng.integers(0, 5, size=40)
    canvas = np.empty_like(final)
    for region in np.unique(ids):
        canvas[ids == region] = final[ids == region].mean(axis=0)
    assert plan_adherence(canvas, final, ids) == pytest.approx(1.0, abs=1e-12)
    assert plan_adherence(-canvas, final, ids) == pytest.approx(-1.0, abs=1e-12)


def test_plan_adherence_crafted_case():
    final = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    ids = np.array([4, 4, 9])  # region means: [0.5, 0.5] and [2, 2]
    canvas = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # cosines: 1/sqrt2, 1, 1/sqrt2
    assert plan_adherence(canvas, final, ids) == pytest.approx((np.sqrt(2.0) + 1.0) / 3.0)


# --- partition agreement ------------------------------------------------------


def test_relabelled_partition_scores_perfectly():
    rng = np.random.default_rng(9)
    target = rng.integers(0, 6, size=(8, 8))
    permutation = np.array([3, 5, 0, 1, 4, 2]) + 10
    pred = permutation[target]
    assert adjusted_rand(pred, target) == pytest.approx(1.0)
    assert matched_miou(pred, target) == pytest.approx(1.0)


def test_adjusted_rand_hand_value():
    a = np.array([0, 0, 0, 1, 1, 1])
    b = np.array([0, 0, 1, 1, 2, 2])
    # sum C(n_ij,2)=2, row term 6, column term 3, C(6,2)=15: (2-1.2)/(4.5-1.2)
    assert adjusted_rand(a, b) == pytest.approx(8.0 / 33.0)


def test_matched_miou_crafted_split():
    target = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([5, 5, 7, 7, 9, 9])  # target 0 split in two halves
    assert matched_miou(pred, target) == pytest.approx((0.5 + 1.0) / 2.0)
    # one predicted region against three targets: one match with IoU 1/3, two unmatched
    assert matched_miou(np.zeros(6), np.array([0, 0, 1, 1, 2, 2])) == pytest.approx(1.0 / 9.0)


def test_matched_miou_equals_brute_force_over_matchings():
    rng = np.random.default_rng(10)
    pred = rng.integers(0, 4, size=40)
    target = rng.integers(0, 3, size=40)
    pred_regions = [set(np.flatnonzero(pred == p)) for p in np.unique(pred)]
    target_regions = [set(np.flatnonzero(target == q)) for q in np.unique(target)]
    best = 0.0
    for chosen in itertools.permutations(range(len(pred_regions)), len(target_regions)):
        total = sum(
            len(pred_regions[p] & target_regions[q]) / len(pred_regions[p] | target_regions[q])
            for q, p in enumerate(chosen)
        )
        best = max(best, total)
    assert matched_miou(pred, target) == pytest.approx(best / len(target_regions))


# --- bootstrap ----------------------------------------------------------------


def test_bootstrap_ci_contains_mean_and_matches_normal_approximation():
    rng = np.random.default_rng(11)
    values = rng.normal(loc=2.0, scale=3.0, size=2000)
    low, high = bootstrap_ci(values, n_boot=2000, seed=0)
    assert low < values.mean() < high
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert (high - low) / 2.0 == pytest.approx(half_width, rel=0.15)
    assert bootstrap_ci(values, n_boot=2000, seed=0) == (low, high)


def test_bootstrap_ci_narrows_with_more_samples():
    rng = np.random.default_rng(12)
    values = rng.exponential(size=5000)
    small_low, small_high = bootstrap_ci(values[:50])
    large_low, large_high = bootstrap_ci(values)
    assert (large_high - large_low) < 0.3 * (small_high - small_low)


def test_bootstrap_ci_ignores_non_finite_and_handles_tiny_inputs():
    rng = np.random.default_rng(13)
    values = rng.normal(size=100)
    polluted = np.concatenate([values, [np.nan, np.inf, -np.inf]])
    assert bootstrap_ci(polluted, seed=3) == bootstrap_ci(values, seed=3)
    assert all(np.isnan(bootstrap_ci(np.array([1.0, np.nan]))))
    assert all(np.isnan(bootstrap_ci(np.array([]))))


def test_bootstrap_ci_with_median_and_a_non_vectorised_statistic():
    values = np.arange(1.0, 102.0)
    low, high = bootstrap_ci(values, statistic=np.median, n_boot=500)
    assert low < 51.0 < high
    loop_low, loop_high = bootstrap_ci(values, statistic=lambda row: float(np.median(row)), n_boot=500)
    assert (loop_low, loop_high) == pytest.approx((low, high))


def test_fd_is_exact_for_singular_covariances():
    # rank-deficient covariances (fewer samples than dimensions) have no NaN path:
    # diagonal closed form with zeros on the diagonal
    s1, s2 = np.array([1.0, 4.0, 0.0]), np.array([9.0, 0.0, 0.0])
    value = frechet_distance(np.zeros(3), np.diag(s1), np.ones(3), np.diag(s2))
    expected = 3.0 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert value == pytest.approx(expected, rel=1e-10)
    rng = np.random.default_rng(0)
    few = rng.normal(size=(5, 16))
    assert np.isfinite(fd_from_features(few, few + 0.5))
    assert fd_from_features(few, few) == pytest.approx(0.0, abs=1e-9)


def test_streaming_stats_from_moments_round_trips_and_checks_shapes():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 5))
    stats = StreamingStats(5)
    stats.update(x)
    copy = StreamingStats.from_moments(stats.count, stats.mean, stats.cov * (stats.count - 1))
    np.testing.assert_allclose(copy.cov, np.cov(x, rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(copy.mean, x.mean(0), rtol=1e-12)
    more = rng.normal(size=(7, 5))
    copy.update(more)   # keeps folding like the original
    np.testing.assert_allclose(copy.cov, np.cov(np.vstack([x, more]), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="M2"):
        StreamingStats.from_moments(3, np.zeros(5), np.zeros((4, 4)))
