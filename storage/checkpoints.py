"""Checkpoints: safetensors weights plus a JSON sidecar, each written atomically.

The sidecar is written last, so a checkpoint exists only when both files do. Weights with a NaN or
an infinity are refused both ways (NonFiniteWeights, naming the file): a diverged run's weights are
never written as a checkpoint, and one written before this check is never loaded. A stage folder is
finished when `_COMPLETE` exists (written after its final checkpoints); training-state snapshots
for resume sit beside them until then.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file

from storage.files import atomic_write_by_name, atomic_write_json, read_json


def _paths(prefix: Path) -> tuple[Path, Path]:
    prefix = Path(prefix)
    return prefix.with_suffix(".safetensors"), prefix.with_suffix(".json")


class NonFiniteWeights(ValueError):
    """A checkpoint holds NaN or infinite weights: never written, never loaded."""


def refuse_nonfinite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Raise NonFiniteWeights naming `path` and its tensors that hold NaN or infinite values."""
    floats = {name: t for name, t in tensors.items() if t.is_floating_point() and t.numel()}
    if not floats:
        return
    # one reduction a tensor (NaN reaches both of aminmax's ends), read back once: isfinite(t).all() made a
    # mask as large as the weights and took 3 s for a 1 GB generator on 2 cores, this 0.3-0.9 s
    ends = torch.stack([torch.stack(torch.aminmax(t.detach())).float().cpu() for t in floats.values()])
    if bool(torch.isfinite(ends).all()):
        return
    bad = {name: int((~torch.isfinite(floats[name])).sum())
           for name, finite in zip(floats, torch.isfinite(ends).all(dim=1).tolist()) if not finite}
    if bad:
        named = ", ".join(f"{name} ({count})" for name, count in list(bad.items())[:3])
        raise NonFiniteWeights(f"{path} holds {sum(bad.values())} NaN or infinite values in {len(bad)} of its "
                               f"{len(tensors)} tensors ({named}{', ...' if len(bad) > 3 else ''}): "
                               f"the run that wrote them diverged")


def save_checkpoint(prefix: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    weights, sidecar = _paths(prefix)
    refuse_nonfinite(weights, tensors)   # where they are: on a GPU before the copy
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write_by_name(weights, partial(save_safetensors_file, flat))
    atomic_write_json(sidecar, meta)
    return weights


def checkpoint_exists(prefix: Path) -> bool:
    weights, sidecar = _paths(prefix)
    return weights.exists() and sidecar.exists()


def load_checkpoint(prefix: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    weights, sidecar = _paths(prefix)
    if not checkpoint_exists(prefix):
        raise FileNotFoundError(f"no complete checkpoint at {weights} (+ {sidecar.name})")
    # mapped, not read whole then parsed: 1 GB (a B-sized generator) in 0.3 s where the bytes' way took 4.8 s
    # on a 2-core CPU; on a GPU straight to it, where the finiteness check below is quick too
    tensors = load_safetensors_file(weights, device=str(torch.device(device)))
    refuse_nonfinite(weights, tensors)
    return tensors, read_json(sidecar)


def checkpoint_meta(prefix: Path) -> dict:
    """A checkpoint's JSON sidecar alone (no tensors read)."""
    return read_json(_paths(prefix)[1])


def save_module(prefix: Path, module: torch.nn.Module, meta: dict) -> Path:
    return save_checkpoint(prefix, dict(module.state_dict()), meta)


def built_with(factory: Callable[[], torch.nn.Module], tensors: dict[str, torch.Tensor],
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """factory()'s module on `device` holding `tensors` themselves (strict), built without its random
    initialisation and without a copy: laid out on the meta device, then given `tensors`. A B-sized
    generator's initialisation and the copy into it took 2-4.7 s on a 2-core CPU (this: 0.03 s beside
    the file's read); four of them were most of the 50k evaluation's 11.7 s of loading. Nothing random
    is drawn. Buffers the state dict does not hold (non-persistent: fixed position tables) keep what the
    constructor made, so a module must make those on an explicit device; one that made them on the meta
    device is built the ordinary way."""
    with torch.device("meta"):
        model = factory()
    held = set(model.state_dict())
    own = {name: buffer for name, buffer in model.named_buffers() if name not in held}
    if any(buffer.is_meta for buffer in own.values()):
        model = factory()
        model.load_state_dict(tensors)
        return model.to(device)
    model.load_state_dict(tensors, assign=True)
    for name, buffer in own.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, buffer)
    return model.to(device)


def load_built(prefix: Path, factory: Callable[[dict], torch.nn.Module],
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(module, sidecar) of the checkpoint at `prefix`: factory(sidecar) built on `device` by built_with."""
    tensors, meta = load_checkpoint(prefix, device)
    return built_with(lambda: factory(meta), tensors, device), meta


# Training-state snapshots (resume). Each snapshot's tensors go to a step-named file; the JSON
# pointer `train-state.json`, renamed into place last, is the commit point, so a kill at any moment
# leaves either the previous snapshot or the new one, never new tensors under an old sidecar.
STATE_POINTER = "train-state.json"
COMPLETE = "_COMPLETE"


def save_train_state(folder: Path, name: str, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    folder = Path(folder)
    weights = folder / f"{name}-state-{step:09d}.safetensors"
    flat = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
    atomic_write_by_name(weights, partial(save_safetensors_file, flat))
    atomic_write_json(folder / f"{name}-{STATE_POINTER}", {"step": step, "weights": weights.name, "meta": meta})
    for old in folder.glob(f"{name}-state-*.safetensors"):
        if old.name != weights.name:
            old.unlink(missing_ok=True)
    return weights


def load_train_state(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The latest committed snapshot as (tensors, meta), or None when there is none."""
    pointer = Path(folder) / f"{name}-{STATE_POINTER}"
    if not pointer.exists():
        return None
    record = read_json(pointer)
    tensors = load_safetensors_file(Path(folder) / record["weights"])
    return tensors, record["meta"]


def train_state_step(folder: Path, name: str) -> int | None:
    """The step of the latest committed snapshot, or None (its tensors are not read)."""
    pointer = Path(folder) / f"{name}-{STATE_POINTER}"
    return int(read_json(pointer)["step"]) if pointer.exists() else None


def clear_train_state(folder: Path, name: str) -> None:
    """After the final checkpoint is written: the snapshots are no longer needed."""
    folder = Path(folder)
    (folder / f"{name}-{STATE_POINTER}").unlink(missing_ok=True)
    for old in folder.glob(f"{name}-state-*.safetensors"):
        old.unlink(missing_ok=True)


def mark_complete(folder: Path, meta: dict) -> None:
    atomic_write_json(Path(folder) / COMPLETE, meta)


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE).exists()
