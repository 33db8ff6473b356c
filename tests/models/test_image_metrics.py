"""Tests for models.evaluation.image_metrics against hand-computed values and direct loops."""

import numpy as np
import pytest

from models.evaluation.image_metrics import locality, psnr, ssim, ssim_map


# --- locality -----------------------------------------------------------------


def test_locality_zero_when_only_the_inside_changes():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(16, 8))
    mask = np.zeros(16, dtype=bool)
    mask[3:7] = True
    edited = base.copy()
    edited[mask] += rng.normal(size=(4, 8))
    assert locality(base, edited, mask) == 0.0
    assert locality(base, base.copy(), mask) == 0.0


def test_locality_of_a_global_edit_is_large():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(64, 8))
    mask = np.zeros(64, dtype=bool)
    mask[:16] = True
    assert locality(base, base + rng.normal(size=base.shape), mask) > 0.5
    assert locality(base, base + 1.0, mask) == pytest.approx(1.0)


def test_locality_crafted_latent():
    base = np.zeros((4, 2))
    edited = np.array([[2.0, 0.0], [-2.0, 2.0], [1.0, 0.0], [0.0, 0.0]])
    mask = np.array([True, True, False, False])
    # per-token change: 1, 2 inside (mean 1.5); 0.5, 0 outside (mean 0.25)
    assert locality(base, edited, mask) == pytest.approx(0.25 / 1.5)


def test_locality_crafted_image():
    base = np.zeros((2, 2, 3))
    edited = base.copy()
    edited[0, 0] = [3.0, 3.0, 3.0]  # inside pixel, change 3
    edited[1, 1] = [0.0, 0.0, 3.0]  # outside pixel, change 1
    mask = np.array([[True, True], [False, False]])
    # inside mean (3 + 0)/2 = 1.5, outside mean (0 + 1)/2 = 0.5
    assert locality(base, edited, mask) == pytest.approx(0.5 / 1.5)


def test_locality_edge_cases():
    base = np.zeros((4, 2))
    mask = np.array([True, True, False, False])
    outside_only = base.copy()
    outside_only[3] = 1.0
    assert locality(base, outside_only, mask) == float("inf")
    assert np.isnan(locality(base, outside_only, np.zeros(4, dtype=bool)))
    assert np.isnan(locality(base, outside_only, np.ones(4, dtype=bool)))


# --- PSNR ---------------------------------------------------------------------


def test_psnr_identical_is_infinite():
    image = np.random.default_rng(2).integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
    assert psnr(image, image.copy()) == float("inf")


def test_psnr_matches_hand_formula():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(6, 5, 3)).astype(np.uint8)
    b = rng.integers(0, 256, size=(6, 5, 3)).astype(np.uint8)
    squared_error, count = 0.0, 0
    for value_a, value_b in zip(a.ravel().tolist(), b.ravel().tolist()):
        squared_error += (value_a - value_b) ** 2
        count += 1
    expected = 10.0 * np.log10(255.0**2 / (squared_error / count))
    assert psnr(a, b) == pytest.approx(expected, rel=1e-12)


def test_psnr_with_mask_uses_only_selected_pixels():
    a = np.zeros((4, 4, 3))
    b = a.copy()
    b[0, 0, 1] = 10.0  # inside the mask
    b[3, 3] = 200.0  # outside the mask, must be ignored
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    # 4 pixels x 3 channels selected, one error of 10: mse = 100 / 12
    assert psnr(a, b, mask=mask) == pytest.approx(10.0 * np.log10(255.0**2 * 12 / 100))
    assert psnr(a, b, mask=mask, data_range=1.0) == pytest.approx(10.0 * np.log10(12 / 100))
    assert np.isnan(psnr(a, b, mask=np.zeros((4, 4), dtype=bool)))


# --- SSIM ---------------------------------------------------------------------


def _ssim_map_by_loop(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    # numpy 'symmetric' padding equals scipy.ndimage 'reflect'
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    height, width, channels = a.shape
    result = np.zeros((height, width, channels))
    for channel in range(channels):
        pa = np.pad(a[..., channel].astype(np.float64), 3, mode="symmetric")
        pb = np.pad(b[..., channel].astype(np.float64), 3, mode="symmetric")
        for i in range(height):
            for j in range(width):
                wa = pa[i : i + 7, j : j + 7].ravel()
                wb = pb[i : i + 7, j : j + 7].ravel()
                mu_a, mu_b = wa.mean(), wb.mean()
                var_a = np.sum((wa - mu_a) ** 2) / 48
                var_b = np.sum((wb - mu_b) ** 2) / 48
                cov = np.sum((wa - mu_a) * (wb - mu_b)) / 48
                result[i, j, channel] = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
                    (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
                )
    return result.mean(axis=2)


def _noisy_pair(seed: int, shape=(11, 9, 3), noise=30.0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=shape).astype(np.float64)
    b = np.clip(a + rng.normal(scale=noise, size=shape), 0, 255)
    return a, b


def test_ssim_identical_is_one():
    a, _ = _noisy_pair(4)
    assert ssim(a, a.copy()) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_direct_window_loop():
    a, b = _noisy_pair(5)
    expected_map = _ssim_map_by_loop(a, b)
    np.testing.assert_allclose(ssim_map(a, b), expected_map, atol=1e-9)
    assert ssim(a, b) == pytest.approx(expected_map.mean(), abs=1e-9)
    mask = np.zeros(a.shape[:2], dtype=bool)
    mask[2:6, 0:4] = True  # touches the border
    assert ssim(a, b, mask=mask) == pytest.approx(expected_map[mask].mean(), abs=1e-9)
    assert np.isnan(ssim(a, b, mask=np.zeros(a.shape[:2], dtype=bool)))


def test_ssim_grayscale_and_data_range():
    a, b = _noisy_pair(6, shape=(10, 10, 1))
    assert ssim(a[..., 0], b[..., 0]) == pytest.approx(ssim(a, b))
    assert ssim(a / 255.0, b / 255.0, data_range=1.0) == pytest.approx(ssim(a, b))


def test_ssim_decreases_with_more_noise():
    a, mild = _noisy_pair(7, noise=5.0)
    _, strong = _noisy_pair(7, noise=60.0)
    assert ssim(a, mild) > ssim(a, strong)


def test_ssim_interior_matches_scikit_image():
    from skimage import metrics   # in the test extra: this test never skips
    a, b = _noisy_pair(8, shape=(20, 17, 3))
    reference = metrics.structural_similarity(a, b, channel_axis=-1, data_range=255.0)
    # scikit-image crops a 3-pixel border before averaging
    assert ssim_map(a, b)[3:-3, 3:-3].mean() == pytest.approx(reference, abs=1e-9)
