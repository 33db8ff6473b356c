"""The evaluation's real side: image statistics computed once per extractor and real set, then read back."""
import numpy as np
import torch

from models.evaluation.metrics import feature_stats
from storage import zarr_store
from storage.zarr_store import ArraySpec
from tasks.evaluate.reference import image_reference, level_reference


def _images_store(tmp_path, n=10, size=8):
    store = tmp_path / "images-abc"
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    zarr_store.create_store(store, {"image": ArraySpec((n, size, size, 3), "uint8", ("sample", "y", "x", "rgb"))},
                            4, {})
    zarr_store.write_rows(store, slice(0, n), {"image": images})
    return store, images


def _mean_colour(images):
    return images.reshape(len(images), -1, 3).mean(1).astype(np.float32)


def test_image_statistics_are_stored_once_and_reused(tmp_path):
    store, images = _images_store(tmp_path)
    index = np.array([0, 2, 3, 5, 7, 9])
    calls = []

    def colour(batch):
        calls.append(len(batch))
        return _mean_colour(batch)

    first, reused = image_reference(store, index, "colour:v1", dinov2_fn=colour, batch_size=4)
    assert not reused and sum(calls) == len(index)
    mu, sigma = feature_stats(_mean_colour(images[index]).astype(np.float64))
    np.testing.assert_allclose(first["fd_dinov2.mean"], mu, rtol=1e-10)
    np.testing.assert_allclose(first["fd_dinov2.cov"], sigma, rtol=1e-10)

    second, reused = image_reference(store, index, "colour:v1", dinov2_fn=colour, batch_size=4)
    assert reused and sum(calls) == len(index)        # read back, nothing recomputed
    np.testing.assert_array_equal(second["fd_dinov2.cov"], first["fd_dinov2.cov"])

    # another extractor (other weights) or another real set never reuses these statistics
    _, reused = image_reference(store, index, "colour:v2", dinov2_fn=colour, batch_size=4)
    assert not reused
    _, reused = image_reference(store, index[:-1], "colour:v1", dinov2_fn=colour, batch_size=4)
    assert not reused


def test_level_statistics_match_numpy(tmp_path):
    """Every level's canvases of latents (float16 as stored, normalised) under a teacher, built batch by batch,
    against numpy's statistics of canvases built over the whole set in float64."""
    from tasks.train.level_data import Latents

    rng = np.random.default_rng(1)
    stored = torch.from_numpy(rng.normal(2.0, 3.0, size=(9, 6, 3)).astype(np.float16))
    mean, std = np.array([2.0, 1.5, 2.5], np.float32), np.array([3.0, 2.0, 4.0], np.float32)
    latents = Latents(stored, torch.zeros(9, dtype=torch.long), np.arange(9), mean, std, 2, "w", np.arange(9))
    teacher = torch.from_numpy(rng.integers(0, 3, (9, 2, 6)))   # two partition levels, then the latent
    stats = level_reference(latents, teacher, batch_size=4, tokens_per_sample=0)
    x = (stored.numpy().astype(np.float64) - mean) / std
    levels = []
    for level in range(2):
        canvas = np.zeros_like(x)
        for i in range(9):
            for region in np.unique(teacher[i, level].numpy()):
                where = teacher[i, level].numpy() == region
                canvas[i, where] = x[i, where].mean(0)
        levels.append(torch.from_numpy(canvas))
    levels.append(torch.from_numpy(x))
    for level, canvas in enumerate(levels):
        mu, sigma = feature_stats(canvas.numpy().astype(np.float64).mean(1))
        np.testing.assert_allclose(stats[f"level{level}.mean_pooled.mean"], mu, rtol=1e-6)
        np.testing.assert_allclose(stats[f"level{level}.mean_pooled.cov"], sigma, rtol=1e-5)
    assert "fd_dinov2.mean" not in stats and not any(k.endswith("tokens.mean") for k in stats)
