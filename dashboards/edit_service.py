"""One live edit for the edit playground: load a run's models, apply and score an edit, store it as an edit object.

The edit itself and its numbers come from the evaluation's own code (models.generator.edit_suite.run_edit_suite on a
one-edit plan), so an edit made here is scored exactly like the stored edit suite: the parent and the donor
are re-sampled from their seeds in float32, the edited level changes inside the region only, finer levels
are re-sampled from the same noises. Results go to <root>/dashboard-edits/<edit id>/, the only place the
dashboard writes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dashboards.data import EDITS_FOLDER, RunFolders, load_trajectory, partition_of_level
from models.decoder import DecoderSpec, TokenDecoder, tensor_to_images
from models.generator.dit import DiTConfig, TrajectoryDiT
from models.generator.edit_suite import EDIT_KINDS, run_edit_suite
from models.generator.trajectory import level_noises, sample_trajectory
from storage import zarr_store
from storage.checkpoints import load_built
from storage.files import atomic_write_json
from storage.trajectory_store import new_edit_id, write_trajectories

EDIT_ID = re.compile(r"^edit-[0-9a-f]{10}$")
# The numbers shown next to an edit (all from run_edit_suite), in display order.
NUMBERS = ["locality_latent", "locality_pixel", "preservation_psnr_outside", "preservation_ssim_outside",
           "preservation_coarse_identical", "adherence", "adherence_baseline"]


@dataclass
class Models:
    generators: list[TrajectoryDiT]
    decoder: TokenDecoder
    grid: int
    patch: int
    device: str

    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([tensor_to_images(self.decoder(b.to(self.device)).cpu()) for b in tokens.split(64)])


def load_models(folders: RunFolders, device: str | None = None) -> Models:
    """Generators and decoder of a run, built from their checkpoint sidecars (no config file needed)."""
    if folders.decoder is None or not folders.generators:
        raise FileNotFoundError(f"run {folders.run_id} has no trained decoder/generators in its report")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = os.environ.get("TF_DASHBOARD_TORCH_THREADS")   # set by `tf dashboard` (dashboards/server.py)
    if device == "cpu" and threads:
        torch.set_num_threads(int(threads))
    loaded: dict = {}   # a shared generator is one folder named at every level: load it once
    for folder in folders.generators:
        if folder not in loaded:
            model, _ = load_built(folder / "generator", lambda meta: TrajectoryDiT(DiTConfig(**meta["config"])), device)
            loaded[folder] = model.eval()
    generators = [loaded[folder] for folder in folders.generators]
    decoder, meta = load_built(folders.decoder / "decoder", lambda meta: TokenDecoder(DecoderSpec(**meta["config"])),
                               device)
    config = DecoderSpec(**meta["config"])
    return Models(generators, decoder.eval(), config.grid, config.patch, device)


@dataclass(frozen=True)
class EditRequest:
    store: Path          # a trajectories.zarr of an evaluation
    parent: str          # trajectory id to edit
    level: int           # l*
    region: int          # region id of level l*'s partition (the finest partition for the last level)
    source: str          # "token_exchange" (the donor's tokens) or "region_mean" (the donor's mean over the region)
    donor: str           # trajectory id the source comes from (the parent itself is allowed for region_mean)


@dataclass
class EditResult:
    request: EditRequest
    original: np.ndarray          # [L, H, W, 3] decoded parent, per level
    edited: np.ndarray            # [L, H, W, 3] decoded edited trajectory, per level
    canvases: np.ndarray          # [L, g, g, C] edited canvases
    regions: np.ndarray           # [L-1, g, g] the parent's partitions (the edit's frame of reference)
    mask: np.ndarray              # [g, g] bool, the edited region
    numbers: dict[str, float]
    seed: int
    label: int
    seconds: float = 0.0
    record: dict = field(default_factory=dict)   # filled by save_edit


def validate(request: EditRequest, levels: int, regions: np.ndarray) -> None:
    if request.source not in EDIT_KINDS:
        raise ValueError(f"source must be one of {EDIT_KINDS}, got {request.source!r}")
    if not 0 <= int(request.level) < levels:
        raise ValueError(f"level {request.level} outside 0..{levels - 1}")
    present = np.unique(partition_of_level(regions, request.level))
    if int(request.region) not in present:
        raise ValueError(f"region {request.region} is not in level {request.level}'s partition {present.tolist()}")
    if request.source == "token_exchange" and request.donor == request.parent:
        raise ValueError("token exchange needs another trajectory as donor")


def run_edit(models: Models, request: EditRequest) -> EditResult:
    import time

    started = time.perf_counter()
    parent = load_trajectory(request.store, request.parent)
    donor = load_trajectory(request.store, request.donor)
    levels = len(models.generators)
    validate(request, levels, parent.regions)
    tokens, channels = models.grid * models.grid, parent.canvas.shape[-1]
    noises = level_noises(levels, tokens, channels, [parent.seed, donor.seed], models.device)
    labels = torch.tensor([parent.label, donor.label], device=models.device)
    snap = zarr_store.store_attrs(request.store).get("snap_threshold")   # the evaluation's sampler
    base = sample_trajectory(models.generators, noises, labels, snap_threshold=snap)
    # The suite reads regions per partitioned level as [samples, T]: row 0 the parent, row 1 the donor.
    regions = [np.stack([parent.regions[l].ravel(), donor.regions[l].ravel()]) for l in range(levels - 1)]
    spec = {"level": int(request.level), "parent": 0, "donor": 1, "region": int(request.region),
            "kind": request.source}
    values, edited = run_edit_suite(models.generators, noises, labels, base, regions, [spec], models.decode,
                                    models.grid, models.patch, snap)
    numbers = {v.metric: float(v.values[0]) for v in values}
    edited_levels = edited[0]
    original = np.stack([models.decode(c[:1])[0] for c in base], 0)
    edited_images = np.stack([models.decode(c)[0] for c in edited_levels], 0)
    mask = partition_of_level(parent.regions, request.level) == int(request.region)
    canvases = np.stack([c[0].float().cpu().numpy() for c in edited_levels]).reshape(levels, models.grid,
                                                                                     models.grid, channels)
    return EditResult(request, original, edited_images, canvases, parent.regions, mask,
                      {k: numbers[k] for k in NUMBERS if k in numbers}, parent.seed, parent.label,
                      time.perf_counter() - started)


def _inside(root: Path, path: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def edit_folder(root: str | Path, edit_id: str) -> Path:
    """<root>/dashboard-edits/<edit_id>; refuses ids that are not ours or paths that leave the root."""
    if not EDIT_ID.match(edit_id):
        raise ValueError(f"not an edit id: {edit_id!r}")
    folder = Path(root) / EDITS_FOLDER / edit_id
    if not _inside(Path(root) / EDITS_FOLDER, folder):
        raise ValueError(f"edit folder {folder} would leave the root {root}")
    return folder


def save_edit(root: str | Path, run_id: str, result: EditResult) -> dict:
    """Store the edit object: its result trajectory (Zarr, with parent) first, then edit.json last, atomically."""
    request = result.request
    if not _inside(root, request.store):
        raise ValueError(f"trajectory store {request.store} is not under the root {root}")
    edit_id = new_edit_id()
    folder = edit_folder(root, edit_id)
    levels = len(result.edited)
    grid = result.mask.shape[0]
    attrs = {"stage": "dashboard-edit", "run_id": run_id, "edit_id": edit_id}
    write_trajectories(folder / "trajectory.zarr", [f"{edit_id}-traj"], np.array([result.seed]),
                       np.array([result.label]), result.canvases[None], result.edited[None],
                       result.regions[None].reshape(1, levels - 1, grid, grid), attrs, parents=[request.parent])
    record = {"edit_id": edit_id, "parent": request.parent, "donor": request.donor, "level": int(request.level),
              "region": int(request.region), "source": request.source, "result": f"{edit_id}-traj",
              "run_id": run_id, "store": str(Path(request.store).resolve().relative_to(Path(root).resolve())),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "seconds": round(result.seconds, 3), **{k: v for k, v in result.numbers.items()}}
    atomic_write_json(folder / "edit.json", record)
    result.record = record
    return record
