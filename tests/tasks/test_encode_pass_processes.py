"""The direct encode pass split over spawned processes (tasks/encode/pass_processes.py, encoder.pass_processes):
the stores equal the single pass's, and a process that fails or dies stops the stage, naming it."""
import io
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage import zarr_store
from storage.config import load_config
from storage.keys import Layout
from storage.tables import load_rejects

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """14 JPEGs in two class folders, one of them truncated (a reject row), over 4 chunks of 4."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(1)
    for synset in ("n01", "n02"):
        (root / synset).mkdir()
        for i in range(7):
            shape = (60 + 4 * i, 80 - 2 * i, 3)
            (root / synset / f"{synset}_{i}.JPEG").write_bytes(_jpeg(rng.integers(0, 255, shape, np.uint8)))
    (root / "n02" / "n02_3.JPEG").write_bytes((root / "n01" / "n01_0.JPEG").read_bytes()[:300])
    return root


def _cfg(tree: Path, *more: str):
    return load_config(TINY, ["source.kind=imagefolder", f"source.path={tree}", "source.num_images=0",
                              "source.image_size=56", "ingest.chunk_size=4", "encoder.batch_size=3",
                              "encoder.stats_images=5", "hierarchy.backend=batched", "encoder.dtype=bfloat16",
                              *more])


def _encode(cfg, root: Path) -> dict:
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    ingest_images.fn(cfg, str(root))
    return encode_latents.fn(cfg, str(root), with_teacher=True)


def test_two_pass_processes_write_the_stores_one_pass_writes(tree, tmp_path):
    """Every chunk, its marker, the reject row, the statistics and the fused teacher's regions: the same as the
    pass in this process, value for value; each process's phase clock is on record, named."""
    one = _cfg(tree)
    two = _cfg(tree, "encoder.pass_processes=2")
    single = _encode(one, tmp_path / "one")
    split = _encode(two, tmp_path / "two")
    assert sorted(split["phases_s"]) == ["encode pass process 0 (cpu)", "encode pass process 1 (cpu)"]
    assert all(phases["ready_s"] > 0 for phases in split["phases_s"].values())
    assert (split["accepted"], split["rejected"]) == (single["accepted"], single["rejected"]) == (13, 1)
    a, b = Layout(tmp_path / "one", one), Layout(tmp_path / "two", two)
    assert a.latents().name == b.latents().name   # an unkeyed setting: the same store, reused by either
    chunks = len(zarr_store.chunk_bounds(14, 4))
    for name in ("tokens", "valid", "label", "chunk_count", "chunk_mean", "chunk_m2", "mean", "std"):
        assert np.array_equal(zarr_store.open_array(a.latents(), name)[:], zarr_store.open_array(b.latents(), name)[:],
                              equal_nan=True), name
    assert np.array_equal(zarr_store.open_array(a.teacher(), "regions")[:], zarr_store.open_array(b.teacher(), "regions")[:])
    assert all(zarr_store.chunk_done(b.latents(), c) and zarr_store.chunk_done(b.teacher(), c) for c in range(chunks))
    assert zarr_store.is_complete(b.latents()) and zarr_store.is_complete(b.teacher())
    assert list(load_rejects(b.latents()).path.str.endswith("n02_3.JPEG")) == [True]


@pytest.fixture(scope="module")
def ingested(tree, tmp_path_factory) -> Path:
    from tasks.ingest.stage import ingest_images

    root = tmp_path_factory.mktemp("ingested")
    ingest_images.fn(_cfg(tree), str(root))
    return root


def _setups(tree: Path, root: Path, count: int):
    """What the stage hands its pass processes, over an ingested image store."""
    from tasks.encode.pass_processes import PassSetup

    cfg = _cfg(tree)
    layout = Layout(root, cfg)
    return [PassSetup(cfg.encoder.model_dump(), cfg.source.model_dump(), str(layout.images()),
                      str(layout.latents()), "cpu", 1, None) for _ in range(count)]


def test_a_pass_process_that_fails_stops_the_run_naming_it_and_its_error(tree, ingested):
    """A process whose encoder is not the one the latent store was planned with gets no work: the parent raises
    with the process's name and both labels. One that fails in its pass raises with its own error: here its
    chunk's store was never made."""
    from tasks.encode.pass_processes import PassProcesses

    with pytest.raises(RuntimeError, match=r"encode pass process 0 \(cpu\) loaded encoder weights 'random-init', "
                                           r"but the latent store was planned with 'dinov2 from another file'"):
        with PassProcesses(_setups(tree, ingested, 1)) as helpers:
            helpers.run([([(0, 0, 4)], None)], lambda rows: None, "dinov2 from another file")
    with pytest.raises(RuntimeError, match=r"encode pass process 0 \(cpu\) failed: \w*(Error|Exception)") as failed:
        with PassProcesses(_setups(tree, ingested, 1)) as helpers:
            helpers.run([([(0, 0, 4)], None)], lambda rows: None, "random-init")
    assert "latents" in str(failed.value)   # the child's traceback names what it could not open


def test_a_pass_process_that_dies_without_a_word_stops_the_run(tree, ingested):
    """Killed (the host's OOM killer, a segfault in a decoder): no message comes, its exit does; the other
    process is ended with the stage."""
    from tasks.encode.pass_processes import PassProcesses

    with pytest.raises(RuntimeError, match=r"encode pass process 1 \(cpu\) exited with code -9 before finishing"):
        with PassProcesses(_setups(tree, ingested, 2)) as helpers:   # as the stage holds them
            os.kill(helpers.processes[1].pid, signal.SIGKILL)
            helpers.run([([], None), ([], None)], lambda rows: None, "random-init")
    assert not any(process.is_alive() for process in helpers.processes)
