"""Ingest never mixes up files (issue 17): a store is resumed or reused only for the files it was
listed from, and only regular files are ever opened."""
import contextlib
import hashlib
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage import zarr_store
from storage.config import SourceConfig, load_config
from storage.keys import Layout
from storage.sources import SourceChanged, list_source, read_chunk, read_image
from storage.tables import load_rejects
from tasks.ingest.stage import ingest_images

SIZE = 28   # a multiple of the encoder patch (14), as the config demands


def _finishes(work, fifo: Path, timeout: float = 60.0):
    """work(), failing instead of hanging the suite if it blocks on `fifo` (opening a FIFO for reading
    waits for a writer). On a timeout the FIFO gets a writer that closes at once, so the blocked reader
    sees end-of-file and the run (and its Dask workers) can end before the test fails."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = work()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for _ in range(60):
            with contextlib.suppress(OSError):   # ENXIO while no reader has it open
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(1.0)
            if not thread.is_alive():
                break
        pytest.fail(f"blocked for {timeout:.0f}s: a non-regular file ({fifo.name}) was opened")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _image(path: Path, seed: int, height: int = 40) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(height, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _tree(root: Path) -> Path:
    for label, synset in enumerate(("n01", "n02")):
        (root / synset).mkdir(parents=True)
        for i in range(5):
            _image(root / synset / f"{synset}_{i}.JPEG", seed=10 * label + i, height=36 + 3 * i)
    return root


def _cfg(tree: Path):
    # The full-pixel ingest (Dask workers, PIL), whose every slot these tests re-decode; the listing checks
    # are the same code for the direct path's listing-only ingest (tests/tasks/test_encode_files.py).
    return load_config(None, ["source.kind=imagefolder", f"source.path={tree}", "source.num_images=0",
                              f"source.image_size={SIZE}", "ingest.chunk_size=4", "ingest.workers=1", "device=cpu",
                              "encoder.read_from=image_store"])


def _snapshot(store: Path) -> dict[str, str]:
    """Every file of the store and a hash of its bytes: any write shows."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


def _refused(cfg, root, store: Path, *named: str) -> str:
    before = _snapshot(store)
    with pytest.raises(SourceChanged) as error:
        ingest_images.fn(cfg, str(root), False)
    message = str(error.value)
    assert "tf ingest --force ingest" in message
    for name in named:
        assert name in message
    assert _snapshot(store) == before   # refused before any write
    return message


def _check_every_slot(store: Path, tree: Path) -> None:
    """Each valid slot holds the pixels of the file its id names, and that file's class label."""
    ds = zarr_store.open_dataset(store)
    ids, valid = ds["sample"].values, ds["valid"].values
    assert sorted(ids) == sorted(str(p.relative_to(tree)) for p in tree.rglob("*.JPEG"))
    classes = sorted(d.name for d in tree.iterdir() if d.is_dir())
    for slot, sample_id in enumerate(ids):
        assert valid[slot]
        assert np.array_equal(ds["image"].values[slot], read_image(tree / sample_id, SIZE)), sample_id
        assert ds["label"].values[slot] == classes.index(sample_id.split("/")[0])


def test_a_changed_folder_is_refused_and_a_restored_one_reused(tmp_path):
    tree = _tree(tmp_path / "tree")
    cfg = _cfg(tree)
    first = ingest_images.fn(cfg, str(tmp_path), False)
    store = Layout(tmp_path, cfg).images()
    assert first["status"] == "computed" and first["accepted"] == 10
    assert ingest_images.fn(cfg, str(tmp_path), False)["status"] == "reused"   # (d) the same folder: reused

    added = tree / "n02" / "n02_new.JPEG"
    _image(added, seed=99)
    message = _refused(cfg, tmp_path, store, "1 added", "n02/n02_new.JPEG")
    assert "complete image store" in message
    added.unlink()

    victim = tree / "n01" / "n01_2.JPEG"
    data, info = victim.read_bytes(), victim.stat()
    victim.unlink()
    _refused(cfg, tmp_path, store, "1 removed", "n01/n01_2.JPEG")
    victim.write_bytes(data)
    os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns))

    _image(victim, seed=77, height=90)   # new content, another size
    message = _refused(cfg, tmp_path, store, "1 changed", "n01/n01_2.JPEG", f"size {info.st_size} ->")
    victim.write_bytes(data)
    os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns))

    assert ingest_images.fn(cfg, str(tmp_path), False)["status"] == "reused"   # restored: the store is good again


