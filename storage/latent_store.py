"""The latent store's format: its arrays, and how one encode chunk is written into it.

Both encode paths (image store -> latents in tasks.chunk_workers, JPEG files -> latents in
tasks.encode.files) write a chunk through `write_latent_chunk`, so the stores they make are the
same: tokens, valid, label, this chunk's row of moments, rejects, then the chunk marker last.
Free of pydantic and Prefect: the GPU bench writes real latent stores through it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from storage import zarr_store
from storage.files import atomic_write_json
from storage.zarr_store import ArraySpec

SAMPLED_STATS = "_SAMPLED_STATS.json"   # beside the store: mean/std hold a sample's statistics, fixed before the pass


def latent_store_arrays(num: int, num_chunks: int, grid: int, dim: int, dtype) -> dict[str, ArraySpec]:
    stored, float_attrs = zarr_store.float_storage(dtype)   # bfloat16: uint16 bit patterns + attribute
    return {
        "sample": ArraySpec((num,), str, ("sample",), fill_value=""),
        "tokens": ArraySpec((num, grid, grid, dim), stored, ("sample", "gy", "gx", "channel"), compressed=False,
                            attrs=float_attrs),
        "label": ArraySpec((num,), np.int64, ("sample",), fill_value=-1),
        "valid": ArraySpec((num,), bool, ("sample",), fill_value=False),
        # One row per encode chunk, each its own Zarr chunk: parallel chunk tasks never share a file.
        "chunk_count": ArraySpec((num_chunks,), np.int64, ("chunk",), chunk_rows=1),
        "chunk_mean": ArraySpec((num_chunks, dim), np.float64, ("chunk", "channel"), chunk_rows=1),
        "chunk_m2": ArraySpec((num_chunks, dim), np.float64, ("chunk", "channel"), chunk_rows=1),
        "mean": ArraySpec((dim,), np.float32, ("channel",), per_sample=False),
        "std": ArraySpec((dim,), np.float32, ("channel",), per_sample=False),
    }


def write_latent_chunk(store: Path, chunk: int, start: int, tokens: np.ndarray, valid: np.ndarray,
                       labels: np.ndarray, moments: tuple, dtype: str, info: dict,
                       rejects: list[dict] | None = None, encoded: bool = False) -> None:
    """Samples start..start+len(tokens) of the latent store, marker last. `tokens` are float32 with
    invalid rows already zero (`encoded`: already in the storage form of `dtype`, as
    zarr_store.encode_floats gives it); `moments` is this chunk's (count, mean, M2) over its valid rows.
    `rejects` (None: the caller keeps no reject table here) replaces this chunk's reject file."""
    store = Path(store)
    count, mean, m2 = moments
    # chunk_* arrays hold one row per Zarr chunk, so parallel chunks never share a file.
    zarr_store.write_rows(store, chunk, {"chunk_count": count, "chunk_mean": mean, "chunk_m2": m2})
    if rejects is not None:
        _replace_rejects(store, chunk, rejects)   # before the marker: a done chunk has its rejects
    stored = tokens if encoded else zarr_store.encode_floats(tokens, dtype)
    zarr_store.write_chunk(store, chunk, start, {"tokens": stored,
                                                 "valid": valid, "label": labels}, info)


def _replace_rejects(store: Path, chunk: int, rows: list[dict]) -> None:
    """This chunk's reject file holds `rows`; none when there are none (a re-run after a file was fixed
    must not keep the old row). storage.tables is imported only when there is a row to write: it
    reaches storage.config (pydantic), which the GPU bench's machine may lack."""
    if rows:
        from storage.tables import write_rejects

        write_rejects(store, chunk, rows)
    else:
        (store / "_rejects" / f"{chunk:06d}.parquet").unlink(missing_ok=True)


def write_sampled_stats(store: Path, mean: np.ndarray, std: np.ndarray, info: dict) -> None:
    """Fix the store's channel statistics before its chunks are encoded (encoder.stats_images): the arrays
    first, then the record saying they are final, so a resumed pass standardises with the same values."""
    zarr_store.write_array(Path(store), "mean", np.asarray(mean, np.float32))
    zarr_store.write_array(Path(store), "std", np.asarray(std, np.float32))
    atomic_write_json(Path(store) / SAMPLED_STATS, info)


def sampled_stats(store: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The statistics write_sampled_stats fixed, or None when there are none (yet)."""
    if not (Path(store) / SAMPLED_STATS).exists():
        return None
    return tuple(np.asarray(zarr_store.open_array(Path(store), name)[:], np.float32) for name in ("mean", "std"))
