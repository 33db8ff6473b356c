"""The hierarchy stage: it clusters the standardised latents (checked against the rule written out with
scikit-learn / scipy), and hierarchy.source=ground_truth builds the scenes' oracle teacher in the same format."""
from pathlib import Path

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import cdist, squareform
from sklearn.cluster import KMeans

from storage import zarr_store
from storage.config import load_config
from storage.keys import Layout
from storage.scenes import masks_to_grid
from storage.zarr_store import ArraySpec

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def in_process_chunks(monkeypatch):
    """The stages' chunks run here instead of on a local Dask cluster, whose start costs more than this
    work on a shared 2-core box (the Dask path itself is covered by tests/flows and test_dask_scaleout)."""
    def run_here(fn, chunk_args, **_):
        return [fn(*args) for args in chunk_args]

    import tasks.hierarchy.stage
    import tasks.ingest.stage

    monkeypatch.setattr(tasks.hierarchy.stage, "run_chunks", run_here)
    monkeypatch.setattr(tasks.ingest.stage, "run_chunks", run_here)


def canonical(ids: np.ndarray) -> np.ndarray:
    """Background 0; object ids 1..k in raster first-appearance order."""
    out = np.zeros_like(ids)
    for new, old in enumerate(dict.fromkeys(ids[ids > 0].tolist()), start=1):
        out[ids == old] = new
    return out


def written_out_hierarchy(tokens: np.ndarray, mean: np.ndarray, std: np.ndarray, standardise: bool = True,
                          lam: float = 0.2, cuts=(0.65, 0.35), seed: int = 0) -> np.ndarray:
    """DESIGN section 3 written out for one [g, g, C] image: standardise with the stored mean/std, k-means
    (k=2, one init, fixed seed) on L2-normalised tokens, the object is the cluster nearer the centre;
    average linkage of the object tokens on (1 - cos) + lam * coordinate distance, heights min-max
    normalised, cut by height."""
    g = tokens.shape[0]
    x = tokens.reshape(g * g, -1).astype(np.float64)
    if standardise:
        x = (x - mean.astype(np.float64)) / std.astype(np.float64)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    coords = np.stack(np.indices((g, g)), -1).reshape(-1, 2) / (g - 1)
    labels = KMeans(n_clusters=2, n_init=1, random_state=seed).fit_predict(unit)
    to_centre = np.linalg.norm(coords - 0.5, axis=1)
    is_object = labels == np.argmin([to_centre[labels == c].mean() for c in (0, 1)])
    distances = cdist(unit[is_object], unit[is_object], "cosine") + lam * cdist(coords[is_object], coords[is_object])
    tree = linkage(squareform(distances, checks=False), method="average")
    heights, span = tree[:, 2], np.ptp(tree[:, 2])
    tree[:, 2] = (heights - heights.min()) / span if span > 0 else 0.0   # equal heights: no scale, all 0
    levels = [is_object.astype(np.int64)]
    for cut in cuts:
        level = np.zeros(g * g, np.int64)
        level[is_object] = fcluster(tree, cut, criterion="distance")
        levels.append(canonical(level))
    return np.stack(levels).reshape(len(levels), g, g)


def loud_and_quiet_latents(num: int = 4, g: int = 8, seed: int = 0) -> np.ndarray:
    """[num, g, g, 8] tokens whose channels differ in scale by 10^4: channels 0-1 are loud noise
    (mean 100, std 50), channels 2-7 carry a planted object (central square, top and bottom parts)
    at a scale of 0.01. Raw, the loud noise decides the clustering; standardised, the structure does."""
    rng = np.random.default_rng(seed)
    region = np.zeros((g, g), int)
    region[2:4, 2:6], region[4:6, 2:6] = 1, 2
    patterns = np.linalg.qr(rng.standard_normal((6, 6)))[0][:3]   # background, top part, bottom part
    tokens = np.empty((num, g, g, 8))
    tokens[..., :2] = 100 + 50 * rng.standard_normal((num, g, g, 2))
    tokens[..., 2:] = 0.01 * (patterns[region] + 0.15 * rng.standard_normal((num, g, g, 6)))
    return tokens.astype(np.float32)