def test_an_interrupted_store_is_not_resumed_on_other_files_and_force_rebuilds(tmp_path):
    tree = _tree(tmp_path / "tree")
    cfg = _cfg(tree)
    ingest_images.fn(cfg, str(tmp_path), False)
    store = Layout(tmp_path, cfg).images()
    # A killed run: chunks 1 and 2 never finished, the store never completed.
    (store / "_COMPLETE").unlink()
    for chunk in (1, 2):
        (store / "_chunks" / f"{chunk:06d}.json").unlink()
    assert zarr_store.pending_chunks(store, 3) == [1, 2]
    # The reported fault: one file deleted, one added in another class, same count (a silent mix before).
    (tree / "n01" / "n01_1.JPEG").unlink()
    _image(tree / "n02" / "n02_0a.JPEG", seed=55)
    message = _refused(cfg, tmp_path, store, "1 added", "1 removed", "n02/n02_0a.JPEG", "n01/n01_1.JPEG")
    assert "unfinished image store" in message

    rebuilt = ingest_images.fn(cfg, str(tmp_path), True)
    assert rebuilt["status"] == "computed" and rebuilt["accepted"] == 10 and rebuilt["rejected"] == 0
    _check_every_slot(store, tree)
    assert ingest_images.fn(cfg, str(tmp_path), False)["status"] == "reused"


def test_fifo_socket_and_broken_link_are_rejects_never_opened(tmp_path, monkeypatch):
    tree = _tree(tmp_path / "tree")
    folder = tree / "n01"
    os.mkfifo(folder / "pipe.JPEG")
    monkeypatch.chdir(folder)   # bind a relative name: a socket path is limited to ~108 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.JPEG")
    os.symlink(folder / "absent.JPEG", folder / "dangling.JPEG")
    (folder / "README.txt").write_text("not an image")
    cfg = _cfg(tree)
    result = _finishes(lambda: ingest_images.fn(cfg, str(tmp_path), False), folder / "pipe.JPEG")
    assert (result["accepted"], result["rejected"], result["seen"], result["skipped"]) == (10, 3, 13, 1)
    rejects = load_rejects(Layout(tmp_path, cfg).images()).set_index("path")["reason"]
    assert rejects[str(folder / "pipe.JPEG")] == "not a regular file (fifo)"
    assert rejects[str(folder / "sock.JPEG")] == "not a regular file (socket)"
    assert rejects[str(folder / "dangling.JPEG")] == "not a regular file (broken symlink)"
    assert ingest_images.fn(cfg, str(tmp_path), False)["status"] == "reused"


def test_a_file_vanished_or_swapped_for_a_fifo_after_listing_is_a_reject(tmp_path):
    tree = _tree(tmp_path / "tree")
    source = SourceConfig(kind="imagefolder", path=str(tree), num_images=0, image_size=SIZE)
    listing = list_source(source)
    (tree / "n01" / "n01_0.JPEG").unlink()
    (tree / "n01" / "n01_1.JPEG").unlink()
    os.mkfifo(tree / "n01" / "n01_1.JPEG")   # the read itself refuses it: it would block open() forever
    batch = _finishes(lambda: read_chunk(source, listing.ids, listing.labels, 0), tree / "n01" / "n01_1.JPEG")
    assert batch["valid"].tolist() == [False, False] + [True] * 8
    reasons = {Path(r["path"]).name: r["reason"] for r in batch["rejects"]}
    assert reasons["n01_0.JPEG"].startswith("FileNotFoundError")
    assert reasons["n01_1.JPEG"] == "BadImage: not a regular file (fifo)"


def test_fingerprints_are_stable_and_see_size_mtime_and_scenes_config(tmp_path):
    tree = _tree(tmp_path / "tree")
    source = SourceConfig(kind="imagefolder", path=str(tree), num_images=0, image_size=SIZE)
    first = list_source(source).fingerprint
    assert list_source(source).fingerprint == first
    target = tree / "n02" / "n02_3.JPEG"
    info = target.stat()
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns + 1))   # touched, same bytes: might differ
    assert list_source(source).fingerprint != first
    scenes = SourceConfig(kind="scenes", num_images=16, image_size=SIZE, seed=1)
    assert list_source(scenes).fingerprint == list_source(scenes).fingerprint
    assert list_source(scenes).fingerprint != list_source(scenes.model_copy(update={"seed": 2})).fingerprint
