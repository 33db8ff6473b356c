"""Building the configured encoder for a stage, with a weights error that says what the file holds.

models.encoder loads the file through timm and does no file reading of its own; when timm fails,
this glue reads the file's tensor names and shapes (storage.files.weights_shapes, no tensors loaded)
and names either why it is not a weights file or the first tensors that do not fit the model.
"""
from __future__ import annotations

import os

from models.encoder import WeightsError, build_encoder, describe_misfit, resolve_encoder_name
from storage.files import weights_shapes


def load_encoder(model: str, img_size: int, weights: str | None, allow_random_init: bool, seed: int = 0):
    """build_encoder, with WeightsError re-worded from the file's contents; returns (encoder, label)."""
    try:
        return build_encoder(model, img_size, weights, allow_random_init, seed)
    except WeightsError as error:
        if error.path is None:
            raise
        raise WeightsError(explain(model, img_size, weights, error.path, str(error)), error.path) from None


def explain(model: str, img_size: int, weights: str | None, path: str, fallback: str) -> str:
    where = f"encoder.weights {weights}" + (
        f" ({path})" if os.path.abspath(path) != os.path.abspath(os.path.expanduser(weights or "")) else "")
    try:
        found = weights_shapes(path)
    except (ValueError, OSError) as unreadable:
        return f"{where}: cannot be read as a weights file: {unreadable}"
    timm_name = resolve_encoder_name(model)
    misfit = describe_misfit(timm_name, img_size, found)
    return f"{where} does not fit encoder.model {timm_name}: {misfit}" if misfit else fallback
