"""Tests for models/hierarchy/reference.py against independent sklearn / scipy computations."""

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import cdist, squareform
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import normalize

from models.hierarchy.reference import build_hierarchies, build_hierarchy, region_canvas
from specs import hierarchy_spec


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
        ids = build_hierarchy(random_tokens(seed, g).astype(np.float32), hierarchy_spec(seed=seed))
        assert ids.shape == (3, g, g) and ids.dtype == np.int16
        assert set(np.unique(ids[0])) <= {0, 1}
        assert_nested(ids)
        fine_splits_coarse += ids[2].max() > ids[1].max()
    assert fine_splits_coarse > 0  # the nesting check was not vacuous


@pytest.mark.parametrize("g", [8, 16])
def test_object_ids_are_canonical(g):
    for seed in range(6):
        ids = build_hierarchy(random_tokens(seed, g), hierarchy_spec(seed=seed))
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
        ids = build_hierarchy(tokens, hierarchy_spec(alpha=alpha, seed=seed))
        expected = reference_object_mask(tokens, alpha, seed)
        np.testing.assert_array_equal(ids[0] == 1, expected.reshape(g, g))


@pytest.mark.parametrize("g", [8, 16])
@pytest.mark.parametrize("method,lam", [("average", 0.2), ("average", 0.6), ("complete", 0.2)])
def test_part_levels_match_bruteforce_scipy(g, method, lam):
    cuts = (0.65, 0.35)
    for seed in range(4):
        tokens = random_tokens(200 + seed, g)
        ids = build_hierarchy(tokens, hierarchy_spec(lam=lam, linkage=method, seed=seed))
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
        ids = build_hierarchy(tokens, hierarchy_spec(cuts=quantiles, cut_mode="quantile", seed=seed))
        assert ids.shape == (4, g, g)
        assert_nested(ids)
        mask = reference_object_mask(tokens, 0.0, seed).reshape(g, g)
        expected = reference_part_labels(tokens, mask, 0.2, quantiles, mode="quantile")
        for level, labels in enumerate(expected, start=1):
            assert adjusted_rand_score(labels, ids[level][mask]) == 1.0
    # The top quantile is the root merge: the whole object is one region.
    whole = build_hierarchy(random_tokens(0, g), hierarchy_spec(cuts=(1.0,), cut_mode="quantile"))
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
        ids = build_hierarchy(tokens, hierarchy_spec(seed=seed))
        np.testing.assert_array_equal(ids[0], subparts > 0)
        # Raster order numbers P, then Q (level 1) and P, Q1, Q2 (level 2): exact ids.
        np.testing.assert_array_equal(ids[1], parts)
        np.testing.assert_array_equal(ids[2], subparts)
        assert adjusted_rand_score(subparts.ravel(), ids[2].ravel()) == 1.0


def test_degenerate_inputs_are_all_object():
    g, spec = 8, hierarchy_spec()
    direction = np.random.default_rng(0).standard_normal(16)
    identical = np.tile(direction, (g, g, 1))
    scaled = direction * np.arange(1, g * g + 1).reshape(g, g, 1)  # identical once normalised
    for tokens in (identical, np.zeros((g, g, 16)), scaled):
        np.testing.assert_array_equal(build_hierarchy(tokens, spec), np.ones((3, g, g)))
    # Identical directions with alpha > 0 still do not split on position alone.
    ids = build_hierarchy(identical, hierarchy_spec(alpha=1.0))
    np.testing.assert_array_equal(ids, np.ones((3, g, g)))


def test_single_and_paired_object_tokens():
    g, channels = 9, 16
    rng = np.random.default_rng(1)
    background, objectness = np.linalg.qr(rng.standard_normal((channels, 2)))[0].T
    tokens = np.tile(background, (g, g, 1)) + 0.01 * rng.standard_normal((g, g, channels))
    tokens[4, 4] = objectness
    ids = build_hierarchy(tokens, hierarchy_spec())
    expected = np.zeros((g, g), dtype=int)
    expected[4, 4] = 1
    for level in ids:
        np.testing.assert_array_equal(level, expected)
    # Two object tokens: one merge, heights all equal -> normalised 0 -> one region.
    tokens[4, 5] = objectness
    expected[4, 5] = 1
    for level in build_hierarchy(tokens, hierarchy_spec()):
        np.testing.assert_array_equal(level, expected)


def test_spec_validation():
    with pytest.raises(ValueError):
        hierarchy_spec(cuts=(0.35, 0.65))
    with pytest.raises(ValueError):
        hierarchy_spec(cuts=(1.5, 0.5), cut_mode="quantile")
    with pytest.raises(ValueError):
        hierarchy_spec(cut_mode="percentile")
    with pytest.raises(ValueError):
        hierarchy_spec(linkage="average-ish")
    with pytest.raises(ValueError):
        hierarchy_spec(k=1)
    with pytest.raises(ValueError):
        build_hierarchy(np.zeros((4, 4)), hierarchy_spec())
    hierarchy_spec(cuts=(0.5, 0.5))  # equal cuts are non-increasing
    only_level0 = build_hierarchy(random_tokens(0, 8), hierarchy_spec(cuts=()))
    assert only_level0.shape == (1, 8, 8)


def test_build_hierarchies_stacks_per_image_results_deterministically():
    batch = np.stack([random_tokens(seed, 8) for seed in range(5)]).astype(np.float32)
    spec = hierarchy_spec(seed=3)
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
    # with a bound on the ids (no compaction, no host sync): the same sums, bit for bit
    assert torch.equal(region_canvas(x, ids, bound=int(ids.max()) + 1), canvas)
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


