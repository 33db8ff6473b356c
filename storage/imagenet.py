"""ImageNet (ILSVRC2012) sources and preprocessing.

Three layouts give the same samples for the same images: same ids, labels and pixels.
  - `imagefolder` (storage/sources.py): the extracted train tree <root>/<synset>/<file>.JPEG.
  - `imagenet_tar`: the official nested ILSVRC2012_img_train.tar read in place through a Parquet
    index (storage/tarindex.py); nothing is extracted.
  - `imagenet_val`: the flat validation folder <root>/ILSVRC2012_val_00000001.JPEG ... with labels
    from `source.labels_file` (forms in `read_val_labels`).
Ids: "<synset>/<file name>" for train (the path relative to the train root, which is what
`imagefolder` already uses), "val/<file name>" for val. Class indices are the sorted synsets,
as torchvision's ImageFolder numbers them, in every layout.

Preprocessing: convert to 8-bit RGB (greyscale, CMYK, palette, 16-bit through storage.sources.to_rgb),
resize the short side to `source.resize_short` (bicubic or bilinear, antialiased), centre-crop
to `source.image_size`. resize_short defaults to round(image_size * 256 / 224) for the ImageNet
kinds (the usual eval protocol: 256 for 224) and to image_size for `imagefolder` (its historical
behaviour); set it explicitly, as configs/imagenet.yaml does, to get the same pixels from every kind.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image

from storage import tarindex
from storage.sources import (IMAGE_SUFFIXES, SourceListing, check_size, file_status, folder_listing, is_dir,
                             open_regular, reject_reason, skip_reason, to_rgb)

if TYPE_CHECKING:   # annotations only: the GPU bench imports this module without pydantic
    from storage.config import SourceConfig

IMAGENET_KINDS = ("imagenet_val", "imagenet_tar")
RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
VAL_PREFIX = "val/"
_SYNSET = re.compile(r"^n\d{8}$")


# --- preprocessing --------------------------------------------------------------------------

def resize_short_side(cfg: SourceConfig) -> int:
    if cfg.resize_short:
        return cfg.resize_short
    return cfg.image_size if cfg.kind == "imagefolder" else round(cfg.image_size * 256 / 224)


def handles(cfg: SourceConfig) -> bool:
    """Whether this module reads `cfg`'s chunks: the ImageNet kinds, and `imagefolder` when its
    preprocessing differs from storage.sources' (short side = image_size, bicubic)."""
    if cfg.kind in IMAGENET_KINDS:
        return True
    return cfg.kind == "imagefolder" and (resize_short_side(cfg) != cfg.image_size or cfg.interpolation != "bicubic")


