"""FID / KID / IS through torch-fidelity, with Inception weights from a local file.

torch-fidelity downloads its Inception weights when no path is given, so every
call here passes `feature_extractor_weights_path` explicitly and refuses to run
without an existing file. Its on-disk feature cache is switched off: inputs are
in-memory datasets and results must not depend on stale cache entries.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset

SUPPORTED_METRICS = ("fid", "kid", "isc")
INCEPTION_FEATURE_EXTRACTOR = "inception-v3-compat"
DEFAULT_KID_SUBSET_SIZE = 1000
DEFAULT_ISC_SPLITS = 10

# torch-fidelity result keys -> the names our tables use.
_RESULT_KEYS = {
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "is_mean",
    torch_fidelity.KEY_METRIC_ISC_STD: "is_std",
}


class UInt8ImageDataset(Dataset):
    """Serves uint8 [N,H,W,3] images as the uint8 [3,H,W] tensors torch-fidelity expects."""

    def __init__(self, images: np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 [N,H,W,3] images, got {images.dtype} {images.shape}")
        if len(images) < 2:
            raise ValueError("need at least 2 images per set for image-quality metrics")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)


def fidelity_unavailable_reason(weights_path: str | None) -> str | None:
    """None when the Inception weights can be used, else a human-readable reason."""
    if not weights_path:
        return "no Inception weights configured (evaluate.inception_weights)"
    if not os.path.isfile(weights_path):
        return f"Inception weights file not found: {weights_path}"
    return None


def _isc_splits(num_images: int) -> int:
    """The protocol's 10 splits, but at least 2 images per split: a 1-image split always scores IS = 1."""
    return max(1, min(DEFAULT_ISC_SPLITS, num_images // 2))


def _cuda_context(device: str | torch.device) -> tuple[bool, contextlib.AbstractContextManager]:
    """torch-fidelity only takes a cuda flag; select the GPU index through the current-device context."""
    device = torch.device(device)
    if device.type == "cpu":
        return False, contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError(f"torch-fidelity runs on cpu or cuda only, got {device}")
    if device.index is None:
        return True, contextlib.nullcontext()
    return True, torch.cuda.device(device.index)


def inception_metrics(
    generated: np.ndarray,
    real: np.ndarray,
    weights_path: str,
    metrics: Sequence[str] = SUPPORTED_METRICS,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    kid_subset_size: int | None = None,
) -> dict[str, float]:
    """Inception FID / KID / IS of `generated` against `real` (both uint8 [N,H,W,3]).

    Returns the requested subset of {"fid", "kid_mean", "kid_std", "is_mean", "is_std"}.
    IS is computed on `generated` only. KID subsets default to min(1000, N) images.
    """
    unknown = set(metrics) - set(SUPPORTED_METRICS)
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {SUPPORTED_METRICS}, got {tuple(metrics)}")
    reason = fidelity_unavailable_reason(weights_path)
    if reason is not None:
        raise FileNotFoundError(reason)
    generated_set, real_set = UInt8ImageDataset(generated), UInt8ImageDataset(real)
    smallest = min(len(generated_set), len(real_set))
    if kid_subset_size is None:
        kid_subset_size = min(DEFAULT_KID_SUBSET_SIZE, smallest)
    use_cuda, cuda_context = _cuda_context(device)
    with cuda_context:
        raw = torch_fidelity.calculate_metrics(
            input1=generated_set,
            input2=real_set,
            fid="fid" in metrics,
            kid="kid" in metrics,
            isc="isc" in metrics,
            feature_extractor=INCEPTION_FEATURE_EXTRACTOR,
            feature_extractor_weights_path=os.fspath(weights_path),
            batch_size=batch_size,
            cuda=use_cuda,
            kid_subset_size=kid_subset_size,
            isc_splits=_isc_splits(len(generated_set)),
            cache=False,
            save_cpu_ram=True,
            verbose=False,
        )
    return {ours: float(raw[theirs]) for theirs, ours in _RESULT_KEYS.items() if theirs in raw}
