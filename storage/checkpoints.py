"""Checkpoints: safetensors weights plus a JSON sidecar, each written atomically.

The sidecar is written last, so a checkpoint exists only when both files do.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from storage.files import atomic_write_bytes, atomic_write_json, read_json


def _paths(prefix: Path) -> tuple[Path, Path]:
    prefix = Path(prefix)
    return prefix.with_suffix(".safetensors"), prefix.with_suffix(".json")


def save_checkpoint(prefix: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    weights, sidecar = _paths(prefix)
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write_bytes(weights, save_safetensors_bytes(flat))
    atomic_write_json(sidecar, meta)
    return weights


def checkpoint_exists(prefix: Path) -> bool:
    weights, sidecar = _paths(prefix)
    return weights.exists() and sidecar.exists()


def load_checkpoint(prefix: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    weights, sidecar = _paths(prefix)
    if not checkpoint_exists(prefix):
        raise FileNotFoundError(f"no complete checkpoint at {weights} (+ {sidecar.name})")
    tensors = load_safetensors_bytes(weights.read_bytes())
    return {k: v.to(device) for k, v in tensors.items()}, read_json(sidecar)


def save_module(prefix: Path, module: torch.nn.Module, meta: dict) -> Path:
    return save_checkpoint(prefix, dict(module.state_dict()), meta)


def load_module(prefix: Path, module: torch.nn.Module, device: str | torch.device = "cpu") -> dict:
    tensors, meta = load_checkpoint(prefix, device)
    module.load_state_dict(tensors)
    return meta