def preprocess(image: Image.Image, size: int, resize_short: int, interpolation: str = "bicubic") -> np.ndarray:
    """RGB, short side to `resize_short`, centre crop `size` x `size`, uint8 [size, size, 3].
    With resize_short == size and bicubic this is exactly storage.sources.center_crop_resize."""
    image = to_rgb(image)
    width, height = image.size
    scale = resize_short / min(width, height)
    new_w, new_h = max(resize_short, round(width * scale)), max(resize_short, round(height * scale))
    image = image.resize((new_w, new_h), RESAMPLE[interpolation], reducing_gap=None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode(source, cfg: SourceConfig) -> np.ndarray:
    """A file path or file object -> preprocessed pixels, with storage.sources' size guards."""
    with Image.open(source) as image:
        check_size(image)
        image.load()
        return preprocess(image, cfg.image_size, resize_short_side(cfg), cfg.interpolation)


# --- validation labels ----------------------------------------------------------------------

def _first_tokens(path: Path) -> list[list[str]]:
    lines = []
    for line in Path(path).read_text().splitlines():
        tokens = [t for t in re.split(r"[,\s]+", line.strip()) if t]
        if tokens and not tokens[0].startswith("#"):
            lines.append(tokens)
    return lines


def read_synsets(path: str | Path) -> list[str]:
    """Synsets in class-id order: a text file with the synset first on each line (line i is class
    id i), or the devkit's meta.mat (the 1,000 leaf synsets ordered by ILSVRC2012_ID)."""
    if str(path).endswith(".mat"):
        from scipy.io import loadmat

        entries = loadmat(str(path), squeeze_me=True)["synsets"]
        leaves = sorted((int(e["ILSVRC2012_ID"]), str(e["WNID"])) for e in entries if int(e["num_children"]) == 0)
        return [wnid for _, wnid in leaves]
    return [tokens[0] for tokens in _first_tokens(Path(path))]


def read_val_labels(labels_file: str | Path, synsets_file: str | Path | None = None) -> dict[str, str]:
    """File stem -> synset for the validation images. Two forms, told apart by their content:
      - "<file name> <synset>" per line (space, tab or comma separated; extension optional; extra
        columns ignored; a header line such as Kaggle's "ImageId,PredictionString" skipped);
      - the devkit's ILSVRC2012_validation_ground_truth.txt: one 1-based class id per line, line n
        for ILSVRC2012_val_<n:08d>; ids are looked up in `synsets_file` (see read_synsets).
    """
    rows = _first_tokens(Path(labels_file))
    if rows and all(len(r) == 1 and r[0].isdigit() for r in rows):
        if not synsets_file:
            raise ValueError(f"source.labels_file {labels_file} holds class ids (devkit ground truth): "
                             f"set source.synsets_file to the synset order (devkit meta.mat or one synset a line)")
        synsets = read_synsets(synsets_file)
        bad = [int(r[0]) for r in rows if not 1 <= int(r[0]) <= len(synsets)]
        if bad:
            raise ValueError(f"source.labels_file {labels_file}: class ids {bad[:5]} outside 1..{len(synsets)} "
                             f"of source.synsets_file {synsets_file}")
        return {f"ILSVRC2012_val_{n:08d}": synsets[int(r[0]) - 1] for n, r in enumerate(rows, start=1)}
    mapping = {}
    for number, tokens in enumerate(rows):
        if len(tokens) < 2 or not _SYNSET.match(tokens[1]):
            if number == 0:
                continue   # a header line
            raise ValueError(f"source.labels_file {labels_file}: line {tokens!r} is not '<file name> <synset>'")
        mapping[PurePosixPath(tokens[0]).stem] = tokens[1]
    if not mapping:
        raise ValueError(f"source.labels_file {labels_file} holds no '<file name> <synset>' lines")
    return mapping


def _list_val(cfg: SourceConfig) -> SourceListing:
    root = Path(cfg.path)
    if not root.is_dir():
        raise FileNotFoundError(f"source.path {root} is not a folder (expected <root>/ILSVRC2012_val_00000001.JPEG ...)")
    if not cfg.labels_file or not Path(cfg.labels_file).is_file():
        raise FileNotFoundError(f"source.labels_file {cfg.labels_file!r} is not a file: imagenet_val needs the "
                                f"validation labels ('<file name> <synset>' lines, or the devkit ground truth)")
    mapping = read_val_labels(cfg.labels_file, cfg.synsets_file)
    # The full synset list, when given, keeps class indices equal to train's even for a partial val set.
    classes = sorted(set(read_synsets(cfg.synsets_file)) if cfg.synsets_file else set(mapping.values()))
    label_of = {synset: i for i, synset in enumerate(classes)}
    # One scandir: names and stats at once; an image name that is no regular file is a reject row.
    statuses, skipped = {}, []
    with os.scandir(root) as entries:
        for entry in entries:
            if is_dir(entry):
                skipped.append((entry.name, "a folder in the flat validation folder (not read)"))
            elif Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((entry.name, skip_reason(entry.name)))
            elif (status := file_status(entry)) is not None:
                statuses[entry.name] = status
    files = sorted(statuses)
    readable = [name for name in files if not isinstance(statuses[name], str)]
    unlabelled = [name for name in readable if PurePosixPath(name).stem not in mapping]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} images in source.path {root} have no label in source.labels_file "
                         f"{cfg.labels_file} (first: {unlabelled[:3]})")
    if not readable:
        raise FileNotFoundError(f"no images in {root} (suffixes {sorted(IMAGE_SUFFIXES)})")
    rows = [(VAL_PREFIX + name, label_of.get(mapping.get(PurePosixPath(name).stem), -1), statuses[name])
            for name in files]
    # No empty_classes: a class without val images here (a partial val set) is no bad input.
    return folder_listing(rows, classes, cfg.num_images, skipped)


# --- the nested train tar -------------------------------------------------------------------

def tar_index(cfg: SourceConfig):
    """(rows in sample order, classes) of the train tar, building its index once."""
    return tarindex.load_index(tarindex.ensure_index(cfg.path, cfg.index_path))


def _list_tar(cfg: SourceConfig) -> SourceListing:
    rows, classes = tar_index(cfg)
    present = set(rows["label"].unique().tolist())
    empty = tuple(name for i, name in enumerate(classes) if i not in present)
    if cfg.num_images:
        rows = rows.iloc[:cfg.num_images]
    # Members are read by offset from the one archive: its size and mtime stand for every file in it.
    info = Path(cfg.path).stat()
    stamp = {"tar_size": info.st_size, "tar_mtime_ns": info.st_mtime_ns}
    return SourceListing(rows["id"].tolist(), rows["label"].to_numpy(np.int64), classes, False, empty, stamp=stamp)


