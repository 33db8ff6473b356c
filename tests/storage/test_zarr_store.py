from pathlib import Path

import numpy as np
import pytest
import zarr

from storage import zarr_store
from storage.zarr_store import ArraySpec


def _arrays(n):
    return {"sample": ArraySpec((n,), str, ("sample",), fill_value=""),
            "x": ArraySpec((n, 3, 2), np.float16, ("sample", "a", "b")),
            "label": ArraySpec((n,), np.int64, ("sample",), fill_value=-1)}


def test_round_trip_is_exact_and_readable_by_xarray(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "store"
    zarr_store.create_store(path, _arrays(10), 4, {"stage": "t", "key": "abc"})
    x = rng.normal(size=(10, 3, 2)).astype(np.float16)
    labels = rng.integers(0, 5, 10)
    zarr_store.write_array(path, "sample", np.array([f"id-{i}" for i in range(10)]))
    for chunk, (start, stop) in enumerate(zarr_store.chunk_bounds(10, 4)):
        zarr_store.write_chunk(path, chunk, start, {"x": x[start:stop], "label": labels[start:stop]})
    assert np.array_equal(zarr_store.open_array(path, "x")[:], x)
    ds = zarr_store.open_dataset(path)
    assert ds["x"].dims == ("sample", "a", "b")
    assert list(ds["sample"].values) == [f"id-{i}" for i in range(10)]
    assert np.array_equal(ds["label"].values, labels)
    assert ds.attrs["key"] == "abc"


def test_markers_track_pending_chunks_and_completion(tmp_path):
    path = tmp_path / "store"
    zarr_store.create_store(path, _arrays(10), 4, {"stage": "t"})
    assert zarr_store.pending_chunks(path, 3) == [0, 1, 2]
    zarr_store.write_chunk(path, 1, 4, {"label": np.arange(4)})
    assert zarr_store.pending_chunks(path, 3) == [0, 2]
    assert not zarr_store.is_complete(path)
    zarr_store.mark_complete(path, {"n": 10})
    assert zarr_store.is_complete(path) and zarr_store.completion(path) == {"n": 10}


def test_recreating_with_other_config_is_refused(tmp_path):
    path = tmp_path / "store"
    zarr_store.create_store(path, _arrays(4), 4, {"stage": "t", "lam": 0.2})
    zarr_store.create_store(path, _arrays(4), 4, {"stage": "t", "lam": 0.2})  # same: resume
    with pytest.raises(ValueError, match="another config"):
        zarr_store.create_store(path, _arrays(4), 4, {"stage": "t", "lam": 0.3})


def test_chunk_bounds_cover_every_sample_once():
    bounds = zarr_store.chunk_bounds(103, 16)
    covered = np.concatenate([np.arange(a, b) for a, b in bounds])
    assert np.array_equal(covered, np.arange(103))


def test_raw_chunks_are_written_directly_and_read_back_by_zarr_and_xarray(tmp_path):
    """Uncompressed arrays take the direct chunk-file path for whole chunks; the partial last chunk
    and compressed arrays go through zarr. Every value reads back exactly either way."""
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((10, 4, 4, 6)).astype(np.float16)
    labels = np.arange(10, dtype=np.int64)
    zarr_store.create_store(tmp_path / "s", {
        "raw": ArraySpec(tokens.shape, "float16", ("sample", "gy", "gx", "channel"), compressed=False),
        "packed": ArraySpec(tokens.shape, "float16", ("sample", "gy", "gx", "channel")),
        "label": ArraySpec((10,), "int64", ("sample",), compressed=False)}, 4, {"stage": "test"})
    group = zarr.open_group(str(zarr_store.zarr_path(tmp_path / "s")), mode="r")
    assert group["raw"].compressors == () and group["packed"].compressors != ()
    for chunk, (start, stop) in enumerate(zarr_store.chunk_bounds(10, 4)):
        meta = zarr_store._array_meta(zarr_store.zarr_path(tmp_path / "s") / "raw")
        raw_file = zarr_store._raw_chunk_file(meta, tmp_path, start, tokens[start:stop])
        assert (raw_file is not None) == (stop - start == 4)   # the 2-row tail goes through zarr
        zarr_store.write_chunk(tmp_path / "s", chunk, start, {"raw": tokens[start:stop], "packed": tokens[start:stop],
                                                            "label": labels[start:stop]})
    assert np.array_equal(zarr_store.open_array(tmp_path / "s", "raw")[:], tokens)
    assert np.array_equal(zarr_store.open_array(tmp_path / "s", "packed")[:], tokens)
    assert np.array_equal(zarr_store.open_array(tmp_path / "s", "label")[:], labels)
    assert np.array_equal(zarr_store.open_dataset(tmp_path / "s")["raw"].values, tokens)
    chunk_file = zarr_store.zarr_path(tmp_path / "s") / "raw" / "c" / "1" / "0" / "0" / "0"
    assert chunk_file.read_bytes() == tokens[4:8].tobytes()   # written by us, in zarr's layout
    assert not list((zarr_store.zarr_path(tmp_path / "s") / "raw").rglob(".*.tmp"))   # no temp files left (atomic_write_bytes names)
    # a re-write of the same chunk (a retried chunk) replaces it
    zarr_store.write_chunk(tmp_path / "s", 1, 4, {"raw": np.zeros((4, 4, 4, 6), np.float16)})
    assert not zarr_store.open_array(tmp_path / "s", "raw")[4:8].any()


def test_open_dataset_has_sample_class_and_level_coordinates_lazily(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 6)
    zarr_store.create_store(tmp_path / "a", {
        "sample": ArraySpec((6,), str, ("sample",), fill_value=""),
        "label": ArraySpec((6,), np.int64, ("sample",), fill_value=-1),
        "level": ArraySpec((2,), np.int64, ("level",), per_sample=False),
        "regions": ArraySpec((6, 2, 3, 3), np.int16, ("sample", "level", "gy", "gx"))}, 4,
        {"stage": "t", "classes": ["cat", "dog", "eel"]})
    ids = np.array([f"img-{i}" for i in range(6)])
    zarr_store.write_array(tmp_path / "a", "sample", ids)
    zarr_store.write_array(tmp_path / "a", "label", labels)
    zarr_store.write_array(tmp_path / "a", "level", np.array([0, 1]))
    ds = zarr_store.open_dataset(tmp_path / "a")
    assert set(ds.coords) >= {"sample", "label", "class", "level"}
    assert ds["regions"].chunks is not None   # lazy (dask), not loaded
    assert ds["class"].chunks is not None and ds["class"].dims == ("sample",)
    assert list(ds["sample"].values) == list(ids) and ds["level"].values.tolist() == [0, 1]
    assert np.array_equal(ds["class"].values, labels) and np.array_equal(ds["label"].values, labels)
    assert ds.attrs["classes"] == ["cat", "dog", "eel"]
    assert ds["regions"].sel(sample="img-4").shape == (2, 3, 3)   # ids select rows
    assert np.array_equal(ds["regions"].coords["class"].values, labels)

    # a store without ids or a level array: integer index coordinates
    zarr_store.create_store(tmp_path / "b", {
        "x": ArraySpec((5, 3), np.float32, ("sample", "level"))}, 4, {"stage": "t"})
    ds = zarr_store.open_dataset(tmp_path / "b")
    assert ds["sample"].values.tolist() == list(range(5)) and ds["level"].values.tolist() == [0, 1, 2]
    assert "class" not in ds.coords


def test_bfloat16_round_trip_equals_torch_rounding_and_float16_is_unchanged(tmp_path):
    """encoder.dtype bfloat16: latents stored as uint16 bit patterns with an attribute; every
    reader (read_floats, open_dataset, load_latents) gets float32 equal to torch's bf16 rounding."""
    import torch

    from tasks.encode.stage import latent_store_arrays
    from tasks.train.level_data import load_latents

    rng = np.random.default_rng(2)
    tokens = (rng.standard_normal((10, 2, 2, 8)) * 10.0 ** rng.integers(-4, 4, (10, 2, 2, 8))).astype(np.float32)
    tokens.flat[:4] = [np.inf, -np.inf, 1.0e-40, -0.0]
    torch_bf16 = torch.from_numpy(tokens).to(torch.bfloat16).float().numpy()
    for dtype in ("bfloat16", "float16"):
        path = tmp_path / dtype
        zarr_store.create_store(path, latent_store_arrays(10, 3, 2, 8, dtype), 4, {"stage": "latents"})
        for chunk, (start, stop) in enumerate(zarr_store.chunk_bounds(10, 4)):
            zarr_store.write_chunk(path, chunk, start, {"tokens": zarr_store.encode_floats(tokens[start:stop], dtype),
                                                        "valid": np.ones(stop - start, bool),
                                                        "label": np.zeros(stop - start, np.int64)})
        zarr_store.write_array(path, "mean", np.zeros(8, np.float32))
        zarr_store.write_array(path, "std", np.ones(8, np.float32))
        array = zarr_store.open_array(path, "tokens")
        expected = torch_bf16 if dtype == "bfloat16" else tokens.astype(np.float16).astype(np.float32)
        if dtype == "bfloat16":
            assert array.dtype == np.uint16 and array.attrs["float_encoding"] == "bfloat16"
        else:
            assert array.dtype == np.float16 and "float_encoding" not in array.attrs
        got = zarr_store.read_floats(array)
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))   # bit-exact, -0.0 and inf included
        ds = zarr_store.open_dataset(path)
        assert ds["tokens"].dtype == (np.float32 if dtype == "bfloat16" else np.float16)   # float16 as before
        assert ds["tokens"].chunks is not None   # decoded lazily
        assert np.array_equal(ds["tokens"].values.astype(np.float32).view(np.uint32), expected.view(np.uint32))
        rows = np.array([1, 5, 9])
        assert np.array_equal(zarr_store.read_floats(array, rows, orthogonal=True), expected[rows])
        with_attrs = {"encoder_weights": "w"}
        zarr_store.create_store(path, latent_store_arrays(10, 3, 2, 8, dtype), 4, {"stage": "latents"})  # resume ok
        group = zarr.open_group(str(zarr_store.zarr_path(path)), mode="r+")
        group.attrs.update(with_attrs)
        latents = load_latents(path)
        finite = np.isfinite(expected).all(axis=(1, 2, 3))
        assert np.array_equal(latents.normalised().numpy()[finite], expected.reshape(10, 4, 8)[finite])
    nan = zarr_store.encode_floats(np.array([np.nan], np.float32), "bfloat16")
    assert np.isnan(zarr_store.decode_floats(nan, {"float_encoding": "bfloat16"})).all()   # NaN stays NaN (payload not kept)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stage_chunks_are_shards_written_directly_and_read_back_exactly(tmp_path, dtype):
    """A stage chunk of a per-sample block array is one shard of 64-row inner chunks. Whole raw
    shards are written as files (data + zarr's shard index); the partial last shard goes through
    zarr. zarr, xarray (dask chunks = shards) and random row reads give back every value."""
    rng = np.random.default_rng(3)
    n, chunk = 300, 128   # shards of 128 rows: two whole, one of 44 rows
    tokens = rng.standard_normal((n, 2, 2, 6)).astype(np.float32)
    stored, attrs = zarr_store.float_storage(dtype)
    encoded = zarr_store.encode_floats(tokens, dtype)
    path = tmp_path / "s"
    zarr_store.create_store(path, {
        "raw": ArraySpec(tokens.shape, stored, ("sample", "gy", "gx", "channel"), compressed=False, attrs=attrs),
        "packed": ArraySpec(tokens.shape, stored, ("sample", "gy", "gx", "channel"), attrs=attrs),
        "odd": ArraySpec((n, 3), "int16", ("sample", "k"), compressed=False, inner_rows=48),
        "label": ArraySpec((n,), "int64", ("sample",), compressed=False)}, chunk, {"stage": "test"})
    group = zarr.open_group(str(zarr_store.zarr_path(path)), mode="r")
    assert group["raw"].shards == (128, 2, 2, 6) and group["raw"].chunks == (64, 2, 2, 6)
    assert group["odd"].shards == (128, 3) and group["odd"].chunks == (32, 3)   # largest divisor of 128 <= 48
    assert group["label"].shards is None and group["label"].chunks == (128,)
    odd = rng.integers(-1000, 1000, (n, 3)).astype(np.int16)
    for c, (start, stop) in enumerate(zarr_store.chunk_bounds(n, chunk)):
        meta = {name: zarr_store._array_meta(zarr_store.zarr_path(path) / name) for name in ("raw", "packed")}
        direct = zarr_store._raw_chunk_file(meta["raw"], tmp_path, start, encoded[start:stop])
        assert (direct is not None) == (stop - start == chunk)
        assert zarr_store._raw_chunk_file(meta["packed"], tmp_path, start, encoded[start:stop]) is None
        zarr_store.write_chunk(path, c, start, {"raw": encoded[start:stop], "packed": encoded[start:stop],
                                                "odd": odd[start:stop], "label": np.arange(start, stop)})
    expected = zarr_store.decode_floats(encoded, attrs)
    for name in ("raw", "packed"):
        assert np.array_equal(zarr_store.read_floats(group[name]), expected)
        rows = np.array([0, 63, 64, 200, 299])
        assert np.array_equal(zarr_store.read_floats(group[name], rows, orthogonal=True), expected[rows])
    assert np.array_equal(group["odd"][:], odd) and np.array_equal(group["label"][:], np.arange(n))
    ds = zarr_store.open_dataset(path)
    assert ds["raw"].chunks[0] == (128, 128, 44) and ds["label"].chunks[0] == (128, 128, 44)
    assert np.array_equal(ds["raw"].values, expected) and np.array_equal(ds["odd"].values, odd)
    # our shard file is byte for byte what zarr writes for the same shard
    mine = (zarr_store.zarr_path(path) / "raw" / "c" / "1" / "0" / "0" / "0").read_bytes()
    twin = zarr.create_array(store=str(tmp_path / "twin.zarr"), shape=tokens.shape, chunks=(64, 2, 2, 6),
                             shards=(128, 2, 2, 6), dtype=stored, compressors=None)
    twin[128:256] = encoded[128:256]
    assert mine == (tmp_path / "twin.zarr" / "c" / "1" / "0" / "0" / "0").read_bytes()
    assert not list(zarr_store.zarr_path(path).rglob(".*.tmp"))   # no temp files left


