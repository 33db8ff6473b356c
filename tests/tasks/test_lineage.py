"""Issue 31: a store knows what it was built from (storage.lineage). A folder changed under a half-done
or a finished encode never gives latents mixed from two listings, `--force` of a stage makes everything
downstream stale (`tf status` says so, readers refuse, the stage rebuilds), a forced rebuild waits for the
stages reading its store or refuses, and pixels meet their latents by sample id, never by row."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.status import expected_stages, status_text
from storage import lineage, zarr_store
from storage.config import load_config
from storage.keys import Layout
from storage.latent_store import latent_store_arrays
from storage.locks import StageLocked
from tasks.encode.stage import encode_latents
from tasks.hierarchy.stage import build_teacher
from tasks.ingest.stage import ingest_images, with_stored_pixels
from tasks.train.level_data import load_latents
from tasks.stage import Done, Stage, StaleUpstream, run_stage

REPO = Path(__file__).parents[2]
TINY = REPO / "configs" / "tiny.yaml"
SYNSETS = ("n01440764", "n01443537", "n01484850")


def _photo(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 70, 3), np.uint8)).save(path, quality=90)


def _tree(root: Path, per_class: int = 4) -> Path:
    for c, synset in enumerate(SYNSETS):
        (root / synset).mkdir(parents=True)
        for i in range(per_class):
            _photo(root / synset / f"{synset}_{i:04d}.JPEG", 100 * c + i)
    return root


def _change(tree: Path) -> None:
    """The reported change: 2 images deleted, 3 added."""
    (tree / SYNSETS[0] / f"{SYNSETS[0]}_0001.JPEG").unlink()
    (tree / SYNSETS[1] / f"{SYNSETS[1]}_0002.JPEG").unlink()
    for i in range(3):
        _photo(tree / SYNSETS[2] / f"{SYNSETS[2]}_new{i}.JPEG", 999 + i)


def _cfg(tree: Path, *more: str):
    return load_config(TINY, ["source.kind=imagefolder", f"source.path={tree}", "source.num_images=0",
                              "source.image_size=56", "ingest.chunk_size=4", "encoder.dtype=float32", *more])


def _latents(root: Path, cfg) -> dict[str, np.ndarray]:
    path = Layout(root, cfg).latents()
    return {name: zarr_store.open_array(path, name)[:] for name in ("sample", "tokens", "valid", "label")}


def _rows_agree(root: Path, cfg) -> None:
    layout = Layout(root, cfg)
    assert zarr_store.open_array(layout.latents(), "sample")[:].tolist() == \
        zarr_store.open_array(layout.images(), "sample")[:].tolist()
    assert zarr_store.completion(layout.latents())["samples"] == zarr_store.open_array(layout.images(), "sample").shape[0]


def test_an_encode_resumed_after_the_folder_changed_keeps_no_chunk_of_the_old_images(tmp_path):
    tree = _tree(tmp_path / "src")
    cfg = _cfg(tree, "ingest.chunk_size=8")   # 12 samples, then 13: two chunks either way, as reported
    root = tmp_path / "root"
    ingest_images.fn(cfg, str(root))
    encode_latents.fn(cfg, str(root))
    latents = Layout(root, cfg).latents()
    # what a kill -9 mid-encode leaves: chunk 0 done, chunk 1 not, no completion marker
    (latents / "_COMPLETE").unlink()
    (latents / "_chunks" / f"{1:06d}.json").unlink()
    _change(tree)
    ingest_images.fn(cfg, str(root), True)   # as SourceChanged says: tf ingest --force ingest
    result = encode_latents.fn(cfg, str(root))
    assert result["status"] == "computed"
    _rows_agree(root, cfg)
    clean = tmp_path / "clean"   # a clean encode of the folder as it is now
    ingest_images.fn(cfg, str(clean))
    encode_latents.fn(cfg, str(clean))
    got, want = _latents(root, cfg), _latents(clean, cfg)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert "image store" in result.get("rebuilt", ""), result   # the run says why it did not resume


def test_force_and_a_changed_folder_make_downstream_stale_and_never_reused(tmp_path):
    tree = _tree(tmp_path / "src")
    cfg = _cfg(tree)
    root = tmp_path / "root"
    ingest_images.fn(cfg, str(root))
    assert encode_latents.fn(cfg, str(root))["status"] == "computed"
    assert encode_latents.fn(cfg, str(root))["status"] == "reused"

    # --force ingest over the same files: the latents were built from another build of the image store
    ingest_images.fn(cfg, str(root), True)
    states = {s["stage"]: s for s in expected_stages(root, cfg)}
    assert states["ingest"]["state"] == "up to date"
    assert states["encode"]["state"] == "stale" and "was rebuilt since" in states["encode"]["why"]
    assert "why: image store" in status_text(root, cfg)
    with pytest.raises(StaleUpstream, match=r"latent store latents-\w+ no longer fits .* Run `tf encode`"):
        build_teacher.fn(cfg, str(root))   # a reader of stale latents refuses before any work
    again = encode_latents.fn(cfg, str(root))
    assert again["status"] == "computed" and "was rebuilt since" in again["rebuilt"]
    assert {s["stage"]: s["state"] for s in expected_stages(root, cfg)}["encode"] == "up to date"

    # the reported case: the folder changed after a complete encode, then the image store was rebuilt
    before = _latents(root, cfg)
    _change(tree)
    ingest_images.fn(cfg, str(root), True)
    assert {s["stage"]: s for s in expected_stages(root, cfg)}["encode"]["state"] == "stale"
    result = encode_latents.fn(cfg, str(root))
    assert result["status"] == "computed" and "count 12 -> 13" in result["rebuilt"], result
    _rows_agree(root, cfg)
    assert len(_latents(root, cfg)["sample"]) == len(before["sample"]) + 1


def test_a_forced_rebuild_waits_for_the_stages_reading_its_store_or_refuses(tmp_path):
    tree = _tree(tmp_path / "src", per_class=2)
    cfg = _cfg(tree, "concurrency.on_locked=fail")
    root = tmp_path / "root"
    ingest_images.fn(cfg, str(root))
    images = Layout(root, cfg).images()
    probe = ("import sys\nfrom storage.locks import StageLocked, stage_lock\n"
             "try:\n    with stage_lock(sys.argv[1], 'fail'):\n        pass\n"
             "except StageLocked as error:\n    print(error)\n    sys.exit(3)\n")

    def reading_stage() -> Done:   # while a stage that reads the image store runs, nobody may write it
        done = subprocess.run([sys.executable, "-c", probe, str(images)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        return Done({}, {"writer_exit": done.returncode, "writer_said": done.stdout})

    out = tmp_path / "root" / "reader-0"
    result = run_stage(cfg, Stage("reader", "0", out, output="folder", needs=[(images, "ingest")]), False, reading_stage)
    assert result["writer_exit"] == 3, result
    assert f"images-{Layout(root, cfg).keys.images} is locked by readers PID" in result["writer_said"]
    assert lineage.read(out)["built_from"] == [lineage.identity(images)]

    # a forced ingest while a reader holds the store: refused (on_locked fail), the store left as it is
    reader = subprocess.Popen([sys.executable, "-c", "import sys\nfrom storage.locks import stage_lock\n"
                               "with stage_lock(sys.argv[1], shared=True):\n    print('READING', flush=True)\n"
                               "    sys.stdin.readline()\n", str(images)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "READING"
        build = lineage.identity(images)["build"]
        with pytest.raises(StageLocked, match=f"locked by readers PID {reader.pid}"):
            ingest_images.fn(cfg, str(root), True)
        assert lineage.identity(images)["build"] == build and zarr_store.is_complete(images)
        assert ingest_images.fn(cfg, str(root))["status"] == "reused"   # reusing needs no exclusive lock
    finally:
        reader.communicate("\n", timeout=60)
    assert ingest_images.fn(cfg, str(root), True)["status"] == "computed"   # the reader is gone: rebuilt
    assert lineage.identity(images)["build"] != build


def test_pixels_and_latents_are_paired_by_sample_id_not_by_row(tmp_path):
    tree = _tree(tmp_path / "src", per_class=3)
    cfg = _cfg(tree)
    ingest_images.fn(cfg, str(tmp_path))
    images = Layout(tmp_path, cfg).images()
    ids = zarr_store.open_array(images, "sample")[:].tolist()
    pixels = zarr_store.open_array(images, "image")[:]
    # a latent store holding the same samples in another order (each row's tokens say which sample it is)
    order = np.random.default_rng(0).permutation(len(ids))
    store = tmp_path / "latents-permuted"
    zarr_store.create_store(store, latent_store_arrays(len(ids), 1, 2, 4, "float32"), len(ids),
                            {"stage": "latents", "encoder_weights": "random-init"})
    tokens = np.repeat(order.astype(np.float32)[:, None, None, None], 2 * 2 * 4, axis=1).reshape(len(ids), 2, 2, 4)
    for name, value in (("sample", np.asarray(ids)[order]), ("tokens", tokens), ("valid", np.ones(len(ids), bool)),
                        ("label", np.zeros(len(ids), np.int64)), ("mean", np.zeros(4, np.float32)),
                        ("std", np.ones(4, np.float32))):
        zarr_store.write_array(store, name, value)
    zarr_store.write_array(store, "valid", np.arange(len(ids)) != 4)   # one latent row rejected
    latents, paired = with_stored_pixels(images, load_latents(store))
    stored_ids = zarr_store.open_array(store, "sample")[:]
    assert len(paired) == len(ids) - 1
    for row, image in zip(latents.index, paired):
        sample = stored_ids[row]
        assert np.array_equal(image, pixels[ids.index(sample)]), f"latent row {row} ({sample}) got another image"