def list_imagenet(cfg: SourceConfig) -> SourceListing:
    return _list_tar(cfg) if cfg.kind == "imagenet_tar" else _list_val(cfg)


# --- reading chunks ---------------------------------------------------------------------------

def _tar_rows(cfg: SourceConfig, ids: list[str], start: int):
    rows, _ = tar_index(cfg)
    chunk = rows.iloc[start:start + len(ids)]
    if chunk["id"].tolist() != list(ids):   # ids not at their listed positions: look each one up
        chunk = rows.set_index("id", drop=False).loc[list(ids)]
    return chunk


def sample_relpath(cfg: SourceConfig, sample_id: str) -> str:
    """A folder sample's file relative to source.path (val ids carry a "val/" prefix the folder lacks)."""
    return sample_id.removeprefix(VAL_PREFIX) if cfg.kind == "imagenet_val" else sample_id


@dataclass(frozen=True)
class SampleFiles:
    """Where listed samples' bytes are: one file per slot (class folders, the val folder), or members
    of the train tar by offset. `read` gives each slot's bytes or the error that stopped it, never
    raising for one file, so a caller turns every failure into a reject row."""
    paths: tuple[str, ...] = ()
    archive: str | None = None
    members: np.ndarray | None = None   # tar: int64 [N, 3] class_offset, member_offset, size per slot
    ids: tuple[str, ...] = ()           # tar: names for reject rows

    def __len__(self) -> int:
        return len(self.ids) if self.archive else len(self.paths)

    def where(self, slot: int) -> str:
        return f"{self.archive}::{self.ids[slot]}" if self.archive else self.paths[slot]

    def read(self, start: int, stop: int) -> list[bytes | bytearray | Exception]:
        """Each slot's bytes (a folder's files as bytearrays, which torch takes without a copy) or error."""
        out: list[bytes | bytearray | Exception] = [b""] * (stop - start)
        if self.archive:
            rows = self.members[start:stop]
            with open(self.archive, "rb") as archive:
                for slot in np.argsort(rows[:, 0] + rows[:, 1], kind="stable"):   # one forward pass
                    try:
                        out[slot] = tarindex.read_member(archive, *(int(v) for v in rows[slot]))
                    except Exception as error:
                        out[slot] = error
            return out
        for slot, path in enumerate(self.paths[start:stop]):
            try:
                with open_regular(Path(path)) as file:   # a FIFO put here after listing must not block
                    out[slot] = read_whole(file)
            except Exception as error:
                out[slot] = error
        return out


def read_whole(file: BinaryIO) -> bytearray:
    """All of an open file, read into a bytearray of its size (the GIL released for the read): the GPU decoders
    wrap it as a tensor as it is, where bytes had to be copied first, on the thread that launches the encoder."""
    data = bytearray(os.fstat(file.fileno()).st_size)
    got = file.readinto(data)
    del data[got:]
    rest = file.read()   # grown since its size was taken: nothing is lost
    if rest:
        data += rest
    return data


def sample_files(cfg: SourceConfig, ids: list[str], start: int = 0) -> SampleFiles:
    """The files of samples start..start+len(ids) of a folder or tar source."""
    if cfg.kind == "imagenet_tar":
        rows = _tar_rows(cfg, ids, start)
        members = rows[["class_offset", "member_offset", "size"]].to_numpy(np.int64)
        return SampleFiles(archive=str(cfg.path), members=members, ids=tuple(ids))
    root = Path(cfg.path)
    return SampleFiles(paths=tuple(str(root / sample_relpath(cfg, i)) for i in ids))


def read_imagenet_chunk(cfg: SourceConfig, ids: list[str], labels: np.ndarray, start: int) -> dict:
    """Samples start..start+len(ids): images, labels, valid flags, rejects (never an exception per file)."""
    count = len(ids)
    images = np.zeros((count, cfg.image_size, cfg.image_size, 3), np.uint8)
    valid = np.zeros(count, bool)
    rejects = []
    files = sample_files(cfg, ids, start)
    for slot, data in enumerate(files.read(0, count)):
        try:
            if isinstance(data, Exception):
                raise data
            images[slot] = decode(io.BytesIO(data), cfg)
            valid[slot] = True
        except Exception as error:
            rejects.append({"stage": "ingest", "path": files.where(slot), "reason": reject_reason(error)})
    return {"image": images, "label": np.asarray(labels, np.int64), "valid": valid, "rejects": rejects}
