"""Multi-GPU (or multi-process CPU) training of one generator with torchrun + DistributedDataParallel.

    torchrun --nproc_per_node=4 -m tasks.train.ddp --config configs/imagenet.yaml --root data --level 2
    torchrun --nproc_per_node=4 -m tasks.train.ddp --config ... --root ... --flat

Plain torch, no Prefect run: it reads the same stores and writes the same stage folder as the
`train-level-l` task (final checkpoints, `_COMPLETE`, resumable snapshots), so either can finish
what the other started. Every rank draws the same global batch and noise and trains on its own
rows; DDP averages the gradients, so N ranks follow the single-process run with the same global
batch (generator.batch_size) up to float summation order. Only rank 0 writes. NCCL on CUDA, gloo
on CPU. `--synthetic SEED` trains a tiny model on random data instead of the stores (for tests).
"""
from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models.generator.dit import TrajectoryDiT
from models.generator.train_loop import LevelData, train_generator
from models.generator.train_state import export_state
from storage.checkpoints import is_complete, load_train_state, save_train_state
from storage.config import TFConfig, load_config
from storage.files import atomic_write_json
from tasks.train.generator_job import SHARED, GeneratorJob, finish_generator, generator_job
from tasks.plan import generator_config, generator_optim, objective_config, sampled_ema
from tasks.stage import divergence_named

SYNTHETIC_MODEL = dict(width=32, depth=2, head_depth=1, heads=2)   # on 4 x 4 tokens of 8 channels, 3 classes


def synthetic_job(seed: int, folder: Path, steps: int, batch_size: int, optimizer: str, checkpoint_every: int,
                  jvp_attention: str = "auto") -> GeneratorJob:
    """A tiny model on random data: the same training path without the stores, its specs built by the
    plan from a config as a store's job's are (constant-decay EMAs 0.9 and 0.99, the sampler's 0.99)."""
    g = torch.Generator().manual_seed(seed)
    data = LevelData(torch.randn(32, 16, 8, generator=g), torch.zeros(8), torch.ones(8),
                     torch.randint(0, 3, (32,), generator=g), torch.randint(0, 3, (32, 16), generator=g),
                     torch.randint(0, 2, (32, 16), generator=g))
    cfg = TFConfig(generator={**SYNTHETIC_MODEL, "batch_size": batch_size, "optimizer": optimizer, "warmup_steps": 2,
                              "checkpoint_every": checkpoint_every, "jvp_attention": jvp_attention,
                              "ema_kind": "constant", "ema_decay": 0.99, "ema_decays": [0.9], "ema_halflives_kimg": []})
    torch.manual_seed(seed)
    model = TrajectoryDiT(generator_config(cfg, grid=4, dim=8, num_classes=3))
    return GeneratorJob(model, data, 1, objective_config(cfg), generator_optim(cfg, seed, steps), sampled_ema(cfg),
                        folder, f"synthetic-{seed}", {"stage": "generator", "synthetic": True, "seed": seed})


def store_job(args) -> GeneratorJob:
    cfg = load_config(args.config, args.set)
    return generator_job(cfg, args.root, None if args.flat else SHARED if args.shared else args.level)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config")
    parser.add_argument("--root", default="data")
    parser.add_argument("--level", type=int)
    parser.add_argument("--flat", action="store_true", help="train the flat baseline instead of a level")
    parser.add_argument("--shared", action="store_true", help="train the one generator shared by every level")
    parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    parser.add_argument("--synthetic", type=int, metavar="SEED", help="tiny model on random data (tests)")
    parser.add_argument("--out", help="stage folder for --synthetic")
    parser.add_argument("--steps", type=int, default=6, help="--synthetic only (else generator.steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="--synthetic only: the global batch")
    parser.add_argument("--optimizer", default="adamw", help="--synthetic only")
    parser.add_argument("--checkpoint-every", type=int, default=2, help="--synthetic only")
    parser.add_argument("--jvp-attention", default="auto", help="--synthetic only: kernel | math | auto")
    args = parser.parse_args(argv)
    if args.synthetic is None and (args.config is None or [args.level is not None, args.flat, args.shared].count(True) != 1):
        parser.error("give --config and exactly one of --level L / --flat / --shared (or --synthetic SEED --out DIR)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if args.synthetic is not None:
        job = synthetic_job(args.synthetic, Path(args.out), args.steps, args.batch_size, args.optimizer,
                            args.checkpoint_every, args.jvp_attention)
    else:
        job = store_job(args)
    folder = job.folder
    writes: list[str] = []

    def on_checkpoint(state) -> None:
        if rank == 0:   # identical states on every rank: one writer
            writes.append(save_train_state(folder, "generator", state.step, *export_state(state)).name)

    is_complete_before = is_complete(folder)
    if not is_complete_before:
        resume = load_train_state(folder, "generator")
        wrap = (lambda m: DistributedDataParallel(m, device_ids=[local])) if cuda else DistributedDataParallel
        with divergence_named(f"train {folder.name} (torchrun)", folder):   # every rank reads the same flag and stops
            state = train_generator(job.model, job.data, job.level, job.objective, job.optim,
                                    device, resume=resume,
                                    on_checkpoint=on_checkpoint, rank=rank, world=world, wrap=wrap)
        dist.barrier()
        if rank == 0:
            finish_generator(job, state, world_size=world)
            writes.append("final")
    if os.environ.get("TF_DDP_WRITE_LOG"):   # for tests: which rank wrote what, and its own-rows losses
        # loss_u: the raw mean square of its rows (the adaptive loss sits near 1 for any rows)
        losses = state.history.get("loss_u", []) if not is_complete_before else []
        atomic_write_json(Path(os.environ["TF_DDP_WRITE_LOG"]) / f"rank{rank}.json",
                          {"writes": writes, "losses": losses})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
