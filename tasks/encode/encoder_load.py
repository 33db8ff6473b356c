"""Building the configured encoder for a stage, with a weights error that says what the file holds, and
the check, run before any stage, that a configured weights file fits the configured encoder.

models.encoder loads the file through timm and does no file reading of its own; when timm fails,
this glue reads the file's tensor names and shapes (storage.files.weights_shapes, no tensors loaded)
and names either why it is not a weights file or the first tensors that do not fit the model. The
check before the stages compares the same shapes with models.encoder_layout's, so it needs neither torch
nor timm for a safetensors file (a torch checkpoint is read with torch.load, memory-mapped).
"""
from __future__ import annotations

import os

from models.encoder_layout import expected_shapes, misfit, resolve_encoder_name
from storage.files import weights_shapes


def load_encoder(model: str, img_size: int, weights: str | None, allow_random_init: bool, seed: int = 0):
    """build_encoder, with WeightsError re-worded from the file's contents; returns (encoder, label)."""
    from models.encoder import WeightsError, build_encoder   # torch and timm: only where an encoder is built

    try:
        return build_encoder(model, img_size, weights, allow_random_init, seed)
    except WeightsError as error:
        if error.path is None:
            raise
        raise WeightsError(explain(model, img_size, weights, error.path, str(error)), error.path) from None


def explain(model: str, img_size: int, weights: str | None, path: str, fallback: str) -> str:
    from models.encoder import describe_misfit

    where = f"encoder.weights {weights}" + (
        f" ({path})" if os.path.abspath(path) != os.path.abspath(os.path.expanduser(weights or "")) else "")
    try:
        found = weights_shapes(path)
    except (ValueError, OSError) as unreadable:
        return f"{where}: cannot be read as a weights file: {unreadable}"
    timm_name = resolve_encoder_name(model)
    reason = describe_misfit(timm_name, img_size, found)
    return f"{where} does not fit encoder.model {timm_name}: {reason}" if reason else fallback


def weights_misfit(model: str, img_size: int, weights: str | None) -> str | None:
    """Why the weights file `weights` cannot be loaded into `model` at `img_size` px (the file named and its
    first mismatched tensors, one line), or None when it fits or is no file (unset, `hf-cache` or a folder
    are resolved where the encoder is built; a file that is not weights at all is storage.config.preflight's)."""
    if not weights or not os.path.isfile(os.path.expanduser(weights)):
        return None
    try:
        found = weights_shapes(os.path.expanduser(weights))
    except (ValueError, OSError):
        return None   # not a weights file: refused with its reason by storage.config.preflight
    timm_name = resolve_encoder_name(model)
    reason = misfit(expected_shapes(timm_name, img_size), found)
    return f"encoder.weights {weights} does not fit encoder.model {timm_name}: {reason}" if reason else None
