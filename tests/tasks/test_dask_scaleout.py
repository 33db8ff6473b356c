"""Encode over an existing Dask scheduler: chunks carry resources={"GPU": 1}, so they run only on
the worker started with `--resources GPU=1`, and give the same latents and statistics as the
in-process encode. Real scheduler and worker processes on 127.0.0.1, stopped by process group."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from storage import zarr_store
from storage.config import load_config
from storage.keys import Layout

REPO = Path(__file__).parents[2]
CONFIG = REPO / "configs" / "tiny.yaml"


def _scheduler_address(scheduler_file: Path, proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The address a scheduler started with --port 0 bound, from its --scheduler-file: no port is picked
    in advance, so no other process can take it between the pick and the bind."""
    import json
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return json.loads(scheduler_file.read_text())["address"]
        time.sleep(0.05)
    raise RuntimeError(f"the Dask scheduler wrote no {scheduler_file.name} (exit {proc.poll()})")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def dask_cluster(logs: Path):
    """Scheduler + cpu-worker + gpu-worker (GPU=1) as separate processes; yields (address, gpu, cpu)."""
    from distributed import Client

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    dask = [sys.executable, "-m", "dask"]
    logs.mkdir(parents=True, exist_ok=True)
    scheduler_file = logs / "scheduler.json"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start(dask + ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                    "--scheduler-file", str(scheduler_file)], logs, "scheduler", env))
        address = _scheduler_address(scheduler_file, procs[0])
        worker = ["worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"]
        procs.append(_start(dask + worker + ["--name", "cpu-worker"], logs, "cpu-worker", env))
        procs.append(_start(dask + worker + ["--name", "gpu-worker", "--resources", "GPU=1"], logs, "gpu-worker", env))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
            names = {w["name"]: addr for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        yield address, names["gpu-worker"], names["cpu-worker"]
    except Exception:
        for log in sorted(logs.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        raise
    finally:
        for proc in reversed(procs):   # workers first, then the scheduler
            _stop(proc)


def test_encode_chunks_run_on_the_gpu_worker_and_match_the_in_process_encode(tmp_path):
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    remote_root, local_root = tmp_path / "dask", tmp_path / "local"
    with dask_cluster(tmp_path / "logs") as (address, gpu_worker, cpu_worker):
        cfg = load_config(CONFIG, [f"ingest.dask_address={address}"])
        ingest = ingest_images.fn(cfg, str(remote_root))
        result = encode_latents.fn(cfg, str(remote_root))
    assert ingest["status"] == result["status"] == "computed"
    assert result["encoder_weights"] == "random-init"

    layout = Layout(remote_root, cfg)
    infos = zarr_store.chunk_infos(layout.latents())
    num_chunks = len(zarr_store.chunk_bounds(cfg.source.num_images, cfg.ingest.chunk_size))
    assert len(infos) == num_chunks == 3
    assert all(info["worker"] == gpu_worker != cpu_worker for info in infos), infos
    assert all(info["cuda"] is False and info["device"] == "cpu" for info in infos)  # tiny.yaml: device cpu
    for name in ("chunk_count", "chunk_mean", "chunk_m2"):   # one Zarr chunk per encode chunk: no shared files
        assert zarr_store.open_array(layout.latents(), name).chunks[0] == 1

    # The same images, encoded in-process (no dask_address) on a second root.
    local_cfg = load_config(CONFIG)
    local = Layout(local_root, local_cfg)
    assert local.keys.latents == layout.keys.latents
    shutil.copytree(layout.images(), local.images())
    encode_latents.fn(local_cfg, str(local_root))
    assert all(info["worker"] is None for info in zarr_store.chunk_infos(local.latents()))

    remote_ds, local_ds = zarr_store.open_dataset(layout.latents()), zarr_store.open_dataset(local.latents())
    tokens = remote_ds["tokens"].values
    assert tokens.dtype == np.float16 and tokens.shape == (48, 4, 4, 384)
    np.testing.assert_allclose(tokens.astype(np.float32), local_ds["tokens"].values.astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    assert np.array_equal(remote_ds["label"].values, local_ds["label"].values)
    assert np.array_equal(remote_ds["valid"].values, local_ds["valid"].values)
    flat = tokens[remote_ds["valid"].values].reshape(-1, 384).astype(np.float64)
    np.testing.assert_allclose(remote_ds["mean"].values, flat.mean(0), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(remote_ds["std"].values, np.sqrt(flat.var(0) + 1e-6), rtol=1e-3, atol=1e-3)


def test_gpu_chunks_without_a_gpu_worker_fail_with_how_to_instead_of_hanging():
    import pytest
    from distributed import Client, LocalCluster

    from tasks.dask_chunks import wait_for_resources

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        with pytest.raises(RuntimeError, match="--resources GPU=1"):
            wait_for_resources(client, {"GPU": 1}, timeout=0)


def _start(command: list, logs: Path, name: str, env: dict) -> subprocess.Popen:
    with open(logs / f"{name}.log", "wb") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def test_losing_every_worker_mid_run_fails_within_the_timeout_and_the_next_run_resumes(tmp_path):
    """A real scheduler and one worker without a nanny (so nothing restarts it); the worker is
    SIGKILLed after the first chunk's marker: the run stops with NoWorkers naming the scheduler
    instead of waiting; with a new worker, the chunks without a marker run, each exactly once."""
    import threading
    import time

    from distributed import Client

    from tasks.dask_chunks import NoWorkers, run_chunks

    logs, markers = tmp_path / "logs", tmp_path / "markers"
    logs.mkdir()
    markers.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    dask = [sys.executable, "-m", "dask"]

    def chunk(index: int, folder: str, pause: float) -> int:   # nested: pickled by value, nothing to import
        import time
        from pathlib import Path

        time.sleep(pause)   # first run 0.2 s: 12 chunks of 2.4 s in all, the kill after the first marker lands mid-run
        marker = Path(folder) / f"{index}.{time.time_ns()}"   # one file per execution: repeats would show
        marker.write_text("done")
        return index

    procs = [_start(dask + ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                            "--scheduler-file", str(logs / "scheduler.json")], logs, "scheduler", env)]
    try:
        address = _scheduler_address(logs / "scheduler.json", procs[0])
        worker = dask + ["worker", address, "--no-nanny", "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"]
        procs.append(_start(worker, logs, "worker-1", env))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=60)
        args = [(i, str(markers), 0.2) for i in range(12)]
        killer_done = []

        def kill_after_first_marker() -> None:
            deadline = time.monotonic() + 60
            while not any(markers.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.05)
            _stop_now(procs[1])
            killer_done.append(time.monotonic())

        killer = threading.Thread(target=kill_after_first_marker)
        killer.start()
        raised: list = []

        def first_run() -> None:   # in a thread: a hang in run_chunks fails the test instead of the suite
            try:
                run_chunks(chunk, args, description="test", address=address, workers=1, worker_loss_timeout=3.0)
            except BaseException as error:   # noqa: BLE001
                raised.append(error)

        runner = threading.Thread(target=first_run, daemon=True)
        runner.start()
        runner.join(timeout=120)
        assert not runner.is_alive(), ("run_chunks neither finished nor raised NoWorkers in 120 s: a chunk that "
                                       "finished on the killed worker is gathered from it (future.result blocks)")
        failed_at = time.monotonic()
        assert len(raised) == 1 and isinstance(raised[0], NoWorkers), raised
        assert f"no Dask worker left on scheduler {address}" in str(raised[0])
        killer.join()
        assert failed_at - killer_done[0] < 3.0 + 10.0   # the timeout plus polling and the scheduler's notice

        done = {int(p.name.split(".")[0]) for p in markers.iterdir()}
        assert 0 < len(done) < len(args)
        procs.append(_start(worker, logs, "worker-2", env))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=60)
        # what a stage resumes: the chunks without a marker (nothing to land a kill in now: no pause)
        rest = [(i, folder, 0.0) for i, folder, _ in args if i not in done]
        assert run_chunks(chunk, rest, description="test", address=address, workers=1) == [a[0] for a in rest]
        executions = sorted(int(p.name.split(".")[0]) for p in markers.iterdir())
        assert executions == list(range(len(args)))   # every chunk ran, and exactly once
    except Exception:
        for log in sorted(logs.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        raise
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _stop_now(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
