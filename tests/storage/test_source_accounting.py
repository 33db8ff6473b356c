"""Issue 31: every entry under a source root ends as an image row, a reject row with its reason or a
named skipped row, and the run's counts add up to the entries on disk; reject reasons are the same
on every run (no memory addresses).

An unreadable class folder needs a process the permission bits bind: as root (which reads anything)
the ingest runs in a child whose capability bounding set lacks CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH, so it is refused a chmod-000 folder exactly as any other user is."""
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.config import SourceConfig
from storage.imagenet import sample_files
from storage.sources import list_source
from storage.tables import load_rejects
from tasks.encode.files import Preprocess
from tasks.encode.pixels import decode_pixels

REPO = Path(__file__).parents[2]
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _drop_file_capabilities() -> None:   # preexec_fn: runs in the child before exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run_bound_by_permissions(code: str) -> subprocess.CompletedProcess:
    preexec = _drop_file_capabilities if os.geteuid() == 0 else None
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec)


def _photo(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 52, 3), np.uint8)).save(path, quality=90)


def _tree(root: Path) -> Path:
    for c, synset in enumerate(("n01", "n02", "n03")):
        (root / synset).mkdir(parents=True)
        for i in range(3):
            _photo(root / synset / f"{synset}_{i}.JPEG", 10 * c + i)
    (root / "n01" / "zero.JPEG").write_bytes(b"")
    (root / "n01" / "junk.JPEG").write_bytes(b"not a picture" * 10)
    (root / "n01" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "n01" / "notes.txt").write_text("about n01")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "readme.txt").write_text("about this set")
    (root / "n09").write_text("where a class folder would be")   # a class "folder" that is a regular file
    (root / "n04_empty").mkdir()
    return root


def _entries_on_disk(root: Path) -> set[str]:
    """What must have a row, found here independently: each entry of a readable folder that is no folder,
    and each class folder that yields no file: the empty one, and the chmod-000 one (one entry: what is
    inside it cannot be listed by the ingest, whatever this process may read)."""
    out = set()
    for folder, dirs, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        if os.stat(folder).st_mode & 0o777 == 0:
            out.add(str(relative))
            dirs.clear()
            continue
        out |= {str(relative / name) for name in files}
        if folder != str(root) and not dirs and not files:
            out.add(str(relative))
    return out


@pytest.fixture
def shared_tmp(tmp_path_factory):
    """A folder the permission-bound child can reach (pytest's own tmp folders are private to root)."""
    base = tmp_path_factory.mktemp("accounting")
    for folder in [base, *base.parents]:
        if folder == Path("/tmp") or folder == Path(folder.anchor):
            break
        os.chmod(folder, os.stat(folder).st_mode | 0o755)
    yield base
    for folder in base.rglob("*"):   # let pytest clean up
        if folder.is_dir():
            os.chmod(folder, 0o755)


INGEST = """
import json
from storage.config import load_config
from tasks.ingest.stage import ingest_images
cfg = load_config(None, {overrides!r})
print(json.dumps(ingest_images.fn(cfg, "{root}", False)))
"""
SKIPPED = {".DS_Store": "not a class folder (a file at the source root)",
           "readme.txt": "not a class folder (a file at the source root)",
           "n09": "not a class folder (a file at the source root)",
           "n01/.DS_Store": "not an image file name (no suffix)",
           "n01/notes.txt": "not an image file name (suffix '.txt')"}


def _ingest(tree: Path, root: Path, bound: bool = False) -> tuple[dict, dict[str, str]]:
    """(the stage's result, reject reason by path under `tree`) of an ingest, run here or, `bound`, by a
    process the permission bits bind."""
    overrides = ["source.kind=imagefolder", f"source.path={tree}", "source.num_images=0", "source.image_size=28",
                 "ingest.chunk_size=4", "device=cpu"]
    if bound:
        done = _run_bound_by_permissions(INGEST.format(overrides=overrides, root=root))
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        from storage.config import load_config
        from tasks.ingest.stage import ingest_images

        result = ingest_images.fn(load_config(None, overrides), str(root), False)
    frame = load_rejects(result["path"])
    return result, {str(Path(p).relative_to(tree)): reason for p, reason in frame[["path", "reason"]].values}


def _check_counts(tree: Path, result: dict, rejects: dict[str, str], skipped: dict[str, str]) -> None:
    """Each entry on disk has exactly one row, and the run's counts add up to the entries."""
    entries = _entries_on_disk(tree)
    images = {str(p.relative_to(tree)) for p in tree.glob("n0*/n0*_*.JPEG") if os.access(p.parent, os.X_OK)
              and os.stat(p.parent).st_mode & 0o777}
    assert result["accepted"] == len(images)
    assert sorted([*images, *rejects, *skipped]) == sorted(entries)
    assert result["accepted"] + result["rejected"] + result["skipped"] == len(entries)
    assert result["seen"] == result["accepted"] + result["rejected"]


def test_an_unreadable_class_folder_is_a_permission_reject_not_an_empty_class(shared_tmp):
    tree = _tree(shared_tmp / "src")
    os.chmod(tree / "n02", 0o000)   # its 3 images cannot be listed: the folder is the reject
    (shared_tmp / "root").mkdir()
    result, rejects = _ingest(tree, shared_tmp / "root", bound=True)
    assert rejects["n02"].startswith("PermissionError: [Errno 13] Permission denied"), rejects["n02"]
    assert rejects["n04_empty"] == "empty class folder: no image files"
    _check_counts(tree, result, rejects, SKIPPED)


def test_every_entry_under_the_root_has_a_row_and_skipped_ones_are_named(tmp_path):
    tree = _tree(tmp_path / "src")
    result, rejects = _ingest(tree, tmp_path / "root")
    assert result["skipped"] == len(SKIPPED), result   # readme.txt, two .DS_Store, notes.txt, the file n09
    from storage.tables import load_skipped

    frame = load_skipped(result["path"])
    skipped = {str(Path(p).relative_to(tree)): reason for p, reason in frame[["path", "reason"]].values}
    assert skipped == SKIPPED
    assert set(rejects) == {"n01/zero.JPEG", "n01/junk.JPEG", "n04_empty"}
    _check_counts(tree, result, rejects, skipped)


def test_reject_reasons_are_the_same_on_every_run(tmp_path):
    tree = tmp_path / "src"
    (tree / "n01").mkdir(parents=True)
    _photo(tree / "n01" / "good.JPEG", 0)
    (tree / "n01" / "zero.JPEG").write_bytes(b"")
    (tree / "n01" / "junk.JPEG").write_bytes(b"%PDF-1.4 not a picture" * 10)
    source = SourceConfig(kind="imagefolder", path=str(tree), num_images=0, image_size=28)
    listing = list_source(source)
    files = sample_files(source, listing.ids)

    def reasons():   # the encoder's reader (direct path), which the image store's pixel sample shares
        _, ok, rejects = decode_pixels(files, 0, len(files), Preprocess(28, 28), readers=2)
        assert ok.tolist() == [True, False, False]   # good, junk, zero (listing order)
        return [(Path(r["path"]).name, r["reason"]) for r in rejects]

    first, second = reasons(), reasons()
    assert first == second
    assert first == [("junk.JPEG", "UnidentifiedImageError: cannot identify image file"),
                     ("zero.JPEG", "UnidentifiedImageError: cannot identify image file")]
