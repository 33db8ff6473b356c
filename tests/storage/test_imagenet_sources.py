"""ImageNet layouts built by the test itself: the class-folder train tree, the nested train tar and
the flat val folder with its label files. The same image must come out with the same id, label and
pixels whichever layout it is read from, and a tar chunk must be readable by index in place."""
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from storage import tarindex
from storage.config import SourceConfig
from storage.imagenet import preprocess, read_synsets, read_val_labels
from storage.sources import center_crop_resize, list_source, read_chunk

SYNSETS = ["n01440764", "n01443537", "n01484850"]
SIZE = 56          # default resize_short for the ImageNet kinds: round(56 * 256 / 224) = 64


def _image_bytes(kind: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(60 + 9 * seed, 90 - 3 * seed, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if kind == "gray":
        image = image.convert("L")
    elif kind == "cmyk":
        image = image.convert("CMYK")
    elif kind == "palette":
        image = image.convert("P")
    out = io.BytesIO()
    image.save(out, format="PNG" if kind == "palette" else "JPEG", quality=90)
    return out.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("ilsvrc")
    kinds = ["rgb", "gray", "cmyk", "palette", "rgb", "rgb", "rgb"]
    images = {}   # id -> bytes
    for index, kind in enumerate(kinds):
        synset = SYNSETS[index % 3]
        images[f"{synset}/{synset}_{1000 - 7 * index}.JPEG"] = _image_bytes(kind, index)
    images["n01443537/n01443537_broken.JPEG"] = b"\xff\xd8 not really a jpeg"
    for sample_id, data in images.items():
        (root / "train" / sample_id).parent.mkdir(parents=True, exist_ok=True)
        (root / "train" / sample_id).write_bytes(data)
    # The archive in a non-sorted order (classes reversed, members reversed): the index sorts.
    class_tars = []
    for synset in reversed(SYNSETS):
        members = [(sid.split("/")[1], data) for sid, data in reversed(images.items()) if sid.startswith(synset)]
        class_tars.append((f"{synset}.tar", _tar_bytes(members)))
    (root / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(class_tars))
    # Val: copies of three train images, flat, with both label-file forms.
    (root / "val").mkdir()
    val_sources = ["n01484850/n01484850_986.JPEG", "n01440764/n01440764_1000.JPEG", "n01443537/n01443537_993.JPEG"]
    for n, sample_id in enumerate(val_sources, start=1):
        (root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(images[sample_id])
    synset_of = [sid.split("/")[0] for sid in val_sources]
    (root / "val_map.txt").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{n:08d},{s} 1 2 3 4\n" for n, s in enumerate(synset_of, start=1)))
    devkit_order = ["n01484850", "n01440764", "n01443537"]     # devkit ids are not in sorted order
    (root / "synsets.txt").write_text("".join(f"{s} some words\n" for s in devkit_order))
    (root / "ground_truth.txt").write_text("".join(f"{devkit_order.index(s) + 1}\n" for s in synset_of))
    return root, images, val_sources


def _cfg(kind, path, **extra):
    return SourceConfig(kind=kind, path=str(path), num_images=0, image_size=SIZE, **extra)


def _read_all(cfg):
    listing = list_source(cfg)
    return listing, read_chunk(cfg, listing.ids, listing.labels, 0)


def test_folder_and_tar_give_the_same_ids_labels_and_pixels(imagenet):
    root, images, _ = imagenet
    folder_cfg = _cfg("imagefolder", root / "train", resize_short=64)
    tar_cfg = _cfg("imagenet_tar", root / "ILSVRC2012_img_train.tar", index_path=str(root / "index.parquet"))
    folder, folder_batch = _read_all(folder_cfg)
    tar, tar_batch = _read_all(tar_cfg)
    assert tar.ids == folder.ids == sorted(images, key=lambda sid: (sid.split("/")[0], sid.split("/")[1]))
    assert tar.classes == folder.classes == SYNSETS
    assert np.array_equal(tar.labels, folder.labels)
    assert list(tar.labels) == [SYNSETS.index(sid.split("/")[0]) for sid in tar.ids]
    assert np.array_equal(tar_batch["valid"], folder_batch["valid"]) and tar_batch["valid"].sum() == 7
    assert np.array_equal(tar_batch["image"], folder_batch["image"])
    broken = tar.ids.index("n01443537/n01443537_broken.JPEG")
    assert [r["path"].endswith("::n01443537/n01443537_broken.JPEG") for r in tar_batch["rejects"]] == [True]
    assert not tar_batch["valid"][broken] and tar_batch["rejects"][0]["reason"]
    # Grey, CMYK and palette files come out as 3-channel RGB; grey stays grey.
    gray = tar_batch["image"][tar.ids.index("n01443537/n01443537_993.JPEG")]
    assert np.array_equal(gray[..., 0], gray[..., 2]) and gray.std() > 5
    # The default (no resize_short) for the tar is the 256/224 protocol, i.e. 64 here.
    default_cfg = _cfg("imagenet_tar", root / "ILSVRC2012_img_train.tar", index_path=str(root / "index.parquet"))
    assert np.array_equal(read_chunk(default_cfg, tar.ids, tar.labels, 0)["image"], tar_batch["image"])


@pytest.mark.parametrize("labels", ["val_map.txt", "ground_truth.txt"])
def test_val_folder_labels_from_either_mapping_form_match_train(imagenet, labels):
    root, _, val_sources = imagenet
    extra = {"synsets_file": str(root / "synsets.txt")} if labels == "ground_truth.txt" else {}
    val, val_batch = _read_all(_cfg("imagenet_val", root / "val", labels_file=str(root / labels), **extra))
    train_cfg = _cfg("imagenet_tar", root / "ILSVRC2012_img_train.tar", index_path=str(root / "index.parquet"))
    train = list_source(train_cfg)
    assert val.ids == [f"val/ILSVRC2012_val_{n:08d}.JPEG" for n in (1, 2, 3)]
    assert val.classes == train.classes
    rows = [train.ids.index(sid) for sid in val_sources]
    assert list(val.labels) == [train.labels[r] for r in rows] == [2, 0, 1]
    train_pixels = read_chunk(train_cfg, [train.ids[r] for r in rows], train.labels[rows], rows[0])["image"]
    assert np.array_equal(val_batch["image"], train_pixels)


def test_val_label_files_are_checked(imagenet, tmp_path):
    root, _, _ = imagenet
    with pytest.raises(ValueError, match="source.synsets_file"):
        read_val_labels(root / "ground_truth.txt")
    (tmp_path / "short.txt").write_text("ILSVRC2012_val_00000001 n01484850\n")
    with pytest.raises(ValueError, match="2 images .* have no label"):
        list_source(_cfg("imagenet_val", root / "val", labels_file=str(tmp_path / "short.txt")))
    from scipy.io import savemat   # the devkit's meta.mat: leaf synsets by ILSVRC2012_ID, plus inner nodes
    entries = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i, (ident, wnid, children) in enumerate([(2, "n01440764", 0), (1, "n01484850", 0), (4, "n00001740", 2),
                                                 (3, "n01443537", 0)]):
        entries[i] = (ident, wnid, children)
    savemat(tmp_path / "meta.mat", {"synsets": entries})
    assert read_synsets(tmp_path / "meta.mat") == ["n01484850", "n01440764", "n01443537"]
    assert read_val_labels(root / "ground_truth.txt", tmp_path / "meta.mat") == read_val_labels(root / "val_map.txt")


def test_tar_chunk_is_read_by_index_in_place_and_streaming_agrees(imagenet, tmp_path):
    root, images, _ = imagenet
    tar_path = tmp_path / "train.tar"
    tar_path.write_bytes((root / "ILSVRC2012_img_train.tar").read_bytes())
    cfg = _cfg("imagenet_tar", tar_path)
    listing = list_source(cfg)                                      # builds <tar>.index.parquet beside it
    assert sorted(os.listdir(tmp_path)) == ["train.tar", "train.tar.index.parquet"]   # nothing extracted
    rows, _ = tarindex.load_index(tmp_path / "train.tar.index.parquet")
    with open(tar_path, "rb") as archive:                           # plain seeks give each file's bytes
        for row in rows.itertuples():
            assert tarindex.read_member(archive, row.class_offset, row.member_offset, row.size) == images[row.id]
    middle = read_chunk(cfg, listing.ids[3:6], listing.labels[3:6], 3)
    whole = read_chunk(cfg, listing.ids, listing.labels, 0)
    assert np.array_equal(middle["image"], whole["image"][3:6]) and middle["valid"].sum() >= 2
    assert np.array_equal(middle["valid"], whole["valid"][3:6])

    class Pipe(io.RawIOBase):   # non-seekable, as a pipe or an object-store body is
        def __init__(self, data):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            chunk = self.data.read(len(buffer))
            buffer[:len(chunk)] = chunk
            return len(chunk)

    streamed = {tarindex.sample_id(s, n): (c, m, d) for s, n, c, m, d in
                tarindex.stream_nested_tar(io.BufferedReader(Pipe(tar_path.read_bytes())))}
    assert {sid: d for sid, (_, _, d) in streamed.items()} == images
    assert {row.id: (row.class_offset, row.member_offset) for row in rows.itertuples()} == \
           {sid: (c, m) for sid, (c, m, _) in streamed.items()}
    # A changed archive is re-indexed, never read through a stale index.
    before = os.stat(tar_path).st_mtime_ns
    os.utime(tar_path, ns=(before + 10**9, before + 10**9))
    with open(tar_path, "ab") as handle:
        handle.write(b"\0" * 10240)
    tarindex.ensure_index(tar_path)
    meta = tarindex._index_meta(tmp_path / "train.tar.index.parquet")
    assert meta["tar_size"] == os.path.getsize(tar_path)


def test_resize_short_and_interpolation_are_honoured():
    pixels = np.full((128, 160, 3), 255, np.uint8)
    pixels[:8], pixels[-8:], pixels[:, :8], pixels[:, -8:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    image = Image.fromarray(pixels)
    protocol = preprocess(image, SIZE, 64)             # border (4 px after resize) falls outside the crop
    skip = preprocess(image, SIZE, SIZE)               # border kept on the short axis
    assert protocol[..., 1].min() > 200 and skip[..., 1].min() < 100
    assert np.array_equal(skip, center_crop_resize(image, SIZE))   # same as storage.sources at resize_short = size
    assert not np.array_equal(preprocess(image, SIZE, 64, "bilinear"), protocol)
    with pytest.raises(ValueError, match="resize_short"):
        SourceConfig(kind="imagefolder", path="x", image_size=56, resize_short=50)
    with pytest.raises(ValueError, match="labels_file"):
        SourceConfig(kind="imagenet_val", path="x")


def test_the_tar_index_is_written_with_the_umask_mode(tmp_path):
    from storage.tarindex import build_index

    class_tar = _tar_bytes([("n01440764_1.JPEG", b"not an image")])
    tar_path = tmp_path / "train.tar"
    tar_path.write_bytes(_tar_bytes([("n01440764.tar", class_tar)]))
    old = os.umask(0o022)
    try:
        build_index(tar_path, tmp_path / "index" / "train.parquet")
    finally:
        os.umask(old)
    assert (tmp_path / "index" / "train.parquet").stat().st_mode & 0o777 == 0o644
