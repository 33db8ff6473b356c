"""Ingest: image source -> image store (Zarr: uint8 images, labels, ids, GT masks, rejects).

The scenes (and ImageNet sources with encoder.read_from image_store) store every image, decoded by
Dask workers. ImageNet sources that encode reads from the files (the default) store the listing
(ids, labels, valid, listing rejects, fingerprint) and the pixels of only the first
ingest.sample_pixels samples, decoded here by the encoder's own reader (tasks.encode.files) so the
dashboards and the decoder see exactly what the encoder saw; `image` then has that many rows.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from storage import lineage, zarr_store
from storage.config import SourceConfig, TFConfig, encode_reads_files
from storage.keys import Layout
from storage.sources import SourceChanged, SourceListing, describe_change, list_source, listing_frame
from storage.tables import REJECT_COLUMNS, atomic_write_parquet, load_rejects, now_iso, write_rejects, write_skipped
from storage.zarr_store import ArraySpec
from tasks.chunk_workers import ingest_chunk
from tasks.dask_chunks import run_chunks
from tasks.stage import Done, Stage, run_stage, stage_task

LISTING_TABLE = "_listing.parquet"   # the listing a store was built from (storage.sources.listing_frame)


def image_store_arrays(num: int, size: int, with_masks: bool, pixels: int | None = None) -> dict[str, ArraySpec]:
    """`pixels`: rows of `image` when only the first samples keep their pixels (None: every sample)."""
    arrays = {
        "sample": ArraySpec((num,), str, ("sample",), fill_value=""),
        "image": ArraySpec((num if pixels is None else pixels, size, size, 3), np.uint8, ("sample", "y", "x", "rgb"),
                           chunk_rows=1 if pixels == 0 else None),   # Zarr takes no zero-row chunk
        "label": ArraySpec((num,), np.int64, ("sample",), fill_value=-1),
        "valid": ArraySpec((num,), bool, ("sample",), fill_value=False),
    }
    if with_masks:
        arrays["masks"] = ArraySpec((num, 3, size, size), np.uint8, ("sample", "gt_level", "y", "x"))
    return arrays


@stage_task("ingest")
def ingest_images(cfg: TFConfig, root: str, force: bool = False) -> dict:
    layout = Layout(root, cfg)
    path = layout.images()
    # Listed on every run, a reuse too: a store holds the files it was listed from, and slots are
    # positions in that listing, so resuming or reusing it for another listing would mix samples up.
    listing = functools.cache(lambda: list_source(cfg.source))

    def reused() -> dict:
        check_listing(path, listing(), cfg.source.path, complete=True)
        return {}

    stage = Stage("ingest", layout.keys.images, path, store_stage="images")
    return run_stage(cfg, stage, force, lambda: _ingest(cfg, layout, listing()), reused=reused)


def _ingest(cfg: TFConfig, layout: Layout, listing: SourceListing) -> Done:
    path = layout.images()
    if (zarr_store.zarr_path(path) / "zarr.json").exists():   # a killed run's store: resumed only on the same files
        check_listing(path, listing, cfg.source.path, complete=False)
    else:   # the per-file record before the store, so every fingerprinted store has one
        atomic_write_parquet(listing_frame(listing), Path(path) / LISTING_TABLE)
        # this build's rows: the listing's (a run killed before its template may have listed other files)
        lineage.start(path, layout.keys.images, lineage.rows_identity(listing.ids, listing.fingerprint), [])
    num, chunk_size = len(listing.ids), cfg.ingest.chunk_size
    direct = encode_reads_files(cfg)
    pixels = min(cfg.ingest.sample_pixels, num) if direct else None
    attrs = {"stage": "images", "key": layout.keys.images, "source": cfg.source.model_dump(), **listing_record(listing),
             **({"read_from": "files", "pixel_rows": pixels} if direct else {})}
    zarr_store.create_store(path, image_store_arrays(num, cfg.source.image_size, listing.has_masks, pixels),
                            chunk_size, attrs)
    zarr_store.write_array(path, "sample", np.asarray(listing.ids, dtype=str))
    write_listing_rejects(path, listing, cfg.source)
    bounds = zarr_store.chunk_bounds(num, chunk_size)
    pending = zarr_store.pending_chunks(path, len(bounds))
    if direct:
        write_listing_chunks(cfg, path, listing, pending, bounds, pixels)
    else:
        todo = [(cfg.source.model_dump(), str(path), c, start, listing.ids[start:stop],
                 listing.labels[start:stop].tolist()) for c in pending for start, stop in [bounds[c]]]
        run_chunks(ingest_chunk, todo, description="ingest", address=cfg.ingest.dask_address,
                   workers=cfg.ingest.workers, worker_loss_timeout=cfg.ingest.worker_loss_timeout)
    infos = zarr_store.chunk_infos(path)
    accepted = sum(i["accepted"] for i in infos)
    rejected = len(load_rejects(path))
    # every listed file, every class folder without one, every unreadable folder and every image name that is
    # no regular file; the entries that are no sample are the skipped table's rows
    seen = num + len(listing.empty_classes) + len(listing.rejects)
    if accepted + rejected != seen:   # a sample neither stored nor rejected would be lost silently
        raise RuntimeError(f"ingest of {path}: accepted {accepted} + rejected {rejected} != seen {seen}")
    counts = {"seen": seen, "accepted": accepted, "rejected": rejected, "skipped": len(listing.skipped)}
    return Done({"samples": num, **counts}, counts)


def write_listing_chunks(cfg: TFConfig, path, listing: SourceListing, pending: list[int], bounds, pixels: int) -> None:
    """The image store of the direct path, chunk by chunk (marker last): labels, valid (a listed regular
    file; decode failures show in the latent store, and here for the sampled pixels), and the pixels of
    the slots below `pixels`, decoded on this CPU by the encoder's reader."""
    from storage.imagenet import resize_short_side, sample_files
    from tasks.encode.files import Preprocess
    from tasks.encode.pixels import decode_pixels

    files = sample_files(cfg.source, listing.ids)
    preprocess = Preprocess(cfg.source.image_size, resize_short_side(cfg.source), cfg.source.interpolation)
    for chunk in pending:
        start, stop = bounds[chunk]
        values = {"label": listing.labels[start:stop], "valid": np.ones(stop - start, bool)}
        rejects: list[dict] = []
        if start < pixels:
            values["image"], decoded, rejects = decode_pixels(files, start, min(stop, pixels), preprocess,
                                                              cfg.encoder.readers, read_timeout=cfg.encoder.read_timeout_s)
            values["valid"][:len(decoded)] = decoded
        write_rejects(path, chunk, rejects)   # before the marker: a done chunk has its rejects
        accepted = int(values["valid"].sum())
        zarr_store.write_chunk(path, chunk, start, values, {"accepted": accepted, "rejected": len(rejects),
                                                            "pixels": len(values.get("image", ()))})


