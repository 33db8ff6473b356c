"""Edit controllability and preservation metrics: locality, PSNR and SSIM (DESIGN.md section 4).

Works on latents [T, C] with token masks [T] and on images [H, W, C] (or [H, W])
with pixel masks [H, W]. Pure numpy/scipy.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter

SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def locality(base: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float:
    """Change outside the edit region divided by change inside it; lower is better.

    base, edited: latent [T, C] with mask [T], or image [H, W, C] with mask [H, W]
    (arrays with the mask's shape are treated as single-channel).
    d = mean over channels of |edited - base|;  locality = mean(d[~mask]) / mean(d[mask]).
    Returns 0.0 when nothing changed outside (also when nothing changed at all), inf when
    only the outside changed, nan when the mask is empty or covers everything.
    """
    base = np.asarray(base, dtype=np.float64)
    edited = np.asarray(edited, dtype=np.float64)
    inside = np.asarray(mask, dtype=bool)
    if base.shape != edited.shape:
        raise ValueError(f"base {base.shape} and edited {edited.shape} differ in shape")
    change = np.abs(edited - base)
    if change.shape != inside.shape:
        if change.shape[:-1] != inside.shape:
            raise ValueError(f"mask {inside.shape} does not match data {change.shape}")
        change = change.mean(axis=-1)
    if not inside.any() or inside.all():
        return float("nan")
    change_outside = float(change[~inside].mean())
    change_inside = float(change[inside].mean())
    if change_outside == 0.0:
        return 0.0
    if change_inside == 0.0:
        return float("inf")
    return change_outside / change_inside


def psnr(
    a: np.ndarray,
    b: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float = 255.0,
) -> float:
    """Peak signal-to-noise ratio in dB; higher is better.

    PSNR = 10 log10(data_range^2 / MSE), MSE over all channels of the selected pixels
    (mask [H, W], all pixels when None). inf for identical inputs, nan for an empty mask.
    """
    a_img, b_img = _as_image_pair(a, b)
    selected = _pixel_mask(mask, a_img.shape[:2])
    if not selected.any():
        return float("nan")
    mse = float(np.mean((a_img[selected] - b_img[selected]) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per-pixel SSIM [H, W], averaged over channels (Wang et al. 2004).

    With 7x7 uniform-window local statistics (reflect padding at the border) and
    sample (N-1) normalisation of variances and covariance, as scikit-image does:
    SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)),
    C1 = (K1 L)^2, C2 = (K2 L)^2, K1 = 0.01, K2 = 0.03, L = data_range.
    """
    a_img, b_img = _as_image_pair(a, b)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    window_pixels = SSIM_WINDOW * SSIM_WINDOW
    sample_correction = window_pixels / (window_pixels - 1)
    per_channel = []
    for channel in range(a_img.shape[2]):
        x = a_img[..., channel]
        y = b_img[..., channel]
        mu_x, mu_y = _local_mean(x), _local_mean(y)
        var_x = sample_correction * (_local_mean(x * x) - mu_x * mu_x)
        var_y = sample_correction * (_local_mean(y * y) - mu_y * mu_y)
        cov_xy = sample_correction * (_local_mean(x * y) - mu_x * mu_y)
        numerator = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
        denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
        per_channel.append(numerator / denominator)
    return np.mean(per_channel, axis=0)


def ssim(
    a: np.ndarray,
    b: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float = 255.0,
) -> float:
    """Mean structural similarity; higher is better (1 for identical images).

    The SSIM map of `ssim_map` averaged over all pixels, or over the pixels selected by
    mask [H, W]; nan for an empty mask. Unlike scikit-image, border pixels are not
    cropped, so that a mask touching the border is scored on all of its pixels.
    """
    similarity = ssim_map(a, b, data_range=data_range)
    selected = _pixel_mask(mask, similarity.shape)
    if not selected.any():
        return float("nan")
    return float(similarity[selected].mean())


def _local_mean(image: np.ndarray) -> np.ndarray:
    """Mean over the SSIM window around each pixel, reflecting at the border."""
    return uniform_filter(image, size=SSIM_WINDOW, mode="reflect")


def _as_image_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a_img = np.asarray(a, dtype=np.float64)
    b_img = np.asarray(b, dtype=np.float64)
    if a_img.shape != b_img.shape:
        raise ValueError(f"images differ in shape: {a_img.shape} vs {b_img.shape}")
    if a_img.ndim == 2:
        a_img, b_img = a_img[..., None], b_img[..., None]
    if a_img.ndim != 3:
        raise ValueError(f"images must be [H, W] or [H, W, C], got {a_img.shape}")
    return a_img, b_img


def _pixel_mask(mask: np.ndarray | None, spatial_shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(spatial_shape, dtype=bool)
    selected = np.asarray(mask, dtype=bool)
    if selected.shape != tuple(spatial_shape):
        raise ValueError(f"mask {selected.shape} does not match image {tuple(spatial_shape)}")
    return selected
