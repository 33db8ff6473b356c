"""Train: the decoder (tokens -> pixels), one mean-flow generator per level, and the flat baseline.

Every training task resumes: each `checkpoint_every` steps the whole training state (weights,
optimisers, EMAs, RNGs, step) is snapshotted into the stage folder, and a re-run after a kill
continues from the latest snapshot, reaching the same weights as an unbroken run. The end of a
run writes the final checkpoints, then the `_COMPLETE` marker, then drops the snapshots.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch

from models.decoder import TokenDecoder, images_to_tensor, tensor_to_images
from models.generator.dit import TrajectoryDiT
from models.evaluation.image_metrics import psnr, ssim
from models.generator.train_loop import train_decoder, train_generator
from models.generator.train_state import ema_name
from storage.checkpoints import (clear_train_state, load_built, load_checkpoint, load_train_state, mark_complete,
                                 save_checkpoint)
from storage.config import TFConfig
from storage.keys import Layout
from tasks.train.generator_job import SHARED, finish_generator, generator_folder, generator_job, num_classes, snapshotter
from tasks.plan import DECODER_EMA_KIMG, decoder_spec, decoder_optim, generator_config
from tasks.ingest.stage import with_stored_pixels
from tasks.train.level_data import load_latents
from tasks.encode.phase_clock import Laps
from tasks.progress import Progress
from tasks.stage import Done, Stage, cpu_threads, divergence_named, pick_device, run_stage, stage_task


# Dense bf16 matrix rate of an H100 / H200 SXM (the vendor's figure DESIGN §7 measures MFU against).
HOPPER_BF16_FLOPS = 989e12


class StepClock:
    """Training throughput as the stage saw it: wall time from the end of step `skip` (compilation and
    warm-up behind it) to the end of the last step, over the steps between. The loop reports a step's stats
    one step late, after waiting for that step's GPU work (train_loop.LaggedStats), so each `on_step` marks
    the end of a step; what the run does after its last step (the final check of every weight and EMA, the
    progress bar's close) is no step and is recorded beside as `after_last_step_s`. `rates` gives img/s,
    seconds per step and, on an H100 / H200, the model FLOPs utilisation for `flops_per_sample`."""

    def __init__(self, total: int, batch: int, skip: int | None = None):
        self.skip, self.batch = min(max(total // 10, 2), 20) if skip is None else skip, batch
        self.marks: dict[str, float] = {}
        self.steps = 0
        self.began = time.perf_counter()   # made just before training starts

    def on_step(self, step: int) -> None:
        self.steps = step + 1
        self.marks["last"] = time.perf_counter()   # this step's GPU work is done (its stats were read)
        if step + 1 == self.skip:
            self.marks["start"] = self.marks["last"]

    def rates(self, device: str, flops_per_sample: int | None = None) -> dict:
        if "start" not in self.marks or self.steps <= self.skip:
            return {}
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)   # nothing of the steps is queued by now; the end-of-run work may be
        seconds = (self.marks["last"] - self.marks["start"]) / (self.steps - self.skip)
        out = {"train_img_per_s": round(self.batch / seconds, 1), "step_s": round(seconds, 5),
               "timed_steps": self.steps - self.skip,
               "after_last_step_s": round(time.perf_counter() - self.marks["last"], 3)}
        name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else ""
        if flops_per_sample and ("H100" in name or "H200" in name):
            out["mfu"] = round(flops_per_sample * self.batch / seconds / HOPPER_BF16_FLOPS, 4)
            out["mfu_unit"] = "model FLOPs / step time / 989 TFLOP/s (dense bf16)"
        return out


def run_with_progress(description: str, total: int, start: int, train, clock: StepClock | None = None):
    """`train(on_step)` under a progress bar that starts at the resumed step."""
    def on_step(step: int, stats: dict) -> None:
        shown = {"loss": f"{stats['loss']:.4f}"}
        if "loss_u" in stats:   # the adaptive weights hold `loss` near its number of terms (2.0 at the final
            shown["mse_u"] = f"{stats['loss_u']:.4g}"   # level) while errors are large: the raw error moves
        bar.advance(1, **shown)
        if clock is not None:
            clock.on_step(step - start)

    with Progress(total, description, unit="step") as bar:
        if start:
            bar.advance(start)
        return train(on_step)


@stage_task("train-decoder")
def train_decoder_task(cfg: TFConfig, root: str, force: bool = False) -> dict:
    layout = Layout(root, cfg)
    stage = Stage("train-decoder", layout.keys.decoder, layout.decoder(), output="folder",
                  needs=[(layout.latents(), "encode"), (layout.images(), "ingest")])   # latents and their pixels
    return run_stage(cfg, stage, force, lambda: _train_decoder(cfg, layout))


def _train_decoder(cfg: TFConfig, layout: Layout) -> Done:
    folder = layout.decoder()
    device = pick_device(cfg.device)
    # the valid samples whose pixels the image store holds (all of them, but for ImageNet read from files)
    latents, pixels = with_stored_pixels(layout.images(), load_latents(layout.latents()))
    images = images_to_tensor(pixels)
    d = cfg.decoder
    torch.manual_seed(d.seed)
    decoder = TokenDecoder(decoder_spec(cfg, latents.grid, latents.dim))
    held = max(1, int(round(d.holdout * len(images))))
    train_idx, test_idx = np.arange(len(images) - held), np.arange(len(images) - held, len(images))
    history: dict[str, list[float]] = {}
    rates: dict = {}
    if d.checkpoint:  # a given decoder is validated here, not trained
        tensors, _ = load_checkpoint(d.checkpoint.removesuffix(".safetensors"))
        decoder.load_state_dict(tensors)
    else:
        # EDM EMA: its half-life ramps up with the images seen, so a short run is not its random init
        optim = decoder_optim(cfg)
        resume = load_train_state(folder, "decoder")
        start = resume[1]["step"] if resume else 0
        clock = StepClock(optim.steps - start, optim.batch_size)
        with cpu_threads(device), divergence_named("train-decoder", folder, "decoder"):
            state = run_with_progress("train decoder", optim.steps, start, lambda on_step:
                                      train_decoder(decoder, latents.normalised(train_idx), images[train_idx], optim,
                                                    device, on_step, resume=resume,
                                                    on_checkpoint=snapshotter(folder, "decoder")), clock)
        rates = clock.rates(device)
        decoder, history = state.ema(ema_name(halflife_kimg=DECODER_EMA_KIMG)), state.history
    with torch.no_grad():
        recon = tensor_to_images(decoder.to(device).eval()(latents.normalised(test_idx, device)).cpu())
    truth = tensor_to_images(images[test_idx])
    quality = {"holdout_psnr": float(np.mean([psnr(a, b) for a, b in zip(recon, truth)])),
               "holdout_ssim": float(np.mean([ssim(a, b) for a, b in zip(recon, truth)])),
               "holdout_n": int(held)}
    meta = {"stage": "decoder", "key": layout.keys.decoder, "latents_key": layout.keys.latents,
            "config": asdict(decoder.config), "encoder_weights": latents.weights_label,
            "final_loss": history["loss"][-1] if history else None, **quality}
    save_checkpoint(folder / "decoder", dict(decoder.cpu().state_dict()), meta)
    mark_complete(folder, {"stage": "decoder", "key": layout.keys.decoder})
    clear_train_state(folder, "decoder")   # after the marker: a kill between them leaves a complete decoder
    return Done(None, {**quality, **rates})


def _generator_stage(cfg: TFConfig, root: str, which: int | str | None, force: bool, name: str) -> dict:
    layout = Layout(root, cfg)
    folder, key = generator_folder(layout, which)
    needs = [(layout.latents(), "encode")] + ([] if which is None else [(layout.teacher(), "hierarchy")]) \
        + [(layout.images(), "ingest")]   # its class count
    stage = Stage(name, key, folder, output="folder", needs=needs)
    return run_stage(cfg, stage, force, lambda: _train_generator(cfg, root, which, name))


def _train_generator(cfg: TFConfig, root: str, which: int | str | None, name: str) -> Done:
    laps = Laps()   # where the stage's wall time goes besides its timed steps (recorded as wall_s)
    device = pick_device(cfg.device)
    job = generator_job(cfg, root, which, laps)
    resume = load_train_state(job.folder, "generator")   # a killed run continues from its latest snapshot
    start = resume[1]["step"] if resume else 0
    clock = StepClock(job.optim.steps - start, job.optim.batch_size)
    laps.lap("load_snapshot")
    with cpu_threads(device), divergence_named(name, job.folder):
        state = run_with_progress(f"train {name}", job.optim.steps, start, lambda on_step: train_generator(
            job.model, job.data, job.level, job.objective, job.optim, device, on_step,
            resume=resume, on_checkpoint=snapshotter(job.folder, "generator")), clock)
    rates = clock.rates(device, job.model.training_flops_per_sample(job.objective.v_tangent))
    laps.lap("train")
    if "start" in clock.marks:   # the steps before the timed ones: moving the data, the compile, warm-up
        laps.seconds["train_before_timed_steps"] = round(clock.marks["start"] - clock.began, 3)
    meta = finish_generator(job, state, resumed_from_step=start, **rates)   # writes the marker (shared with torchrun)
    laps.lap("save_checkpoints")
    return Done(None, {"final_loss": meta["final_loss"], "resumed_from_step": start, **rates,
                       "wall_s": laps.seconds})


@stage_task("train-level", task_run_name="train-level-{level}")
def train_level_task(cfg: TFConfig, root: str, level: int, force: bool = False) -> dict:
    return _generator_stage(cfg, root, level, force, f"train-L{level}")


@stage_task("train-shared")
def train_shared_task(cfg: TFConfig, root: str, force: bool = False) -> dict:
    """One generator for every level (generator.sharing: shared), level-conditioned."""
    return _generator_stage(cfg, root, SHARED, force, "train-shared")


@stage_task("train-flat")
def train_flat_task(cfg: TFConfig, root: str, force: bool = False) -> dict:
    """The flat baseline: one one-step model to the full latent, same backbone and step budget."""
    return _generator_stage(cfg, root, None, force, "train-flat")


def load_flat_generator(cfg: TFConfig, root: str, grid: int, dim: int, device: str = "cpu") -> TrajectoryDiT:
    layout = Layout(root, cfg)
    config = generator_config(cfg, grid, dim, num_classes(layout))
    model, _ = load_built(layout.flat_generator() / "generator", lambda _: TrajectoryDiT(config), device)
    return model.eval()
