"""A corpus of bad and odd image files through the real ingest: each one is converted or rejected
with a reason, the run completes, and accepted + rejected = seen. Run with -s to see the table."""
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage import zarr_store
from storage.config import SourceConfig, load_config
from storage.keys import Layout
from storage.sources import read_chunk
from storage.tables import load_rejects

CONFIG = Path(__file__).parents[2] / "configs" / "tiny.yaml"
AS_ROOT = os.geteuid() == 0


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb without the memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_corpus(root: Path) -> dict[str, str]:
    """The files, and what each must become: 'accepted' or a substring of its reject reason."""
    rng = np.random.default_rng(0)
    cls, odd, empty = root / "n01", root / "n02 odd names", root / "n03_empty"
    for folder in (cls, odd, empty):
        folder.mkdir(parents=True)
    photo = rng.integers(0, 255, (90, 120, 3), np.uint8)
    Image.fromarray(photo).save(cls / "plain.JPEG", quality=92)
    full = (cls / "plain.JPEG").read_bytes()
    (cls / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    (cls / "zero.JPEG").write_bytes(b"")
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(cls / "cmyk.JPEG")          # pure red in CMYK
    gradient = np.tile(np.linspace(0, 65535, 80).astype(np.uint16), (60, 1))
    Image.fromarray(gradient).save(cls / "sixteen_bit.png")                            # mode I;16
    Image.fromarray(photo[..., 0]).save(cls / "gray.JPEG")
    palette = Image.fromarray(photo).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(cls / "palette.png", transparency=0)
    Image.fromarray(np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)]), "RGBA").save(cls / "rgba.png")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(cls / "one_pixel.png")
    (cls / "bomb.png").write_bytes(_png_claiming(20000, 20000))
    (cls / "not_an_image.JPEG").write_bytes(b"%PDF-1.4 this is not a picture" * 10)
    os.symlink("loop_b.JPEG", cls / "loop_a.JPEG")
    os.symlink("loop_a.JPEG", cls / "loop_b.JPEG")
    Image.fromarray(photo).save(cls / "unreadable.JPEG")
    os.chmod(cls / "unreadable.JPEG", 0o000)
    Image.fromarray(photo).save(odd / "with space ünïcödé 猫.JPEG")
    (empty / "notes.txt").write_text("no images here")   # not an image suffix: the folder counts as empty
    return {
        "n01/plain.JPEG": "accepted", "n01/truncated.JPEG": "truncated", "n01/zero.JPEG": "cannot identify",
        "n01/cmyk.JPEG": "accepted", "n01/sixteen_bit.png": "accepted", "n01/gray.JPEG": "accepted",
        "n01/palette.png": "accepted", "n01/rgba.png": "accepted", "n01/one_pixel.png": "minimum side",
        "n01/bomb.png": "decompression bomb", "n01/not_an_image.JPEG": "cannot identify",
        "n01/loop_a.JPEG": "symbolic links", "n01/loop_b.JPEG": "symbolic links",
        # Root reads a chmod-000 file anyway (CAP_DAC_OVERRIDE), so as root it is a normal image;
        # the PermissionError path is covered below by test_permission_error_is_a_reject.
        "n01/unreadable.JPEG": "accepted" if AS_ROOT else "PermissionError",
        "n02 odd names/with space ünïcödé 猫.JPEG": "accepted",
        "n03_empty": "empty class folder",
    }


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    from tasks.ingest.stage import ingest_images

    source, root = tmp_path_factory.mktemp("corpus"), tmp_path_factory.mktemp("root")
    expected = write_corpus(source)
    cfg = load_config(CONFIG, [f"source.kind=imagefolder", f"source.path={source}", "source.num_images=0",
                               "ingest.workers=1", "ingest.chunk_size=4"])
    result = ingest_images.fn(cfg, str(root))
    return cfg, root, source, expected, result


def outcomes(root: Path, cfg, source: Path) -> dict[str, str]:
    path = Layout(root, cfg).images()
    ids = zarr_store.open_array(path, "sample")[:]
    valid = zarr_store.open_array(path, "valid")[:]
    out = {str(i): "accepted" for i, ok in zip(ids, valid) if ok}
    for row in load_rejects(path).itertuples():
        out[str(Path(row.path).relative_to(source))] = f"rejected: {row.reason}"
    return out


@pytest.mark.slow
def test_every_file_is_converted_or_rejected_with_a_reason_and_counts_add_up(ingested):
    cfg, root, source, expected, result = ingested
    got = outcomes(root, cfg, source)
    print(f"\n{'file':<44} {'expected':<20} outcome")
    for name in sorted(expected):
        print(f"{name:<44} {expected[name]:<20} {got.get(name, 'MISSING')[:90]}")
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert want in got[name], (name, got[name])
    seen = len(expected)
    accepted = sum(v == "accepted" for v in got.values())
    print(f"seen {result['seen']}, accepted {result['accepted']}, rejected {result['rejected']}")
    assert (result["seen"], result["accepted"], result["rejected"]) == (seen, accepted, seen - accepted)
    assert result["accepted"] + result["rejected"] == result["seen"]
    done = zarr_store.completion(Layout(root, cfg).images())
    assert done["accepted"] + done["rejected"] == done["seen"] == seen


def test_converted_odd_formats_hold_the_right_pixels(ingested):
    cfg, root, _, _, _ = ingested
    path = Layout(root, cfg).images()
    ids = [str(i) for i in zarr_store.open_array(path, "sample")[:]]
    images = zarr_store.open_array(path, "image")
    labels = zarr_store.open_array(path, "label")[:]
    red = images[ids.index("n01/cmyk.JPEG")].reshape(-1, 3).mean(0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red                  # CMYK red stays red
    ramp = images[ids.index("n01/sixteen_bit.png")][..., 0]
    assert ramp.min() < 40 and ramp.max() > 215 and len(np.unique(ramp)) > 20   # scaled, not clipped at 255
    gray = images[ids.index("n01/gray.JPEG")]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    odd = ids.index("n02 odd names/with space ünïcödé 猫.JPEG")
    assert labels[odd] == 1 and images[odd].std() > 10                          # stored, with its class


def test_permission_error_is_a_reject(tmp_path, monkeypatch):
    """What a non-root reader sees on a chmod-000 file (simulated: as root the read would succeed)."""
    import storage.sources as sources

    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "a.JPEG")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "b.JPEG")
    real = sources.read_image

    def deny(path, size):
        if Path(path).name == "b.JPEG":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, size)

    monkeypatch.setattr(sources, "read_image", deny)
    cfg = SourceConfig(kind="imagefolder", path=str(tmp_path), num_images=0, image_size=28)
    batch = read_chunk(cfg, ["a.JPEG", "b.JPEG"], np.zeros(2, np.int64), 0)
    assert batch["valid"].tolist() == [True, False]
    assert batch["rejects"][0]["reason"].startswith("PermissionError: [Errno 13] Permission denied")
