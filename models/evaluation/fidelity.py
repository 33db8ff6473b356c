"""FID / KID / IS and FD-DINOv2, with Inception and DINOv2 weights from local files only.

torch-fidelity downloads its Inception weights when no path is given, so every
call here passes `feature_extractor_weights_path` explicitly and refuses to run
without an existing file. Its on-disk feature cache is switched off: inputs are
in-memory datasets and results must not depend on stale cache entries.

FD-DINOv2 goes through a torch-fidelity extractor that wraps our own timm encoder
(register_dinov2_extractor); torch-fidelity's DINOv2 extractor uses torch.hub and
cannot run offline. For the evaluation flow, inception_feature_fn / dinov2_feature_fn
stream features from uint8 arrays, and kid_from_features / inception_score_from_logits
(with models.evaluation.metrics.frechet_distance for FID) turn them into scores in numpy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from models.encoder import RANDOM_INIT_LABEL, _image_size, _normalise, weights_file_label

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


# ---------------------------------------------------------------------------
# FD-DINOv2 through torch-fidelity, with our own (offline) timm encoder
# ---------------------------------------------------------------------------
#
# torch-fidelity's DINOv2 extractor fetches its model through torch.hub, which
# cannot run offline. The extractor below wraps the timm encoder that
# models.encoder.build_encoder gives instead. Its feature "dinov2" is the class
# token after the final norm (forward_features(x)[:, 0]), the standard FD-DINOv2
# feature and what torch-fidelity's own extractor returns; images are resized to
# the encoder's img_size (antialiased bilinear) and normalised with its
# pretrained_cfg mean/std, exactly as models.encoder.encode_images does.

DINOV2_FEATURE = "dinov2"
DINOV2_EXTRACTOR_PREFIX = "tf-dinov2-"
INCEPTION_POOL_FEATURE = "2048"
INCEPTION_LOGITS_FEATURE = "logits_unbiased"


def _encoder_arch(encoder: torch.nn.Module) -> str:
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(encoder).__name__)


def _parameter_fingerprint(encoder: torch.nn.Module) -> str:
    """First 12 hex of sha256 over the patch-embedding weights and the class token (float32, cpu)."""
    digest = hashlib.sha256()
    for tensor in (encoder.patch_embed.proj.weight, encoder.cls_token):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def dinov2_extractor_label(encoder: torch.nn.Module, weights_label: str) -> str:
    """Identity of the FD-DINOv2 feature: 'dinov2-cls:<timm arch>@<img_size>:<weights_label>'.

    A file label already hashes the weights; a 'random-init' encoder additionally gets a
    fingerprint of its parameters (different seeds must never share statistics).
    """
    rows, cols = _image_size(encoder)
    size = str(rows) if rows == cols else f"{rows}x{cols}"
    label = f"dinov2-cls:{_encoder_arch(encoder)}@{size}:{weights_label}"
    if weights_label == RANDOM_INIT_LABEL:
        label += f":{_parameter_fingerprint(encoder)}"
    return label


def inception_extractor_label(weights_path: str) -> str:
    """'inception-v3-compat:file:<basename>:<sha12>', identifying the Inception weights by content."""
    return f"{INCEPTION_FEATURE_EXTRACTOR}:{weights_file_label(os.fspath(weights_path))}"


def _dinov2_cls_features(encoder: torch.nn.Module, images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 [B, C] class tokens after the final norm."""
    if not torch.is_tensor(images_uint8) or images_uint8.dtype != torch.uint8:
        raise ValueError("expected images as a torch.uint8 tensor")
    if images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"expected [B,3,H,W] images, got {tuple(images_uint8.shape)}")
    images01 = images_uint8.to(torch.float32).div(255.0)
    tokens = encoder.forward_features(_normalise(encoder, images01))
    return tokens[:, 0].to(torch.float32)


