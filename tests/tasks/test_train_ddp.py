"""torchrun --nproc_per_node=2 (gloo, CPU) equals one process with the same global batch; rank 0 alone writes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.generator.train_loop import train_generator
from storage.checkpoints import is_complete, load_checkpoint
from tasks.train.ddp import synthetic_job

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH, SEED = 4, 8, 5


def torchrun() -> list[str]:
    runner = Path(sys.executable).with_name("torchrun")
    if runner.exists():
        return [str(runner)]
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed next to the interpreter")
    return ["torchrun"]


@pytest.mark.parametrize("jvp_attention", ["math", "kernel"])   # kernel: the forward hands its values through DDP
def test_two_ranks_equal_one_process_and_only_rank0_writes(tmp_path, jvp_attention):
    # AdamW: the ranks' float32 gradient all-reduce differs from one process only in summation order
    # (seen: 1.5e-8). Muon would amplify that to bf16 rounding (its Newton-Schulz runs in bfloat16;
    # seen: 4.6e-5 after 4 steps), which says nothing about DDP, so it is not the optimiser here.
    optimizer = "adamw"
    out, log = tmp_path / "stage", tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "TF_DDP_WRITE_LOG": str(log), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = torchrun() + ["--standalone", "--nproc_per_node=2", "-m", "tasks.train.ddp",
                            "--synthetic", str(SEED), "--out", str(out), "--steps", str(STEPS),
                            "--batch-size", str(BATCH), "--optimizer", optimizer, "--checkpoint-every", "2",
                            "--jvp-attention", jvp_attention]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert is_complete(out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["generator-ema0_9.safetensors",
                                                                  "generator-raw.safetensors", "generator.safetensors"]

    # The same job in one process, global batch BATCH on one rank.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        job = synthetic_job(SEED, tmp_path / "single", STEPS, BATCH, optimizer, 0, jvp_attention)
        state = train_generator(job.model, job.data, job.level, job.objective, job.optim, "cpu")
    finally:
        torch.set_num_threads(previous)
    distributed, meta = load_checkpoint(out / "generator-raw")
    assert meta["world_size"] == 2 and meta["steps"] == STEPS
    single = state.model.state_dict()
    worst = max(float((distributed[k] - single[k]).abs().max()) for k in single)
    moved = max(float((single[k] - v).abs().max()) for k, v in synthetic_job(SEED, tmp_path, 1, BATCH, optimizer,
                                                                                  0).model.state_dict().items())
    assert moved > 5e-4            # training moved the weights, so agreement is not trivial
    assert worst < 1e-6, worst     # float32 all-reduce sums in a different order: not bit-identical
    ema, _ = load_checkpoint(out / "generator")   # the sampled EMA (decay 0.99) is written too
    assert max(float((ema[k] - state.ema(0.99).state_dict()[k]).abs().max()) for k in single) < 1e-6

    logs = {rank: json.loads((log / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    writes = {rank: logs[rank]["writes"] for rank in (0, 1)}
    # Each rank's raw loss_u is over its own half of the global batch: the halves differ, and (every loss
    # term being a per-sample mean) their average is the one-process value of the whole batch.
    first = [logs[rank]["losses"][0] for rank in (0, 1)]
    assert abs(first[0] - first[1]) > 1e-2 * max(first)
    assert (first[0] + first[1]) / 2 == pytest.approx(state.history["loss_u"][0], rel=1e-5)
    assert writes[1] == []
    assert writes[0] == ["generator-state-000000002.safetensors", "final"]
    assert not list(out.glob("generator-state-*")) and not (out / "generator-train-state.json").exists()
