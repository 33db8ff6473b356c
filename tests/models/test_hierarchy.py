"""Tests for models/hierarchy.py against independent sklearn / scipy computations."""

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import cdist, squareform
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import normalize

from models.hierarchy import HierarchySpec, build_hierarchies, build_hierarchy, region_canvas


def random_tokens(seed: int, g: int, channels: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((g, g, channels))


def reference_coords(g: int) -> np.ndarray:
    rows, cols = np.indices((g, g))
    return np.stack([rows.ravel(), cols.ravel()], axis=1) / (g - 1)


def reference_object_mask(tokens: np.ndarray, alpha: float, seed: int) -> np.ndarray:
    g = tokens.shape[0]
    coords = reference_coords(g)
    features = normalize(tokens.reshape(g * g, -1))
    if alpha:
        features = np.hstack([features, alpha * coords])
    labels = KMeans(n_clusters=2, n_init=1, random_state=seed).fit_predict(features)
    centre_distance = np.hypot(coords[:, 0] - 0.5, coords[:, 1] - 0.5)
    mean_distance = [centre_distance[labels == c].mean() for c in range(2)]
    return labels == int(np.argmin(mean_distance))


def reference_part_labels(tokens, mask, lam, cuts, method="average", mode="height"):
    """Brute-force scipy hierarchy of the object tokens; one label array per cut."""
    g = tokens.shape[0]
    flat = tokens.reshape(g * g, -1)[mask.ravel()]
    coords = reference_coords(g)[mask.ravel()]
    distances = cdist(flat, flat, "cosine") + lam * cdist(coords, coords, "euclidean")
    tree = linkage(squareform(distances, checks=False), method=method)
    raw_heights = tree[:, 2].copy()
    if mode == "quantile":
        return [fcluster(tree, np.quantile(raw_heights, q), criterion="distance") for q in cuts]
    lo, hi = raw_heights.min(), raw_heights.max()
    tree[:, 2] = (raw_heights - lo) / (hi - lo)
    return [fcluster(tree, cut, criterion="distance") for cut in cuts]


def assert_nested(ids: np.ndarray) -> None:
    background = ids[0] == 0
    for level in range(len(ids)):
        np.testing.assert_array_equal(ids[level] == 0, background)
    for coarse, fine in zip(ids[:-1], ids[1:]):
        for region in np.unique(fine):
            assert len(np.unique(coarse[fine == region])) == 1


@pytest.mark.parametrize("g", [8, 16])
def test_levels_nested_with_shared_background(g):
    fine_splits_coarse = 0
    for seed in range(12):
        ids = build_hierarchy(random_tokens(seed, g).astype(np.float32), HierarchySpec(seed=seed))
        assert ids.shape == (3, g, g) and ids.dtype == np.int16
        assert set(np.unique(ids[0])) <= {0, 1}
        assert_nested(ids)
        fine_splits_coarse += ids[2].max() > ids[1].max()
    assert fine_splits_coarse > 0  # the nesting check was not vacuous


@pytest.mark.parametrize("g", [8, 16])
def test_object_ids_are_canonical(g):
    for seed in range(6):
        ids = build_hierarchy(random_tokens(seed, g), HierarchySpec(seed=seed))
        for level in ids[1:]:
            object_ids = level.ravel()[level.ravel() > 0]
            _, first = np.unique(object_ids, return_index=True)
            ordered = object_ids[np.sort(first)]
            np.testing.assert_array_equal(ordered, np.arange(1, len(ordered) + 1))


@pytest.mark.parametrize("g", [8, 16])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_level0_matches_sklearn_kmeans(g, alpha):
    for seed in range(4):
        tokens = random_tokens(100 + seed, g)
        ids = build_hierarchy(tokens, HierarchySpec(alpha=alpha, seed=seed))
        expected = reference_object_mask(tokens, alpha, seed)
        np.testing.assert_array_equal(ids[0] == 1, expected.reshape(g, g))


@pytest.mark.parametrize("g", [8, 16])
@pytest.mark.parametrize("method,lam", [("average", 0.2), ("average", 0.6), ("complete", 0.2)])
def test_part_levels_match_bruteforce_scipy(g, method, lam):
    cuts = (0.65, 0.35)
    for seed in range(4):
        tokens = random_tokens(200 + seed, g)
        ids = build_hierarchy(tokens, HierarchySpec(lam=lam, linkage=method, seed=seed))
        mask = reference_object_mask(tokens, 0.0, seed).reshape(g, g)
        expected = reference_part_labels(tokens, mask, lam, cuts, method)
        for level, labels in enumerate(expected, start=1):
            assert np.all(ids[level][~mask] == 0)
            assert ids[level][mask].max() == labels.max()
            assert adjusted_rand_score(labels, ids[level][mask]) == 1.0


@pytest.mark.parametrize("g", [8, 16])
def test_quantile_cut_mode_matches_bruteforce_scipy(g):
    quantiles = (0.9, 0.5, 0.1)
    for seed in range(4):
        tokens = random_tokens(300 + seed, g)
        ids = build_hierarchy(tokens, HierarchySpec(cuts=quantiles, cut_mode="quantile", seed=seed))
        assert ids.shape == (4, g, g)
        assert_nested(ids)
        mask = reference_object_mask(tokens, 0.0, seed).reshape(g, g)
        expected = reference_part_labels(tokens, mask, 0.2, quantiles, mode="quantile")
        for level, labels in enumerate(expected, start=1):
            assert adjusted_rand_score(labels, ids[level][mask]) == 1.0
    # The top quantile is the root merge: the whole object is one region.
    whole = build_hierarchy(random_tokens(0, g), HierarchySpec(cuts=(1.0,), cut_mode="quantile"))
    np.testing.assert_array_equal(whole[1], whole[0])


def planted_scene(seed: int, g: int = 16, channels: int = 32, noise: float = 0.02):
    """Central object of parts P (top) and Q (bottom); Q splits into Q1 (left), Q2 (right)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((channels, channels)))[0][:, :5].T
    background, objectness, part_p, part_q, q_split = basis
    # Q1 and Q2 at cosine 0.5 to each other: closer than P is to Q, far from background.
    q1 = (part_q + q_split / np.sqrt(3)) / np.sqrt(4 / 3)
    q2 = (part_q - q_split / np.sqrt(3)) / np.sqrt(4 / 3)
    directions = np.stack([background, objectness + part_p, objectness + q1, objectness + q2])
    subparts = np.zeros((g, g), dtype=int)
    subparts[3:13, 3:13] = 1
    subparts[8:13, 3:8] = 2
    subparts[8:13, 8:13] = 3
    scale = rng.uniform(0.5, 2.0, (g, g, 1))  # cosine geometry must ignore token norms
    tokens = directions[subparts] * scale + noise * rng.standard_normal((g, g, channels))
    parts = np.minimum(subparts, 2)
    return tokens, parts, subparts


def test_planted_hierarchy_recovered_exactly():
    for seed in range(5):
        tokens, parts, subparts = planted_scene(seed)
        ids = build_hierarchy(tokens, HierarchySpec(seed=seed))
        np.testing.assert_array_equal(ids[0], subparts > 0)
        # Raster order numbers P, then Q (level 1) and P, Q1, Q2 (level 2): exact ids.
        np.testing.assert_array_equal(ids[1], parts)
        np.testing.assert_array_equal(ids[2], subparts)
        assert adjusted_rand_score(subparts.ravel(), ids[2].ravel()) == 1.0


def test_degenerate_inputs_are_all_object():
    g, spec = 8, HierarchySpec()
    direction = np.random.default_rng(0).standard_normal(16)
    identical = np.tile(direction, (g, g, 1))
    scaled = direction * np.arange(1, g * g + 1).reshape(g, g, 1)  # identical once normalised
    for tokens in (identical, np.zeros((g, g, 16)), scaled):
        np.testing.assert_array_equal(build_hierarchy(tokens, spec), np.ones((3, g, g)))
    # Identical directions with alpha > 0 still do not split on position alone.
    ids = build_hierarchy(identical, HierarchySpec(alpha=1.0))
    np.testing.assert_array_equal(ids, np.ones((3, g, g)))


def test_single_and_paired_object_tokens():
    g, channels = 9, 16
    rng = np.random.default_rng(1)
    background, objectness = np.linalg.qr(rng.standard_normal((channels, 2)))[0].T
    tokens = np.tile(background, (g, g, 1)) + 0.01 * rng.standard_normal((g, g, channels))
    tokens[4, 4] = objectness
    ids = build_hierarchy(tokens, HierarchySpec())
    expected = np.zeros((g, g), dtype=int)
    expected[4, 4] = 1
    for level in ids:
        np.testing.assert_array_equal(level, expected)
    # Two object tokens: one merge, heights all equal -> normalised 0 -> one region.
    tokens[4, 5] = objectness
    expected[4, 5] = 1
    for level in build_hierarchy(tokens, HierarchySpec()):
        np.testing.assert_array_equal(level, expected)


def test_spec_validation():
    with pytest.raises(ValueError):
        HierarchySpec(cuts=(0.35, 0.65))
    with pytest.raises(ValueError):
        HierarchySpec(cuts=(1.5, 0.5), cut_mode="quantile")
    with pytest.raises(ValueError):
        HierarchySpec(cut_mode="percentile")
    with pytest.raises(ValueError):
        HierarchySpec(linkage="average-ish")
    with pytest.raises(ValueError):
        HierarchySpec(k=1)
    with pytest.raises(ValueError):
        build_hierarchy(np.zeros((4, 4)))
    HierarchySpec(cuts=(0.5, 0.5))  # equal cuts are non-increasing
    only_level0 = build_hierarchy(random_tokens(0, 8), HierarchySpec(cuts=()))
    assert only_level0.shape == (1, 8, 8)


def test_build_hierarchies_stacks_per_image_results_deterministically():
    batch = np.stack([random_tokens(seed, 8) for seed in range(5)]).astype(np.float32)
    spec = HierarchySpec(seed=3)
    out = build_hierarchies(batch, spec)
    assert out.shape == (5, 3, 8, 8) and out.dtype == np.int16
    for image, ids in zip(batch, out):
        np.testing.assert_array_equal(ids, build_hierarchy(image, spec))
    np.testing.assert_array_equal(out, build_hierarchies(batch, spec))


def bruteforce_canvas(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            out[b, t] = x[b, ids[b] == ids[b, t]].astype(np.float64).mean(axis=0)
    return out


def test_region_canvas_matches_bruteforce_loop():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 20, 6, generator=generator)
    ids = torch.stack([
        torch.randint(0, 3, (20,), generator=generator),
        torch.randint(0, 8, (20,), generator=generator) * 50,  # sparse, large ids
        torch.zeros(20, dtype=torch.long),
        torch.arange(20),
    ])
    canvas = region_canvas(x, ids)
    assert canvas.shape == x.shape and canvas.dtype == x.dtype
    expected = bruteforce_canvas(x.numpy(), ids.numpy())
    np.testing.assert_allclose(canvas.numpy(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(canvas[3], x[3])  # raw grid: canvas is the latent itself
    half = region_canvas(x.bfloat16(), ids)
    assert half.dtype == torch.bfloat16
    np.testing.assert_allclose(half.float().numpy(), expected, atol=3e-2)


def test_region_canvas_gradient():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    ids = torch.randint(0, 4, (2, 12), generator=generator)
    assert torch.autograd.gradcheck(lambda inp: region_canvas(inp, ids), (x,))
    weights = torch.randn(2, 12, 3, dtype=torch.float64, generator=generator)
    (region_canvas(x, ids) * weights).sum().backward()
    # d/dx[b, t] = mean of the weights over the region of t (a mean is self-adjoint).
    expected = bruteforce_canvas(weights.numpy(), ids.numpy())
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-10, atol=1e-12)