class TimmDinov2Extractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around a timm DINOv2 encoder; provides feature 'dinov2'.

    torch-fidelity instantiates registered classes itself, as cls(name, features_list,
    **kwargs), so register_dinov2_extractor makes one subclass per encoder identity with
    the encoder as the class attribute `tf_encoder`. Instances share that module (no
    copy): calculate_metrics(cuda=True) moves it to the GPU.
    """

    tf_encoder: torch.nn.Module | None = None

    def __init__(self, name, features_list, feature_extractor_weights_path=None,
                 feature_extractor_internal_dtype=None, **kwargs):
        super().__init__(name, features_list)
        if type(self).tf_encoder is None:
            raise TypeError("use register_dinov2_extractor(encoder, weights_label) to make a usable extractor")
        if feature_extractor_weights_path is not None:
            raise ValueError(f"{name} wraps an already-built encoder; feature_extractor_weights_path must be None")
        if feature_extractor_internal_dtype not in (None, "float32"):
            raise ValueError(f"{name} runs in float32 only, got {feature_extractor_internal_dtype}")
        self.encoder = type(self).tf_encoder
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        features = {DINOV2_FEATURE: _dinov2_cls_features(self.encoder, x)}
        return tuple(features[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return (DINOV2_FEATURE,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": DINOV2_FEATURE, "fid": DINOV2_FEATURE, "kid": DINOV2_FEATURE, "prc": DINOV2_FEATURE}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)


def register_dinov2_extractor(encoder: torch.nn.Module, weights_label: str) -> str:
    """Register `encoder` with torch-fidelity and return the extractor name.

    The name is 'tf-dinov2-<sha12 of dinov2_extractor_label>', so it is unique to the
    architecture, image size and weights. Registering the same identity again is a no-op
    that returns the same name (the newest encoder module is the one used). Use it as
        torch_fidelity.calculate_metrics(input1=..., input2=..., fid=True,
                                         feature_extractor=name, feature_layer_fid="dinov2")
    """
    label = dinov2_extractor_label(encoder, weights_label)
    name = DINOV2_EXTRACTOR_PREFIX + hashlib.sha256(label.encode()).hexdigest()[:12]
    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is not None:
        if not (isinstance(existing, type) and issubclass(existing, TimmDinov2Extractor)):
            raise ValueError(f"feature extractor {name!r} is already registered by someone else: {existing!r}")
        existing.tf_encoder = encoder
        return name
    cls = type(
        f"TimmDinov2Extractor_{name[len(DINOV2_EXTRACTOR_PREFIX):]}",
        (TimmDinov2Extractor,),
        {"tf_encoder": encoder, "tf_extractor_label": label, "__module__": __name__},
    )
    torch_fidelity.register_feature_extractor(name, cls)
    return name


# ---------------------------------------------------------------------------
# Streaming feature functions (no torch-fidelity dataset plumbing)
# ---------------------------------------------------------------------------


def _uint8_batches(images: np.ndarray | torch.Tensor, batch_size: int, device: torch.device):
    """uint8 [N,H,W,3] images (numpy, or a tensor already on the device: the evaluation's decoded real images)
    -> [b,3,H,W] batches on `device`."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"expected uint8 [N,H,W,3] images, got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(images), batch_size):
        part = images[start : start + batch_size]
        batch = part if torch.is_tensor(part) else torch.from_numpy(np.ascontiguousarray(part))
        yield batch.to(device).permute(0, 3, 1, 2)


