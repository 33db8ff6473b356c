"""Image sources: the built-in scenes and an ImageNet-style class-folder tree.

A source is listed once (stable ids, labels) and then read chunk by chunk, so Dask
workers can read disjoint slices. Bad files never vanish: they come back as rejects.
A listing carries a fingerprint (ids, labels, and each file's size and mtime), so a store
built from it can tell when its source no longer lists the same files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

import numpy as np
import pandas as pd
from PIL import Image

if TYPE_CHECKING:   # annotations only: the GPU bench imports this module without pydantic
    from storage.config import SourceConfig

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
MIN_SIDE = 8   # smaller images carry no content worth a sample (a 1x1 "image" is one colour)
# Above this many pixels a file is refused before decoding (PIL only warns below 2x its own limit).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
LISTING_COLUMNS = ["id", "label", "size", "mtime_ns", "reason"]   # the listing as a table (listing_frame)
SHOWN = 5   # names shown per kind of change in a SourceChanged message


class BadImage(ValueError):
    """A file that opens but cannot become a sample (too small, too large)."""


class SourceChanged(ValueError):
    """The source no longer lists the files a store was built from: resuming or reusing it would
    put one file's pixels under another file's id and label."""


@dataclass(frozen=True)
class SourceListing:
    ids: list[str]            # stable per sample: scenes index, or path relative to the root
    labels: np.ndarray        # int64 [N]
    classes: list[str]
    has_masks: bool
    empty_classes: tuple[str, ...] = field(default=())   # class folders without one image file
    sizes: np.ndarray | None = None       # int64 [N] bytes per file (folder sources); None: not per file
    mtimes_ns: np.ndarray | None = None   # int64 [N] modification times, beside `sizes`
    # (id, label, reason): image names that are no regular file, and folders that could not be read
    rejects: tuple[tuple[str, int, str], ...] = ()
    # (path relative to the root, reason): every other entry that is no sample (readme.txt, .DS_Store,
    # a file where a class folder would be), named, so each entry under the root has a row somewhere
    skipped: tuple[tuple[str, str], ...] = ()
    stamp: dict = field(default_factory=dict)   # what else decides the samples (tar size+mtime, scenes config)

    @cached_property
    def fingerprint(self) -> str:
        """Stable hash of everything listed, in listing order (which is the slot order)."""
        digest = hashlib.sha256()
        head = {"classes": self.classes, "empty": list(self.empty_classes), "masks": self.has_masks,
                "rejects": [list(r) for r in self.rejects], "stamp": self.stamp}
        digest.update(json.dumps(head, sort_keys=True, default=str).encode())
        digest.update("\0".join(self.ids).encode())   # NUL: the one byte no file name holds
        for values in (self.labels, self.sizes, self.mtimes_ns):
            digest.update(b"-" if values is None else np.ascontiguousarray(values, "<i8").tobytes())
        return digest.hexdigest()[:24]


def listing_frame(listing: SourceListing) -> pd.DataFrame:
    """One row per listed entry (samples, then rejected names), what describe_change compares."""
    count = len(listing.ids)
    unknown = np.full(count, -1, np.int64)
    samples = pd.DataFrame({"id": listing.ids, "label": np.asarray(listing.labels, np.int64),
                            "size": unknown if listing.sizes is None else listing.sizes,
                            "mtime_ns": unknown if listing.mtimes_ns is None else listing.mtimes_ns, "reason": ""})
    rejects = pd.DataFrame([(i, label, -1, -1, reason) for i, label, reason in listing.rejects], columns=LISTING_COLUMNS)
    return pd.concat([samples, rejects], ignore_index=True) if len(rejects) else samples[LISTING_COLUMNS]


def _named(ids: list[str]) -> str:
    more = f", ... ({len(ids) - SHOWN} more)" if len(ids) > SHOWN else ""
    return ", ".join(ids[:SHOWN]) + more


def _what_changed(row: dict) -> str:
    parts = [f"{column} {row[column + '_old']!r} -> {row[column + '_new']!r}" for column in ("label", "size", "reason")
             if row[column + "_old"] != row[column + "_new"]]
    return f"{row['id']} ({', '.join(parts) or 'modified'})"


def describe_change(stored: pd.DataFrame | None, now: pd.DataFrame, stored_head: dict, now_head: dict) -> str:
    """`N added (a, b); M removed (...); K changed (x (size 1 -> 2))`, then class folder and stamp
    differences; `stored` is None when the store kept no listing table."""
    parts = []
    if stored is None:
        parts.append("the store's listing record is missing, so the changed files cannot be named")
    else:
        added = now["id"][~now["id"].isin(stored["id"])].tolist()
        removed = stored["id"][~stored["id"].isin(now["id"])].tolist()
        both = stored.merge(now, on="id", suffixes=("_old", "_new"))
        differs = np.zeros(len(both), bool)
        for column in ("label", "size", "mtime_ns", "reason"):
            differs |= (both[column + "_old"] != both[column + "_new"]).to_numpy()
        changed = [_what_changed(row) for row in both[differs].to_dict("records")]
        parts += [f"{len(names)} {verb} ({_named(names)})"
                  for verb, names in (("added", added), ("removed", removed), ("changed", changed)) if names]
    parts += [f"{key}: stored {stored_head.get(key)!r}, now {now_head.get(key)!r}"
              for key in ("classes", "empty_classes", "stamp") if stored_head.get(key) != now_head.get(key)]
    return "; ".join(parts) or "the same files, listed in another order"


def list_source(cfg: SourceConfig) -> SourceListing:
    if cfg.kind == "scenes":
        from storage.scenes import SCENE_CLASSES

        ids = [f"scene-s{cfg.seed}-{i:07d}" for i in range(cfg.num_images)]
        # Labels are decided by the renderer; -1 until the chunk is rendered. Rendered, not read: the
        # config that decides the pixels is the whole fingerprint.
        stamp = {"seed": cfg.seed, "num_images": cfg.num_images, "image_size": cfg.image_size}
        return SourceListing(ids, np.full(cfg.num_images, -1, np.int64), list(SCENE_CLASSES), True, stamp=stamp)
    if cfg.kind in ("imagenet_val", "imagenet_tar"):   # flat val folder + labels, nested train tar
        from storage.imagenet import list_imagenet

        return list_imagenet(cfg)
    return _list_imagefolder(Path(cfg.path), cfg.num_images)


# --- listing folders --------------------------------------------------------------------------

_KINDS = ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))


_ADDRESS = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def reject_reason(error: BaseException) -> str:
    """`Type: message` of what stopped a file, the same on every run: an object's memory address in the
    message (PIL names the buffer it read, `<_io.BytesIO object at 0x7f...>`) is left out."""
    return f"{type(error).__name__}: {_ADDRESS.sub('', str(error))}"


def skip_reason(name: str) -> str:
    """Why a file in a class folder is not a sample: its name has no image suffix."""
    suffix = Path(name).suffix
    return f"not an image file name (suffix {suffix!r})" if suffix else "not an image file name (no suffix)"


def file_status(entry: os.DirEntry) -> os.stat_result | str | None:
    """The stat of a regular file (a link to one counts as one), else the reject reason: a FIFO
    blocks open() forever and a device reads forever, so neither may reach a reader.
    None when the entry vanished since its folder was read (it is no longer listed)."""
    try:
        info = entry.stat()   # follows links; one stat call, no open
    except FileNotFoundError:
        return "not a regular file (broken symlink)" if entry.is_symlink() else None
    except OSError as error:   # a link loop, a permission error on the target
        return f"not a regular file ({error.strerror or error})"
    return info if stat.S_ISREG(info.st_mode) else not_regular(info.st_mode)


def not_regular(mode: int) -> str:
    return f"not a regular file ({next((name for test, name in _KINDS if test(mode)), 'special file')})"


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, refused unless it is a regular file. O_NONBLOCK makes opening a
    FIFO return at once instead of waiting for a writer, so a file swapped for one after listing
    cannot hang a worker; fstat then checks the very file that was opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BadImage(not_regular(mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def scan_tree(top: Path) -> Iterator[tuple[str, list[os.DirEntry], list[os.DirEntry], OSError | None]]:
    """(folder, its non-folder entries, its links to folders, the error that kept it unread) for `top`
    and every folder under it, as os.walk(followlinks=False) splits them (a link to a folder is not
    entered), one scandir per folder. An unreadable folder comes with its error and no entries: the
    caller names it (a class folder the process may not read is no empty class)."""
    stack = [os.fspath(top)]
    while stack:
        folder = stack.pop()
        files, links = [], []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if not is_dir(entry):
                        files.append(entry)
                    elif entry.is_symlink():
                        links.append(entry)
                    else:
                        stack.append(entry.path)
        except OSError as error:
            yield folder, [], [], error
            continue
        yield folder, files, links, None


def folder_listing(rows: list[tuple[str, int, os.stat_result | str]], classes: list[str], cap: int,
                   skipped: list[tuple[str, str]], empty: tuple[str, ...] = ()) -> SourceListing:
    """A listing from (id, label, stat or reject reason) rows in listing order; `cap` counts every
    image name, rejected ones too (as it counts a truncated file)."""
    if cap:
        rows = rows[:cap]
    samples = [(i, label, info) for i, label, info in rows if not isinstance(info, str)]
    rejects = tuple((i, label, info) for i, label, info in rows if isinstance(info, str))
    return SourceListing([i for i, _, _ in samples], np.asarray([label for _, label, _ in samples], np.int64),
                         classes, False, empty,
                         sizes=np.asarray([info.st_size for _, _, info in samples], np.int64),
                         mtimes_ns=np.asarray([info.st_mtime_ns for _, _, info in samples], np.int64),
                         rejects=rejects, skipped=tuple(sorted(skipped)))


def _list_imagefolder(root: Path, cap: int) -> SourceListing:
    if not root.is_dir():
        raise FileNotFoundError(f"source.path {root} is not a folder (expected <root>/<synset>/<image>.JPEG)")
    classes, skipped = [], []
    with os.scandir(root) as entries:   # every entry at the root is a class folder or a named skipped row
        for entry in entries:
            if is_dir(entry):
                classes.append(entry.name)
            elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                skipped.append((entry.name, "image outside every class folder: no class to label it"))
            else:
                skipped.append((entry.name, "not a class folder (a file at the source root)"))
    classes.sort()   # ImageFolder numbering
    rows: list[tuple[str, int, os.stat_result | str]] = []
    for index, name in enumerate(classes):
        for folder, entries, links, error in sorted(scan_tree(root / name), key=lambda item: item[0]):
            where = str(Path(folder).relative_to(root))
            if error is not None:   # listed as a reject of its own: its images are not "no images"
                rows.append((where, index, reject_reason(error)))
            skipped += [(os.path.join(where, link.name), "link to a folder (not followed)") for link in links]
            # strings, not a Path per file: a third of the time of listing 50,000 files went to pathlib
            for entry in sorted(entries, key=lambda e: e.name):
                if name_suffix(entry.name).lower() not in IMAGE_SUFFIXES:
                    skipped.append((os.path.join(where, entry.name), skip_reason(entry.name)))
                    continue
                status = file_status(entry)
                if status is not None:
                    rows.append((os.path.join(where, entry.name), index, status))
    if not any(not isinstance(status, str) for _, _, status in rows):
        raise FileNotFoundError(f"no images under {root} (suffixes {sorted(IMAGE_SUFFIXES)})")
    present = {label for _, label, _ in rows}   # before the cap: a class cut off by the cap is not empty
    empty = tuple(name for index, name in enumerate(classes) if index not in present)
    return folder_listing(rows, classes, cap, skipped, empty)


def name_suffix(name: str) -> str:
    """A file name's suffix by pathlib's rule (PurePath.suffix), without building a path: "" for ".JPEG"
    and for "name." alike."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16/32-bit and float greyscale are scaled, not clipped; palette
    images with transparency go through RGBA; alpha is dropped (as torchvision's ImageFolder does)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and values.max(initial=0) <= 1.0 else (65535.0 if values.max(initial=0) > 255 else 255.0)
        return Image.fromarray(np.clip(np.rint(values * 255.0 / top), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to `size` (bicubic, antialiased), centre-crop to size x size, RGB uint8."""
    image = to_rgb(image)
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def check_size(image: Image.Image) -> None:
    """Refuse decompression bombs and images too small to crop, before decoding the pixels."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise BadImage(f"decompression bomb: {width}x{height} = {width * height} px > {MAX_PIXELS} px limit")
    if min(width, height) < MIN_SIDE:
        raise BadImage(f"image is {width}x{height} px, smaller than the {MIN_SIDE} px minimum side")


def read_image(path: Path, size: int) -> np.ndarray:
    # PIL itself refuses > 2x MAX_IMAGE_PIXELS (DecompressionBombError)
    with open_regular(path) as file, Image.open(file) as image:
        check_size(image)
        image.load()
        return center_crop_resize(image, size)


def read_chunk(cfg: SourceConfig, ids: list[str], labels: np.ndarray, start: int) -> dict:
    """The samples `ids` (sample indices start..start+len(ids)): images, labels, masks (scenes), valid flags, rejects."""
    count = len(ids)
    stop = start + count
    if cfg.kind == "scenes":
        from storage.scenes import render_scenes

        batch = render_scenes(range(start, stop), seed=cfg.seed, size=cfg.image_size)
        return {"image": batch["image"], "label": batch["label"].astype(np.int64),
                "masks": batch["masks"], "valid": np.ones(count, bool), "rejects": []}
    from storage import imagenet   # ImageNet kinds, and imagefolder with source.resize_short/interpolation set

    if imagenet.handles(cfg):
        return imagenet.read_imagenet_chunk(cfg, ids, labels, start)
    images = np.zeros((count, cfg.image_size, cfg.image_size, 3), np.uint8)
    valid = np.zeros(count, bool)
    rejects = []
    for offset, sample_id in enumerate(ids):
        path = Path(cfg.path) / sample_id
        try:
            images[offset] = read_image(path, cfg.image_size)
            valid[offset] = True
        except Exception as error:  # any unreadable file is a reject, never a crash
            rejects.append({"stage": "ingest", "path": str(path), "reason": reject_reason(error)})
    return {"image": images, "label": np.asarray(labels, np.int64), "valid": valid, "rejects": rejects}
