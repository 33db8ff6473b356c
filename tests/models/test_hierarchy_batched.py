"""The batched (torch) hierarchy against the scipy / scikit-learn reference of models.hierarchy.reference:
the same region ids, token for token, on every test set."""
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from models.encoder import build_encoder, encode_images
from models.hierarchy.reference import BACKGROUND_ID, OBJECT_ID, build_hierarchies
from models.hierarchy.batched import build_hierarchies_batched, sklearn_plusplus_draws
from specs import hierarchy_spec
from storage.scenes import render_scenes


@pytest.fixture(scope="module")
def real_shaped_tokens():
    """16x16 grids of 384-d tokens: a random-init DINOv2-S/14-reg encoding scenes at 224 px."""
    encoder, _ = build_encoder("vit_small_patch14_reg4_dinov2", 224, None, allow_random_init=True, seed=0)
    images = render_scenes(range(16), seed=3, size=224)["image"]
    return encode_images(encoder.eval(), images, batch_size=8)


def _stats(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's per-channel mean / std, as the encode stage stores them beside the latents."""
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    return flat.mean(0).astype(np.float32), flat.std(0).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_store_tokens():
    """configs/tiny.yaml's latents: its first 24 scenes at 56 px, 4 x 4 tokens of a random-init encoder.
    Mirror-image halves are common on a 4 x 4 grid: 3 of these images tie between their two k-means
    clusters (7 of the store's 48)."""
    encoder, _ = build_encoder("vit_small_patch14_reg4_dinov2", 56, None, allow_random_init=True, seed=0)
    images = render_scenes(range(24), seed=0, size=56)["image"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # small matmuls on a shared 2-core machine: one thread is faster
    try:
        return encode_images(encoder.eval(), images, batch_size=24)
    finally:
        torch.set_num_threads(threads)


def assert_same_ids(tokens: np.ndarray, spec, stats=None) -> np.ndarray:
    reference = build_hierarchies(tokens, spec, stats=stats)
    batched = build_hierarchies_batched(torch.from_numpy(tokens), spec, stats=stats).numpy()
    assert batched.shape == reference.shape and batched.dtype == np.int16
    differ = np.flatnonzero((batched != reference).any(axis=(1, 2, 3)))
    assert len(differ) == 0, f"images {differ.tolist()} differ (levels {np.flatnonzero((batched != reference).any(axis=(0, 2, 3))).tolist()})"
    return reference


@pytest.mark.parametrize("spec", [hierarchy_spec(), hierarchy_spec(cuts=(0.9, 0.5, 0.1)),
                                  pytest.param(hierarchy_spec(alpha=0.5, lam=0.0, seed=7), marks=pytest.mark.slow)])
def test_batched_equals_reference_on_real_shaped_latents(real_shaped_tokens, spec):
    assert_same_ids(real_shaped_tokens, spec)


def test_batched_equals_reference_on_standardised_latents(real_shaped_tokens):
    """The teacher clusters (token - mean) / std with the dataset's per-channel stats: both backends
    take the same `stats` and give the same ids; standardising moves the partitions here."""
    reference = assert_same_ids(real_shaped_tokens, hierarchy_spec(), stats=_stats(real_shaped_tokens))
    assert not np.array_equal(reference, build_hierarchies(real_shaped_tokens, hierarchy_spec()))


def test_batched_equals_reference_on_the_tiny_store(tiny_store_tokens):
    assert_same_ids(tiny_store_tokens, hierarchy_spec(), stats=_stats(tiny_store_tokens))


@pytest.mark.parametrize("grid", [4, 6, 8])
@pytest.mark.parametrize("halves", ["rows", "columns"])
def test_a_tie_between_the_two_clusters_goes_to_the_later_one_in_both(grid, halves):
    """Two mirror-image halves are equally near the image centre on average: an exact tie. The
    reference's rule, `obj_id = 0 if d0 < d1 else 1`, makes the later cluster (scikit-learn's label 1)
    the object; both backends do, whatever order their sums round in."""
    first = np.arange(grid)[:, None] < grid // 2
    first = np.broadcast_to(first if halves == "rows" else first.T, (grid, grid))
    rng = np.random.default_rng(grid)
    a, b = rng.normal(size=(2, 8))
    tokens = np.where(first[..., None], a, b)[None] + 0.01 * rng.normal(size=(1, grid, grid, 8))
    tokens = tokens.astype(np.float32)
    spec = hierarchy_spec(cuts=(0.5,))
    unit = tokens[0].reshape(grid * grid, 8).astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    later = KMeans(n_clusters=2, n_init=1, random_state=spec.seed).fit_predict(unit) == 1
    reference = assert_same_ids(tokens, spec)
    np.testing.assert_array_equal(reference[0, 0].ravel() == OBJECT_ID, later)


def test_fixed_step_count_as_in_a_cuda_graph_gives_the_same_ids(real_shaped_tokens):
    """A CUDA graph runs T - 1 merge steps for every image; images that finish early must idle."""
    tokens = torch.from_numpy(real_shaped_tokens[:6])
    dynamic = build_hierarchies_batched(tokens, hierarchy_spec(), static_steps=False)
    fixed = build_hierarchies_batched(tokens, hierarchy_spec(), static_steps=True)
    torch.testing.assert_close(fixed, dynamic, rtol=0, atol=0)


def test_levels_nest_and_background_stays_zero(real_shaped_tokens):
    ids = build_hierarchies_batched(torch.from_numpy(real_shaped_tokens), hierarchy_spec(cuts=(0.7, 0.4, 0.2))).numpy()
    background = ids[:, 0] == BACKGROUND_ID
    for level in range(1, ids.shape[1]):
        assert (ids[:, level][background] == BACKGROUND_ID).all()
        for image in range(len(ids)):   # every finer region lies inside one coarser region
            finer, coarser = ids[image, level].ravel(), ids[image, level - 1].ravel()
            for region in np.unique(finer[finer > 0]):
                assert len(np.unique(coarser[finer == region])) == 1


def test_degenerate_images_match_reference():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(3, 4, 4, 8)).astype(np.float32)
    tokens[0] = 1.0                       # identical tokens: one object region everywhere
    tokens[1] *= 1e-6                     # tiny but distinct: normalised like any other
    spec = hierarchy_spec()
    batched = build_hierarchies_batched(torch.from_numpy(tokens), spec).numpy()
    assert (batched[0] == OBJECT_ID).all()
    np.testing.assert_array_equal(batched, build_hierarchies(tokens, spec))


def test_plusplus_draws_are_scikit_learns():
    """The first k-means++ centre the batched code takes is the one scikit-learn takes."""
    from sklearn.cluster import kmeans_plusplus

    x = np.random.default_rng(1).normal(size=(64, 5))
    _, indices = kmeans_plusplus(x, 2, random_state=4)
    first, _ = sklearn_plusplus_draws(64, 2, 4)
    assert indices[0] == first


def test_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="average linkage"):
        build_hierarchies_batched(torch.zeros(1, 2, 2, 3) + torch.arange(3.0), hierarchy_spec(linkage="complete"))


