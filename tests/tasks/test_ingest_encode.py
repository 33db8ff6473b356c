"""Ingest from an ImageNet-style folder through Dask, then encode with a weights file in timm's format."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from storage import zarr_store
from storage.config import load_config
from storage.keys import Layout
from storage.tables import load_rejects


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for synset in ("n01440764", "n01443537"):
        (root / synset).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 255, size=(60 + 7 * i, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / synset / f"{synset}_{i}.JPEG", quality=85)
    (root / "n01443537" / "truncated.JPEG").write_bytes((root / "n01440764" / "n01440764_0.JPEG").read_bytes()[:200])
    return root


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(3)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, num_classes=0)
    path = tmp_path_factory.mktemp("weights") / "dinov2_s14_reg.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _config(tree, weights, allow_random=False):
    return load_config(None, [f"source.kind=imagefolder", f"source.path={tree}", "source.num_images=0",
                              "source.image_size=56", "ingest.chunk_size=4", "device=cpu",
                              f"encoder.weights={weights}", f"encoder.allow_random_init={str(allow_random).lower()}"])


def test_ingest_rejects_bad_files_and_resumes_only_unfinished_chunks(imagenet_tree, weights_file, tmp_path):
    from tasks.ingest.stage import ingest_images

    cfg = _config(imagenet_tree, weights_file)
    result = ingest_images.fn(cfg, str(tmp_path))
    path = Layout(tmp_path, cfg).images()
    assert result["accepted"] == 10 and result["rejected"] == 1
    rejects = load_rejects(path)
    assert list(rejects.path.str.endswith("truncated.JPEG")) == [True] and rejects.reason.iloc[0]
    ds = zarr_store.open_dataset(path)
    assert len(set(ds["sample"].values)) == 11                      # every sample exactly once
    assert ds["valid"].values.sum() == 10
    assert list(ds["label"].values) == [0] * 5 + [1] * 6

    # Simulate a killed run: chunk 1 lost its marker and the store its completion.
    before = ds["image"].values.copy()
    (path / "_COMPLETE").unlink()
    (path / "_chunks" / "000001.json").unlink()
    zarr_store.write_rows(path, slice(4, 8), {"image": np.zeros((4, 56, 56, 3), np.uint8)})
    assert zarr_store.pending_chunks(path, 3) == [1]
    again = ingest_images.fn(cfg, str(tmp_path))
    assert again["status"] == "computed"
    assert np.array_equal(zarr_store.open_dataset(path)["image"].values, before)


def test_encode_loads_a_timm_weights_file_through_the_real_path(imagenet_tree, weights_file, tmp_path):
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    cfg = _config(imagenet_tree, weights_file)
    ingest_images.fn(cfg, str(tmp_path))
    result = encode_latents.fn(cfg, str(tmp_path))
    assert result["encoder_weights"].startswith("file:dinov2_s14_reg.safetensors:")
    ds = zarr_store.open_dataset(Layout(tmp_path, cfg).latents())
    assert ds.attrs["encoder_weights"] == result["encoder_weights"]
    tokens = ds["tokens"].values.astype(np.float32)
    valid = ds["valid"].values
    assert tokens.shape == (11, 4, 4, 384) and not tokens[~valid].any()
    flat = tokens[valid].reshape(-1, 384).astype(np.float64)
    np.testing.assert_allclose(ds["mean"].values, flat.mean(0), rtol=1e-3, atol=1e-3)


def test_missing_weights_without_random_init_fail_with_how_to(imagenet_tree, tmp_path):
    from models.encoder import MissingWeightsError
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    cfg = _config(imagenet_tree, tmp_path / "absent.safetensors")
    ingest_images.fn(cfg, str(tmp_path))
    with pytest.raises(MissingWeightsError, match="allow_random_init"):
        encode_latents.fn(cfg, str(tmp_path))
