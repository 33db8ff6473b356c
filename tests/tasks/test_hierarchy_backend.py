"""hierarchy.backend: the batched torch code writes the same teacher store, region for region, as the reference."""
import numpy as np

from storage import zarr_store
from storage.config import load_config
from storage.keys import stage_keys
from storage.zarr_store import ArraySpec
from tasks.chunk_workers import hierarchy_chunk
from tasks.plan import hierarchy_spec


def write_latents(path, tokens):
    """A latent store as the encode stage leaves it: tokens plus the per-channel mean/std beside them."""
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    channel = ArraySpec((tokens.shape[-1],), "float32", ("channel",), per_sample=False)
    zarr_store.create_store(path, {"tokens": ArraySpec(tokens.shape, "float32", ("sample", "y", "x", "c")),
                                   "mean": channel, "std": channel}, len(tokens), {})
    zarr_store.write_rows(path, slice(0, len(tokens)), {"tokens": tokens})
    zarr_store.write_array(path, "mean", flat.mean(0).astype(np.float32))
    zarr_store.write_array(path, "std", flat.std(0).astype(np.float32))


def test_batched_backend_writes_matching_regions_under_its_own_key(tmp_path):
    rng = np.random.default_rng(0)
    # piecewise-constant 8x8 grids (an object with two parts on a background) plus noise
    tokens = rng.normal(0, 0.05, (6, 8, 8, 16)).astype(np.float32)
    base = rng.normal(size=(3, 16)).astype(np.float32)
    tokens[:, :, :] += base[0]
    tokens[:, 2:6, 2:4] += base[1] * 3
    tokens[:, 2:6, 4:6] += base[2] * 3
    latents = tmp_path / "latents"
    write_latents(latents, tokens)
    regions = {}
    for backend in ("reference", "batched"):
        cfg = load_config("configs/tiny.yaml", [f"hierarchy.backend={backend}"])
        store = tmp_path / f"teacher-{backend}"
        zarr_store.create_store(store, {"regions": ArraySpec((6, 3, 8, 8), "int16", ("sample", "level", "y", "x"))}, 6, {})
        hierarchy_chunk(hierarchy_spec(cfg.hierarchy), cfg.hierarchy.backend, str(latents), str(store), 0, 0, 6)
        regions[backend] = np.asarray(zarr_store.open_array(store, "regions")[:])
    assert regions["batched"].dtype == np.int16
    np.testing.assert_array_equal(regions["batched"], regions["reference"])
    assert len(np.unique(regions["reference"][:, 2])) >= 3   # background and both parts: a real hierarchy
    reference = stage_keys(load_config("configs/tiny.yaml"))
    batched = stage_keys(load_config("configs/tiny.yaml", ["hierarchy.backend=batched"]))
    assert batched.teacher != reference.teacher and batched.generators[0] != reference.generators[0]
    assert batched.latents == reference.latents   # a hierarchy change never re-encodes