def test_device_stats_and_a_nonfinite_flag_give_the_same_ids_and_flag_nan(real_shaped_tokens):
    """What the encode pass passes to stay off the host: (mean, std) made once on the device and a device
    flag instead of the raising check. Same ids; NaN tokens set the flag instead of raising."""
    from models.hierarchy.batched import device_stats

    tokens, spec = torch.from_numpy(real_shaped_tokens[:6]), hierarchy_spec()
    channels = tokens.shape[-1]
    mean, std = np.linspace(-0.1, 0.1, channels), np.linspace(0.5, 2.0, channels)
    expected = build_hierarchies_batched(tokens, spec, stats=(mean, std))
    flag = torch.zeros((), dtype=torch.bool)
    made = device_stats((mean, std), channels, tokens.device)
    assert device_stats(made, channels, tokens.device)[0] is made[0]   # made once, passed as they are
    assert torch.equal(build_hierarchies_batched(tokens, spec, stats=made, nonfinite=flag), expected)
    assert not bool(flag)
    bad = tokens.clone()
    bad[1, 0, 0, 0] = float("nan")
    build_hierarchies_batched(bad, spec, stats=made, nonfinite=flag)
    assert bool(flag)
    with pytest.raises(ValueError, match="NaN"):
        build_hierarchies_batched(bad, spec, stats=made)
    with pytest.raises(ValueError, match="std > 0"):
        device_stats((mean, np.zeros(channels)), channels, tokens.device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the encode pass's device path (runs on the GPU machine)")
def test_the_fused_pass_hierarchy_never_waits_for_the_device(real_shaped_tokens):
    """With device statistics and a flag, a batch's hierarchy makes no synchronising call (CUDA's sync debug
    mode raises on one): the pass's thread queues the next batch while the device works on this one."""
    from models.hierarchy.batched import device_stats

    tokens, spec = torch.from_numpy(real_shaped_tokens[:6]).cuda(), hierarchy_spec()
    channels = tokens.shape[-1]
    stats = device_stats((np.zeros(channels), np.ones(channels)), channels, tokens.device)
    flag = torch.zeros((), dtype=torch.bool, device="cuda")
    warm = build_hierarchies_batched(tokens, spec, stats=stats, nonfinite=flag)   # compiles, caches the draws
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = build_hierarchies_batched(tokens, spec, stats=stats, nonfinite=flag)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(again, warm) and not bool(flag)