def inception_feature_fn(
    weights_path: str,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Build torch-fidelity's Inception once and return images -> {"pool", "logits"}.

    The returned function maps uint8 [N,H,W,3] images to float32 {"pool": [N, 2048],
    "logits": [N, 1008]}: torch-fidelity's features "2048" (FID/KID) and
    "logits_unbiased" (IS), so FID/KID/IS can be computed from streamed features with
    models.evaluation.metrics, kid_from_features and inception_score_from_logits.

    The weights file must exist (FileNotFoundError otherwise) and must hold plain tensors:
    it is first read with torch.load(weights_only=True), since torch-fidelity itself
    unpickles it without that restriction.
    """
    reason = fidelity_unavailable_reason(weights_path)
    if reason is not None:
        raise FileNotFoundError(reason)
    weights_path = os.fspath(weights_path)
    torch.load(weights_path, map_location="cpu", weights_only=True)  # rejects anything but tensors
    device = torch.device(device)
    extractor = FeatureExtractorInceptionV3(
        INCEPTION_FEATURE_EXTRACTOR,
        [INCEPTION_POOL_FEATURE, INCEPTION_LOGITS_FEATURE],
        feature_extractor_weights_path=weights_path,
    )
    extractor.requires_grad_(False)
    extractor.eval().to(device)

    @torch.no_grad()
    def features(images: np.ndarray) -> dict[str, np.ndarray]:
        pools, logits = [], []
        for batch in _uint8_batches(images, batch_size, device):
            out = extractor.convert_features_tuple_to_dict(extractor(batch))
            pools.append(out[INCEPTION_POOL_FEATURE].cpu().numpy())
            logits.append(out[INCEPTION_LOGITS_FEATURE].cpu().numpy())
        if not pools:
            return {"pool": np.empty((0, 2048), np.float32), "logits": np.empty((0, 1008), np.float32)}
        return {"pool": np.concatenate(pools), "logits": np.concatenate(logits)}

    return features


def dinov2_feature_fn(
    encoder: torch.nn.Module,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> Callable[[np.ndarray], np.ndarray]:
    """images uint8 [N,H,W,3] -> float32 [N, C] FD-DINOv2 features (the registered extractor's "dinov2").

    The encoder is moved to `device`.
    """
    device = torch.device(device)
    encoder.to(device)

    @torch.no_grad()
    def features(images: np.ndarray) -> np.ndarray:
        chunks = [_dinov2_cls_features(encoder, batch).cpu().numpy()
                  for batch in _uint8_batches(images, batch_size, device)]
        if not chunks:
            return np.empty((0, int(encoder.embed_dim)), np.float32)
        return np.concatenate(chunks)

    return features


# ---------------------------------------------------------------------------
# KID and IS from features (numpy, float64)
# ---------------------------------------------------------------------------


def kid_from_features(
    a: np.ndarray,
    b: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance of feature sets a [N, D] and b [M, D]: (mean, std) over subsets.

    Per subset, m = min(subset_size, N, M) rows are drawn without replacement from each set
    (np.random.RandomState(seed).choice, a then b, in subset order: with seed=2020, torch-
    fidelity's default, the subsets are torch-fidelity's). With the cubic kernel
    k(x, y) = (x.y / D + 1)^3, the unbiased MMD^2 estimate is
        sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2.
    std is the population std (ddof=0) of the per-subset estimates. Lower is better.
    """
    x = _as_2d_float64(a, "a")
    y = _as_2d_float64(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: {x.shape[1]} vs {y.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be positive, got {subsets}")
    m = min(int(subset_size), len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set and subset, got {m}")
    dim = x.shape[1]
    rng = np.random.RandomState(seed)
    estimates = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        k_xx = (xs @ xs.T / dim + 1.0) ** 3
        k_yy = (ys @ ys.T / dim + 1.0) ** 3
        k_xy = (xs @ ys.T / dim + 1.0) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates[i] = within - 2.0 * k_xy.sum() / (m * m)
    return float(estimates.mean()), float(estimates.std())


def inception_score_from_logits(
    logits: np.ndarray,
    splits: int = 10,
    shuffle_seed: int | None = None,
) -> tuple[float, float]:
    """Inception Score from classifier logits [N, K]: (mean, std) over `splits` splits. Higher is better.

    p = softmax(logits) row-wise (float64). Split j holds rows floor(jN/s) .. floor((j+1)N/s) - 1
    (in input order; with shuffle_seed set, after np.random.RandomState(shuffle_seed).permutation,
    which with 2020 reproduces torch-fidelity). Per split, with q the split's mean of p,
        IS_j = exp( mean_i sum_k p_ik (log p_ik - log q_k) ).
    std is the population std (ddof=0) over splits.
    """
    z = _as_2d_float64(logits, "logits")
    n = len(z)
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, {n}] for {n} samples, got {splits}")
    if shuffle_seed is not None:
        z = z[np.random.RandomState(shuffle_seed).permutation(n)]
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = np.empty(splits, dtype=np.float64)
    for j in range(splits):
        lo, hi = j * n // splits, (j + 1) * n // splits
        p_j, log_p_j = p[lo:hi], log_p[lo:hi]
        with np.errstate(divide="ignore"):
            log_q = np.log(p_j.mean(axis=0))
        # A class with q_k = 0 has p_ik = 0 throughout the split and contributes 0 (not 0 * inf).
        kl_terms = np.where(p_j > 0, p_j * (log_p_j - np.where(np.isfinite(log_q), log_q, 0.0)), 0.0)
        scores[j] = np.exp(np.mean(np.sum(kl_terms, axis=1)))
    return float(scores.mean()), float(scores.std())


def _as_2d_float64(values: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what} must be [N, D], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} has non-finite values")
    return x