def test_stats_standardise_per_channel_before_clustering():
    """`stats` = (mean, std): the same ids as clustering (tokens - mean) / std by hand."""
    rng = np.random.default_rng(7)
    tokens = rng.standard_normal((3, 8, 8, 16)) * rng.uniform(0.01, 30.0, 16) + rng.normal(0, 50, 16)
    mean, std = tokens.reshape(-1, 16).mean(0), tokens.reshape(-1, 16).std(0)
    spec = hierarchy_spec(seed=2)
    by_hand = build_hierarchies((tokens - mean) / std, spec)
    np.testing.assert_array_equal(build_hierarchies(tokens, spec, stats=(mean, std)), by_hand)
    np.testing.assert_array_equal(build_hierarchy(tokens[1], spec, stats=(mean, std)), by_hand[1])
    assert not np.array_equal(build_hierarchies(tokens, spec), by_hand)   # standardising mattered here
    with pytest.raises(ValueError, match="stats"):
        build_hierarchies(tokens, spec, stats=(mean[:3], std))
    with pytest.raises(ValueError, match="std"):
        build_hierarchies(tokens, spec, stats=(mean, np.zeros(16)))


def hand_made_masks() -> np.ndarray:
    """Two 4x4 images of nested ground truth [2, 3, 4, 4], voted at a 2x2 grid (patches of 2x2 pixels).

    Image 0, tokens T0 T1 / T2 T3:
      level 0: T0 all background; T1 3 object : 1 background; T2 2 : 2 (tie -> 0); T3 all object.
      level 1 (parts 4, 7, 9): T1's object pixels are parts 7, 4, 9 and one background pixel, a
        4-way tie whose plain vote (0) would leave the object: among its object pixels, 4 wins the
        tie; T3 is 7, 7, 7, 4 -> 7.
      level 2 (subparts 20, 21 of part 4; 30, 31 of part 7; 40 of part 9): T1 inside part 4 -> 21;
        T3 inside part 7: 31, 31, 30 -> 31 (its part-4 pixel, subpart 20, does not vote).
    Image 1: all object; parts 5 (left half) and 2 (right half), one subpart each.
    """
    level0 = [[0, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    level1 = [[0, 0, 0, 7], [0, 0, 4, 9], [9, 9, 7, 7], [0, 0, 7, 4]]
    level2 = [[0, 0, 0, 30], [0, 0, 21, 40], [40, 40, 31, 31], [0, 0, 30, 20]]
    halves = np.array([[5, 5, 2, 2]] * 4)
    second = [np.ones((4, 4)), halves, np.where(halves == 5, 50, 60)]
    return np.array([[level0, level1, level2], second], dtype=np.uint8)


def test_ground_truth_vote_on_a_hand_made_mask():
    from models.hierarchy.reference import ground_truth_hierarchies

    ids = ground_truth_hierarchies(hand_made_masks(), grid=2)
    assert ids.shape == (2, 3, 2, 2) and ids.dtype == np.int16
    # image 0: the majority per patch, ties to the smallest id, ids renumbered 4 -> 1, 7 -> 2 (21 -> 1, 31 -> 2)
    np.testing.assert_array_equal(ids[0, 0], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(ids[0, 1], [[0, 1], [0, 2]])
    np.testing.assert_array_equal(ids[0, 2], [[0, 1], [0, 2]])
    # image 1: numbered in raster first-appearance order, not by ground-truth id (5 -> 1, 2 -> 2)
    np.testing.assert_array_equal(ids[1, 0], [[1, 1], [1, 1]])
    np.testing.assert_array_equal(ids[1, 1], [[1, 2], [1, 2]])
    np.testing.assert_array_equal(ids[1, 2], [[1, 2], [1, 2]])
    for image in ids:
        assert_nested(image)
    # level 0 is the plain majority vote (storage.scenes.masks_to_grid, an independent implementation)
    from storage.scenes import masks_to_grid

    np.testing.assert_array_equal(ids[:, 0], masks_to_grid(hand_made_masks()[:, 0], 2))
    with pytest.raises(ValueError, match="divisible"):
        ground_truth_hierarchies(hand_made_masks(), grid=3)


def test_ground_truth_vote_nests_on_rendered_scenes():
    from models.hierarchy.reference import ground_truth_hierarchies
    from storage.scenes import masks_to_grid, render_scenes

    masks = render_scenes(range(12), seed=1, size=112)["masks"]
    for grid in (4, 8):
        ids = ground_truth_hierarchies(masks, grid)
        plain = masks_to_grid(masks, grid)
        patch = 112 // grid
        blocks = masks.reshape(12, 3, grid, patch, grid, patch)
        uniform = (blocks.min(axis=(3, 5)) == blocks.max(axis=(3, 5)))   # [N, 3, g, g]: one id in the patch
        compared = 0
        for image, votes, pure in zip(ids, plain, uniform):
            assert_nested(image)
            np.testing.assert_array_equal(image[0], votes[0])   # level 0: the plain vote
            for level in range(1, 3):   # a patch of one ground-truth id is that region's token
                if pure[level].any():
                    compared += int(pure[level].sum())
                    assert adjusted_rand_score(votes[level][pure[level]], image[level][pure[level]]) == 1.0
        assert compared > 0
