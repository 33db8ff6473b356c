"""The check after the encode pass (tasks.encode.verify): a sample of the stored latents encoded again the plain
way. A pass that stored wrong latents (here made wrong on purpose, as a GPU race once made them) fails the stage
naming the images, and neither the latent store nor a fused teacher store is marked complete."""
import io

import numpy as np
import pytest
from PIL import Image

from storage import zarr_store
from storage.config import load_config
from storage.keys import Layout
from tasks.encode.verify import VERIFY_TOLERANCE, relative_errors

TINY = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(5)
    for synset in ("n01", "n02"):
        (root / synset).mkdir()
        for i in range(5):
            out = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (56 + 4 * i, 70, 3), np.uint8)).save(out, format="JPEG", quality=90)
            (root / synset / f"{synset}_{i}.JPEG").write_bytes(out.getvalue())
    return root


def _cfg(tree, *more):
    return load_config(TINY, ["source.kind=imagefolder", f"source.path={tree}", "source.num_images=0",
                              "source.image_size=56", "ingest.chunk_size=4", "encoder.batch_size=4", *more])


def test_relative_errors_are_each_images_l2_distance_over_its_norm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4, 4, 8)).astype(np.float32), rng.normal(size=(3, 4, 4, 8)).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    expected = [np.sqrt(((a64[i] - b64[i]) ** 2).sum() / (b64[i] ** 2).sum()) for i in range(3)]
    np.testing.assert_allclose(relative_errors(a, b), expected, rtol=1e-9)
    assert relative_errors(b, b).max() == 0.0


@pytest.mark.parametrize("read_from", ["files", "image_store"])
def test_a_faithful_pass_is_verified_on_a_spread_sample(tree, tmp_path, read_from):
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    cfg = _cfg(tree, f"encoder.read_from={read_from}", "encoder.verify_images=6")
    ingest_images.fn(cfg, str(tmp_path))
    verified = encode_latents.fn(cfg, str(tmp_path))["verified"]
    assert verified["status"] == "passed" and verified["images"] == 6 and verified["tolerance"] == VERIFY_TOLERANCE
    assert verified["max_relative_error"] < 0.01   # float16 storage of float32 tokens: about 1e-4


@pytest.mark.parametrize("fused", [False, True])
def test_a_pass_that_stores_wrong_latents_fails_naming_them_and_completes_nothing(tree, tmp_path, monkeypatch,
                                                                                  fused):
    """One batch of the pass encodes its images mirrored (finite, plausible, wrong: what pixels overwritten
    by queued GPU work give). The chunks still get their markers, as the pass cannot tell."""
    import tasks.encode.files as files
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    more = ["encoder.stats_images=10", "hierarchy.backend=batched"] if fused else []
    cfg = _cfg(tree, "encoder.read_from=files", "encoder.verify_images=10", *more)
    root = str(tmp_path)
    ingest_images.fn(cfg, root)
    calls, real_encode = [], files.encode_tensor

    def encode_tensor(model, images01):
        calls.append(len(images01))
        wrong = len(calls) == (5 if fused else 2)   # fused: after the statistics pass's three batches
        return real_encode(model, images01.flip(-1) if wrong else images01)

    monkeypatch.setattr(files, "encode_tensor", encode_tensor)
    with pytest.raises(RuntimeError, match=r"4 of 10 images encoded again differ .* --force encode") as raised:
        encode_latents.fn(cfg, root, with_teacher=fused)
    layout = Layout(root, cfg)
    ids = zarr_store.open_array(layout.latents(), "sample")[:]
    named = str(raised.value)
    assert sum(str(i) in named for i in ids) == 4   # the four images of the mirrored batch, no other
    assert not zarr_store.is_complete(layout.latents())
    if fused:
        assert not zarr_store.is_complete(layout.teacher())


def test_the_files_sample_is_encoded_beside_the_pass_and_compared_after_it(tree, tmp_path):
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    cfg = _cfg(tree, "encoder.read_from=files", "encoder.verify_images=6")
    ingest_images.fn(cfg, str(tmp_path))
    verified = encode_latents.fn(cfg, str(tmp_path))["verified"]
    assert verified["status"] == "passed" and verified["images"] == 6
    assert verified["encoded_beside_pass_s"] > 0   # the plain encoding ran in its thread, not after the pass


def test_a_file_the_pass_rejects_is_left_out_of_the_sample(tree, tmp_path):
    """The sample is drawn before the pass knows its rejects: a row the pass rejected is not compared."""
    import shutil

    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    broken = tmp_path / "tree"
    shutil.copytree(tree, broken)
    (broken / "n01" / "n01_2.JPEG").write_bytes(b"\xff\xd8 not a JPEG")
    cfg = _cfg(broken, "encoder.read_from=files", "encoder.verify_images=10")
    root = str(tmp_path / "root")
    ingest_images.fn(cfg, root)
    out = encode_latents.fn(cfg, root)
    assert out["rejected"] == 1
    assert out["verified"]["status"] == "passed" and out["verified"]["images"] == 9


def test_a_file_that_no_longer_decodes_after_the_pass_fails_the_check(tree, tmp_path, monkeypatch):
    """The pass decoded every file; the plain way then cannot decode one (as a file replaced meanwhile): the
    stage fails naming it and marks nothing complete."""
    import tasks.encode.verify as verify
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    real = verify.prepare_batch

    def prepare_batch(datas, files, first_slot, *args, **kwargs):
        return real([b"\xff\xd8 not a JPEG" if first_slot + i == 1 else d for i, d in enumerate(datas)], files,
                    first_slot, *args, **kwargs)

    monkeypatch.setattr(verify, "prepare_batch", prepare_batch)
    cfg = _cfg(tree, "encoder.read_from=files", "encoder.verify_images=10")
    root = str(tmp_path)
    ingest_images.fn(cfg, root)
    with pytest.raises(RuntimeError, match="decoded in the encode pass but not now"):
        encode_latents.fn(cfg, root)
    assert not zarr_store.is_complete(Layout(root, cfg).latents())