def with_stored_pixels(images_store, latents):
    """(latents, uint8 pixels) of the valid samples whose pixels the image store holds: every one for the
    scenes, the first ingest.sample_pixels for the direct path (what the decoder trains on). Each latent's
    pixels are found by its sample id, never by its row."""
    import dataclasses

    image = zarr_store.open_array(images_store, "image")
    rows = zarr_store.rows_of(images_store, latents.ids)
    keep = rows < image.shape[0]
    if not keep.all():
        latents = dataclasses.replace(latents, stored=latents.stored[keep], label=latents.label[keep],
                                      index=latents.index[keep], ids=latents.ids[keep])
    return latents, np.asarray(image.oindex[rows[keep]])


def source_file(source: SourceConfig, sample_id: str) -> str:
    """A folder sample's file relative to source.path (val ids carry a "val/" prefix the folder lacks)."""
    from storage.imagenet import sample_relpath

    return sample_relpath(source, sample_id)


def listing_record(listing: SourceListing) -> dict:
    """What the store's attrs keep of its listing (the per-file record is LISTING_TABLE beside it)."""
    return {"classes": listing.classes, "empty_classes": list(listing.empty_classes),
            "source_stamp": listing.stamp, "source_fingerprint": listing.fingerprint}


def check_listing(path: Path, listing: SourceListing, source_root: str | None, complete: bool) -> None:
    """Refuse a store whose source no longer lists the same files (names, sizes, mtimes): resuming it
    would write other files' pixels under the ids and labels listed before, and reusing it would leave
    new files out. Never repairs anything: the store stays as it is."""
    attrs = zarr_store.store_attrs(path)
    stored = attrs.get("source_fingerprint")
    if stored == listing.fingerprint:
        return
    fix = (f"Rebuild it from the source as it is now with `tf ingest --force ingest`, or restore "
           f"{source_root or 'the source'} as it was.")
    if stored is None:   # written before listings were fingerprinted
        if complete:     # finished from one listing in one run: still what it was, only unchecked
            warnings.warn(f"image store {path} predates source fingerprints: reused without checking that "
                          f"{source_root} still lists the same files. {fix}", stacklevel=2)
            return
        raise SourceChanged(f"the unfinished image store {path} predates source fingerprints, so resuming it "
                            f"cannot be checked against {source_root}. {fix}")
    table = Path(path) / LISTING_TABLE
    old = pd.read_parquet(table) if table.exists() else None
    heads = [{"classes": record.get("classes"), "empty_classes": record.get("empty_classes"),
              "stamp": record.get("source_stamp")} for record in (attrs, listing_record(listing))]
    what = describe_change(old, listing_frame(listing), *heads)
    state = "complete" if complete else "unfinished"
    raise SourceChanged(f"source {source_root} no longer lists the files the {state} image store {path} was built "
                        f"from: {what}. Its samples would no longer match their files, so it is left as it is. {fix}")


def write_listing_rejects(path, listing: SourceListing, source: SourceConfig) -> None:
    """A reject row for each class folder with no image (the class keeps its number, as in ImageFolder),
    each folder that could not be read and each image name that is no regular file (never opened: a
    FIFO would block the reader forever); a skipped row for every other entry that is no sample."""
    where = Path(source.path or "")
    rows = [{"stage": "ingest", "path": str(where / name), "reason": "empty class folder: no image files",
             "chunk": -1, "timestamp": now_iso()} for name in listing.empty_classes]
    rows += [{"stage": "ingest", "path": str(where / source_file(source, sample_id)), "reason": reason,
              "chunk": -1, "timestamp": now_iso()} for sample_id, _, reason in listing.rejects]
    if rows:
        atomic_write_parquet(pd.DataFrame(rows, columns=REJECT_COLUMNS), Path(path) / "_rejects" / "listing.parquet")
    write_skipped(path, [{"stage": "ingest", "path": str(where / name), "reason": reason}
                         for name, reason in listing.skipped])
