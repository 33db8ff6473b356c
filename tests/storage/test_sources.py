"""The ImageNet-style class-folder source, with files the test writes itself."""
import numpy as np
from PIL import Image

from storage.config import SourceConfig
from storage.sources import center_crop_resize, list_source, read_chunk


def _write_tree(root):
    rng = np.random.default_rng(0)
    for synset in ("n02", "n01"):
        (root / synset).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, size=(75 + 10 * i, 100, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / synset / f"{synset}_{i}.JPEG", quality=90)
    Image.fromarray(np.zeros((60, 80), np.uint8), mode="L").save(root / "n01" / "gray.JPEG")
    (root / "n01" / "broken.JPEG").write_bytes(b"not a jpeg at all")
    (root / "n03").mkdir()  # empty class folder


def test_listing_numbers_classes_like_imagefolder(tmp_path):
    _write_tree(tmp_path)
    listing = list_source(SourceConfig(kind="imagefolder", path=str(tmp_path), num_images=0, image_size=56))
    assert listing.classes == ["n01", "n02", "n03"]
    assert listing.ids[0].startswith("n01/") and listing.ids[-1].startswith("n02/")
    assert list(listing.labels) == [0] * 5 + [1] * 3


def test_bad_files_become_rejects_and_the_rest_are_read(tmp_path):
    _write_tree(tmp_path)
    cfg = SourceConfig(kind="imagefolder", path=str(tmp_path), num_images=0, image_size=56)
    listing = list_source(cfg)
    batch = read_chunk(cfg, listing.ids, listing.labels, 0)
    assert batch["image"].shape == (8, 56, 56, 3)
    assert batch["valid"].sum() == 7
    assert len(batch["rejects"]) == 1 and "broken.JPEG" in batch["rejects"][0]["path"]
    assert batch["rejects"][0]["reason"]
    gray = listing.ids.index("n01/gray.JPEG")
    assert batch["valid"][gray] and (batch["image"][gray] == 0).all()


def test_center_crop_resize_keeps_the_centre():
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, 50:150] = 255          # the central square is white
    out = center_crop_resize(Image.fromarray(pixels), 28)
    assert out.shape == (28, 28, 3) and out[2:-2, 2:-2].min() > 240