def write_latent_store(path: Path, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A complete latent store as the encode stage leaves it (tokens, samples, dataset mean/std)."""
    num, channels = len(tokens), tokens.shape[-1]
    flat = tokens.reshape(-1, channels).astype(np.float64)
    channel = ArraySpec((channels,), np.float32, ("channel",), per_sample=False)
    arrays = {"sample": ArraySpec((num,), str, ("sample",), fill_value=""),
              "tokens": ArraySpec(tokens.shape, np.float32, ("sample", "gy", "gx", "channel")),
              "mean": channel, "std": channel}
    zarr_store.create_store(path, arrays, num, {"stage": "latents", "encoder_weights": "random-init"})
    zarr_store.write_array(path, "sample", np.array([f"s{i}" for i in range(num)]))
    zarr_store.write_rows(path, slice(0, num), {"tokens": tokens})
    zarr_store.write_array(path, "mean", flat.mean(0).astype(np.float32))
    zarr_store.write_array(path, "std", flat.std(0).astype(np.float32))
    zarr_store.mark_complete(path, {"samples": num})
    return zarr_store.open_array(path, "mean")[:], zarr_store.open_array(path, "std")[:]


def test_teacher_clusters_the_standardised_latents_as_written_out(tmp_path):
    from tasks.hierarchy.stage import build_teacher

    cfg = load_config(CONFIG)
    layout = Layout(tmp_path, cfg)
    tokens = loud_and_quiet_latents()
    mean, std = write_latent_store(layout.latents(), tokens)
    assert std.max() / std.min() > 1e3   # channels of very different scales

    result = build_teacher.fn(cfg, str(tmp_path))
    assert result["status"] == "computed"
    regions = zarr_store.open_array(layout.teacher(), "regions")[:]
    attrs = zarr_store.store_attrs(layout.teacher())
    assert attrs["hierarchy_input"] == "standardised latents (per-channel dataset mean/std)"
    assert attrs["encoder_output"] == "final norm without affine"
    moved = 0
    for image, ids in zip(tokens, regions):
        np.testing.assert_array_equal(ids, written_out_hierarchy(image, mean, std))
        moved += not np.array_equal(ids, written_out_hierarchy(image, mean, std, standardise=False))
    assert moved == len(tokens)   # on raw tokens the loud channels would have given other partitions


def assert_nested(ids: np.ndarray) -> None:
    """[levels, g, g]: one background at every level, and every finer region inside one coarser region."""
    for level in range(1, len(ids)):
        np.testing.assert_array_equal(ids[level] == 0, ids[0] == 0)
        for region in np.unique(ids[level][ids[level] > 0]):
            assert len(np.unique(ids[level - 1][ids[level] == region])) == 1


def test_ground_truth_teacher_end_to_end_beside_the_clustered_one(tmp_path):
    """`tf hierarchy --config configs/tiny.yaml --set hierarchy.source=ground_truth`, through the stage task."""
    from models.hierarchy.reference import ground_truth_hierarchies
    from tasks.encode.stage import encode_latents
    from tasks.hierarchy.stage import build_teacher
    from tasks.ingest.stage import ingest_images

    oracle = load_config(CONFIG, ["hierarchy.source=ground_truth"])
    clustered = load_config(CONFIG)
    root = str(tmp_path)
    ingest_images.fn(oracle, root)
    encode_latents.fn(oracle, root)
    result = build_teacher.fn(oracle, root)
    layout = Layout(root, oracle)
    assert result["status"] == "computed" and result["key"] == layout.keys.teacher
    assert zarr_store.is_complete(layout.teacher())

    grid = oracle.source.image_size // 14
    masks = zarr_store.open_array(layout.images(), "masks")[:]
    regions = zarr_store.open_array(layout.teacher(), "regions")[:]
    assert regions.shape == (oracle.source.num_images, 3, grid, grid) and regions.dtype == np.int16
    np.testing.assert_array_equal(regions, ground_truth_hierarchies(masks, grid))
    np.testing.assert_array_equal(regions[:, 0], masks_to_grid(masks[:, 0], grid))   # level 0: the plain vote
    for ids in regions:
        assert_nested(ids)
        for level in ids:
            np.testing.assert_array_equal(level, canonical(level))
    assert (regions[:, 2].max(axis=(1, 2)) > 1).any()   # parts and subparts, not only the object
    attrs = zarr_store.store_attrs(layout.teacher())
    assert attrs["hierarchy_input"] == "ground-truth masks (majority vote per token, nested)"
    assert attrs["hierarchy"]["source"] == "ground_truth" and attrs["partition_keys"] == list(layout.keys.partitions)

    # The clustered teacher of the same latents sits beside it, in the same format.
    build_teacher.fn(clustered, root)
    other = Layout(root, clustered)
    assert other.latents() == layout.latents() and other.teacher() != layout.teacher()
    oracle_store, clustered_store = (zarr_store.open_dataset(p) for p in (layout.teacher(), other.teacher()))
    assert set(oracle_store.variables) == set(clustered_store.variables)
    for name in clustered_store.variables:
        assert oracle_store[name].dims == clustered_store[name].dims, name
        assert oracle_store[name].dtype == clustered_store[name].dtype, name
        assert oracle_store[name].shape == clustered_store[name].shape, name
    np.testing.assert_array_equal(oracle_store["sample"].values, clustered_store["sample"].values)
    assert build_teacher.fn(oracle, root)["status"] == "reused"


def test_ground_truth_teacher_refuses_a_store_without_enough_levels(tmp_path):
    """The number of ground-truth levels must be the hierarchy's partition level count (checked on the store)."""
    from tasks.hierarchy.stage import _check_ground_truth

    images = tmp_path / "images"
    zarr_store.create_store(images, {"masks": ArraySpec((2, 2, 28, 28), np.uint8, ("sample", "gt_level", "y", "x"))},
                            2, {})
    zarr_store.mark_complete(images, {})
    with pytest.raises(ValueError, match=r"2 ground-truth levels .* 3 partition levels"):
        _check_ground_truth(images, tmp_path / "latents", 3, [0.65, 0.35])
