"""A training process SIGKILLed mid-run and started again ends with exactly the weights of an unbroken run.

The child uses the same pieces as the train-level task: snapshots through tasks.train.generator_job's
snapshotter into a stage folder, resume from storage.checkpoints.load_train_state, and the final
write (per-EMA checkpoints, generator-raw, _COMPLETE).
"""
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from models.generator.train_loop import train_generator
from storage.checkpoints import is_complete, load_checkpoint
from storage.files import read_json
from tasks.train.ddp import synthetic_job

REPO = Path(__file__).resolve().parents[2]
STEPS, SEED = 12, 11
CHILD = f"""
import sys, time, torch
torch.set_num_threads(1)
from pathlib import Path
from models.generator.train_loop import train_generator
from storage.checkpoints import load_train_state
from tasks.train.generator_job import finish_generator, snapshotter
from tasks.train.ddp import synthetic_job
folder, pause = Path(sys.argv[1]), float(sys.argv[2])
job = synthetic_job({SEED}, folder, {STEPS}, 8, "muon", 2)
resume = load_train_state(folder, "generator")
print("start", resume[1]["step"] if resume else 0, flush=True)
state = train_generator(job.model, job.data, job.level, job.objective, job.optim, "cpu",
                        lambda step, stats: time.sleep(pause), resume=resume,
                        on_checkpoint=snapshotter(folder, "generator"))
finish_generator(job, state)
"""


def child(folder: Path, pause: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(pause)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkilled_training_resumes_to_the_unbroken_weights(tmp_path):
    folder = tmp_path / "generator-L1-test"
    pointer = folder / "generator-train-state.json"
    first = child(folder, pause=0.25)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if pointer.exists() and read_json(pointer)["step"] >= 4:
            break
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[1][-2000:]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    killed_at = read_json(pointer)["step"]
    assert 4 <= killed_at < STEPS and not is_complete(folder)

    second = child(folder, pause=0.0)
    with ThreadPoolExecutor(1) as pool:   # the unbroken run, in this process while the child resumes on its core
        unbroken = pool.submit(_unbroken, tmp_path / "unbroken")
        out, err = second.communicate(timeout=180)
        state = unbroken.result()
    assert second.returncode == 0, err[-2000:]
    assert out.split()[:2] == ["start", str(killed_at)]   # it resumed, it did not restart
    assert is_complete(folder) and not pointer.exists()

    for name, decay, expected in (("generator-raw", None, state.model), ("generator", "0.99", state.ema(0.99)),
                                  ("generator-ema0_9", "0.9", state.ema(0.9))):
        tensors, meta = load_checkpoint(folder / name)
        assert meta["steps"] == STEPS and meta.get("ema") == decay
        reference = expected.state_dict()
        assert set(tensors) == set(reference)
        assert [k for k in reference if not torch.equal(tensors[k], reference[k])] == [], name


def _unbroken(folder: Path):
    """The children's job trained without a kill, one thread as they use."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        job = synthetic_job(SEED, folder, STEPS, 8, "muon", 0)
        return train_generator(job.model, job.data, job.level, job.objective, job.optim, "cpu")
    finally:
        torch.set_num_threads(previous)


def test_snapshot_pointer_is_the_commit_point(tmp_path):
    """A kill between the tensors and the pointer leaves the previous snapshot readable and whole."""
    from storage.checkpoints import clear_train_state, load_train_state, save_train_state

    assert load_train_state(tmp_path, "generator") is None
    save_train_state(tmp_path, "generator", 2, {"w": torch.full((3,), 2.0)}, {"step": 2})
    # the next snapshot's tensors landed, its pointer did not (killed in between)
    (tmp_path / "generator-state-000000004.safetensors").write_bytes(b"partial")
    tensors, meta = load_train_state(tmp_path, "generator")
    assert meta["step"] == 2 and torch.equal(tensors["w"], torch.full((3,), 2.0))
    save_train_state(tmp_path, "generator", 4, {"w": torch.full((3,), 4.0)}, {"step": 4})
    assert [p.name for p in tmp_path.glob("generator-state-*")] == ["generator-state-000000004.safetensors"]
    assert load_train_state(tmp_path, "generator")[1]["step"] == 4
    clear_train_state(tmp_path, "generator")
    assert list(tmp_path.iterdir()) == []
