import json

import numpy as np
import pytest

from storage.reference_stats import load_reference, reference_path, save_reference

INCEPTION = "inception-v3-compat:file:pt_inception-2015-12-05-6726825d.pth:0123456789ab"
DINO = "dinov2-cls:vit_small_patch14_dinov2@224:random-init:abcdef012345"


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(5, 7)).astype(np.float32)
    return {
        "features": features,
        "mu": features.astype(np.float64).mean(axis=0),
        "sigma": np.cov(features.astype(np.float64), rowvar=False),
        "ids": np.arange(5, dtype=np.int64),
    }


def test_round_trip_is_exact(tmp_path):
    store = tmp_path / "images-abc"
    arrays = _arrays()
    meta = {"n": 5, "images_key": "abc", "extractor_weights": "file:x.pth:0123"}
    path = save_reference(store, INCEPTION, arrays, meta)
    assert path == reference_path(store, INCEPTION)
    assert path.parent == store / "reference" and path.suffix == ".safetensors"
    loaded = load_reference(store, INCEPTION)
    assert loaded is not None
    got, got_meta = loaded
    assert got_meta == meta
    assert set(got) == set(arrays)
    for name, value in arrays.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        np.testing.assert_array_equal(got[name], value)


def test_sidecar_holds_label_and_meta(tmp_path):
    store = tmp_path / "images-abc"
    path = save_reference(store, DINO, _arrays(), {"n": 5})
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["extractor_label"] == DINO
    assert sidecar["meta"] == {"n": 5}
    assert sidecar["arrays"]["sigma"] == {"dtype": "float64", "shape": [7, 7]}
    # No pickle anywhere: the arrays file is safetensors (8-byte header length, then JSON).
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header_len])["mu"]["dtype"] == "F64"


def test_labels_do_not_share_files(tmp_path):
    store = tmp_path / "images-abc"
    other_weights = INCEPTION.replace("0123456789ab", "ba9876543210")
    paths = {reference_path(store, label) for label in (INCEPTION, other_weights, DINO, "dinov2:random-init")}
    assert len(paths) == 4
    assert all("/" not in p.name and ":" not in p.name for p in paths)
    save_reference(store, INCEPTION, _arrays(0), {"which": "inception"})
    assert load_reference(store, other_weights) is None
    assert load_reference(store, DINO) is None
    save_reference(store, DINO, _arrays(1), {"which": "dino"})
    assert load_reference(store, INCEPTION)[1] == {"which": "inception"}
    assert load_reference(store, DINO)[1] == {"which": "dino"}


def test_absent_reference_is_none(tmp_path):
    assert load_reference(tmp_path / "images-abc", INCEPTION) is None
    assert load_reference(tmp_path / "missing" / "images-abc", DINO) is None


def test_half_written_reference_counts_as_absent(tmp_path):
    store = tmp_path / "images-abc"
    path = save_reference(store, INCEPTION, _arrays(), {"n": 5})
    path.with_suffix(".json").unlink()  # killed between the arrays file and the sidecar
    assert path.exists()
    assert load_reference(store, INCEPTION) is None
    # A save over it completes the pair again.
    save_reference(store, INCEPTION, _arrays(2), {"n": 5})
    np.testing.assert_array_equal(load_reference(store, INCEPTION)[0]["mu"], _arrays(2)["mu"])


def test_arrays_not_matching_sidecar_count_as_absent(tmp_path):
    store = tmp_path / "images-abc"
    path = save_reference(store, INCEPTION, _arrays(0), {"n": 5})
    sidecar = path.with_suffix(".json").read_bytes()
    save_reference(store, INCEPTION, _arrays(1), {"n": 5})
    path.with_suffix(".json").write_bytes(sidecar)  # stale sidecar beside newer arrays
    assert load_reference(store, INCEPTION) is None


def test_a_reference_of_schema_version_1_is_computed_again(tmp_path):
    """Version 1 references may come from real images decoded on CUDA while the nvjpeg race (fixed at 0593437)
    could overwrite their pixels: they read as absent, whatever else matches."""
    store = tmp_path / "images-abc"
    path = save_reference(store, INCEPTION, _arrays(0), {"n": 5})
    assert load_reference(store, INCEPTION) is not None
    sidecar = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**sidecar, "schema_version": 1}))
    assert load_reference(store, INCEPTION) is None


def test_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        reference_path(tmp_path, "")
    with pytest.raises(ValueError):
        save_reference(tmp_path, INCEPTION, {}, {})