def test_raw_writes_match_zarrs_own_files_and_unknown_layouts_go_through_zarr(tmp_path):
    """The raw path is decided from zarr.json (the spec's document, the same in zarr 3.1 and 3.4): a
    plain raw chunk is byte for byte the file zarr writes; a layout it does not know (another codec,
    another key separator, big-endian bytes, another dtype than the data's) is left to zarr."""
    rng = np.random.default_rng(5)
    data = rng.integers(-30000, 30000, (8, 3, 5)).astype(np.int16)
    path = tmp_path / "s"
    zarr_store.create_store(path, {"plain": ArraySpec(data.shape, "int16", ("sample", "a", "b"), compressed=False,
                                                      inner_rows=8)}, 4, {"stage": "test"})
    folder = zarr_store.zarr_path(path) / "plain"
    meta = zarr_store._array_meta(folder)
    assert zarr_store._raw_chunk_file(meta, folder, 4, data[4:8]) is not None
    assert zarr_store._raw_chunk_file(meta, folder, 4, data[4:8].astype(np.int32)) is None   # another dtype
    assert zarr_store._raw_chunk_file(meta, folder, 2, data[2:6]) is None                    # not chunk-aligned
    zarr_store.write_chunk(path, 1, 4, {"plain": data[4:8]})
    twin = zarr.create_array(store=str(tmp_path / "twin.zarr"), shape=data.shape, chunks=(4, 3, 5), dtype="int16",
                             compressors=None)
    twin[4:8] = data[4:8]
    assert (folder / "c" / "1" / "0" / "0").read_bytes() == (tmp_path / "twin.zarr" / "c" / "1" / "0" / "0").read_bytes()
    for change in ({"codecs": [{"name": "bytes", "configuration": {"endian": "big"}}]},
                   {"codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}]},
                   {"chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}}},
                   {"chunk_key_encoding": {"name": "v2", "configuration": {"separator": "/"}}},
                   {"data_type": "complex64"}, {"storage_transformers": [{"name": "x"}]}):
        assert zarr_store._raw_chunk_file(meta | change, folder, 4, data[4:8]) is None, change


def test_every_file_of_a_chunk_is_fsynced_before_its_marker(tmp_path, monkeypatch):
    """Markers follow durable data: each chunk (or shard) file of the region, raw or written by zarr, and
    its folder are fsynced before the marker exists."""
    import os

    path = tmp_path / "s"
    zarr_store.create_store(path, {
        "raw": ArraySpec((8, 4, 2), "float16", ("sample", "a", "b"), compressed=False),
        "packed": ArraySpec((8, 4, 2), "float32", ("sample", "a", "b")),
        "label": ArraySpec((8,), "int64", ("sample",))}, 4, {"stage": "test"})
    marker = path / zarr_store.MARKERS / "000001.json"
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def watched(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), marker.exists()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watched)
    values = {"raw": np.ones((4, 4, 2), np.float16), "packed": np.full((4, 4, 2), 2.0, np.float32),
              "label": np.arange(4, 8)}
    zarr_store.write_chunk(path, 1, 4, values)
    root = zarr_store.zarr_path(path).resolve()
    before_marker = {Path(p) for p, marker_there in synced if not marker_there}
    for name in values:
        chunk_file = root / name / "c" / "1" / "0" / "0" if name != "label" else root / name / "c" / "1"
        assert chunk_file in before_marker, name
        assert chunk_file.parent in before_marker, name
    assert marker.exists()


def test_stored_rows_read_as_files_equal_zarrs_reads(tmp_path):
    """read_stored reads whole raw shards as files and the rest (the partial last shard) through zarr: any
    rows, in any order, come back as zarr gives them."""
    rng = np.random.default_rng(7)
    n, chunk = 300, 128
    data = rng.standard_normal((n, 2, 3)).astype(np.float16)
    path = tmp_path / "s"
    zarr_store.create_store(path, {"raw": ArraySpec(data.shape, "float16", ("sample", "a", "b"), compressed=False,
                                                    inner_rows=32),
                                   "packed": ArraySpec(data.shape, "float16", ("sample", "a", "b"))}, chunk, {})
    for c, (start, stop) in enumerate(zarr_store.chunk_bounds(n, chunk)):
        zarr_store.write_chunk(path, c, start, {"raw": data[start:stop], "packed": data[start:stop]})
    rows = np.array([299, 0, 5, 130, 127, 256, 5])
    for name in ("raw", "packed"):
        assert np.array_equal(zarr_store.read_stored(path, name, rows), data[rows])
    assert np.array_equal(zarr_store.read_stored(path, "raw", np.arange(n)), data)


def test_a_few_stored_rows_are_read_as_their_own_bytes(tmp_path, monkeypatch):
    """A sample spread over a store (the encode stage's check) reads only its rows from a raw shard, not the
    shard, and gets what zarr gives."""
    rng = np.random.default_rng(8)
    n, chunk = 256, 128
    data = rng.standard_normal((n, 4, 5)).astype(np.float16)
    path = tmp_path / "s"
    zarr_store.create_store(path, {"raw": ArraySpec(data.shape, "float16", ("sample", "a", "b"), compressed=False,
                                                    inner_rows=32)}, chunk, {})
    for c, (start, stop) in enumerate(zarr_store.chunk_bounds(n, chunk)):
        zarr_store.write_chunk(path, c, start, {"raw": data[start:stop]})
    counts, real = [], np.fromfile

    def fromfile(file, dtype, count=-1, **kwargs):
        counts.append(count)
        return real(file, dtype=dtype, count=count, **kwargs)

    monkeypatch.setattr(zarr_store.np, "fromfile", fromfile)
    rows = np.array([200, 3, 100, 3])
    assert np.array_equal(zarr_store.read_stored(path, "raw", rows), data[rows])
    assert counts == [20] * 4   # four rows of 4 x 5 values, nothing more
    counts.clear()
    assert np.array_equal(zarr_store.read_stored(path, "raw", np.arange(0, n, 2)), data[::2])
    assert counts == [128 * 20] * 2   # half of every shard: the shards whole
    counts.clear()
    assert np.array_equal(zarr_store.read_stored(path, "raw", np.arange(n)), data)
    assert counts == []   # every shard whole and in order: read straight into the result, no copy between

    shard = zarr_store.zarr_path(path) / "raw" / "c" / "1" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:100])   # a short file is an error, never rows of garbage
    with pytest.raises(OSError, match="short"):
        zarr_store.read_stored(path, "raw", np.arange(n))
