"""DINOv2 patch-token encoder (timm), loaded only from a local weights file.

Latents are the patch tokens of the last block after the final LayerNorm taken without its
scale and shift (normalise only, as the reference and RAE: DESIGN section 3), with the class
and register tokens dropped, laid out as a [g, g, C] grid per image.
Weights come from a local file through timm's own pretrained path
(`pretrained_cfg_overlay=dict(file=...)`), so timm's DINOv2 checkpoint filter
converts the original Meta key layout (drops mask_token, folds the class
position of pos_embed into cls_token for the register models, renames
register_tokens) and resamples the position embeddings to the requested image
size. `encoder.weights` may name:
  - a file: timm/HF `*.safetensors` or `pytorch_model.bin`, or Meta's
    `dinov2_vit*14[_reg4]_pretrain.pth` (read by timm with weights_only=True);
  - a directory: a snapshot folder holding model.safetensors, a
    `models--timm--<name>.lvd142m` repo folder, or an HF hub cache root;
  - `hf-cache`: the HF hub cache of this machine (HF_HUB_CACHE, else
    HF_HOME/hub, else ~/.cache/huggingface/hub).
Nothing is ever downloaded: without weights the model is randomly initialised
(only when allowed) and labelled "random-init".
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.encoder_layout import ENCODERS, misfit, resolve_encoder_name  # noqa: F401  (their home is encoder_layout)

logger = logging.getLogger(__name__)

RANDOM_INIT_LABEL = "random-init"
ENCODER_OUTPUT = "final norm without affine"   # what a latent is, as the stores record it


class MissingWeightsError(FileNotFoundError):
    """Raised when no usable encoder weights file is configured."""


class WeightsError(ValueError):
    """Raised when the configured weights file cannot be read or does not fit the encoder model.
    `path` is the resolved file (tasks.encode.encoder_load re-words the error with what the file holds)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def describe_misfit(timm_name: str, img_size: int, found: dict[str, tuple[int, ...]]) -> str | None:
    """The first tensors of a weights file (`found`: name -> shape, read by the caller) that do not fit
    `timm_name`, or None when every tensor fits. Shapes only: the model is built on the meta device."""
    with torch.device("meta"):   # nothing allocated, nothing initialised
        expected = {k: tuple(v.shape) for k, v in timm.create_model(
            timm_name, pretrained=False, img_size=img_size, num_classes=0, weight_init="skip").state_dict().items()}
    return misfit(expected, found)


def _missing_weights_message(timm_name: str, weights: str | None) -> str:
    if not weights:
        what = "no encoder weights configured"
    elif weights == HF_CACHE or os.path.isdir(weights):
        root = hf_cache_root() if weights == HF_CACHE else weights
        what = (f"encoder weights not found in the HF cache {root} (encoder.weights={weights!r}): expected "
                f"{root}/models--timm--{timm_name}.lvd142m/snapshots/<hash>/model.safetensors")
    else:
        what = f"encoder weights file not found: {weights}"
    return (
        f"{what} (model {timm_name}). Supply weights by setting the config key "
        f"encoder.weights to a local file: either a timm/HF safetensors file "
        f"(timm key layout, e.g. model.safetensors of timm/{timm_name}.lvd142m) or the "
        f"original Facebook checkpoint dinov2_vit*14*_pretrain.pth, or to a populated HF cache "
        f"folder ('{HF_CACHE}' for HF_HUB_CACHE / HF_HOME). Nothing is downloaded. "
        f"For wiring-only runs set encoder.allow_random_init: true instead "
        f"(results are then labelled encoder_weights='{RANDOM_INIT_LABEL}')."
    )


def weights_file_label(path: str) -> str:
    """'file:<basename>:<first 12 hex of sha256>' identifying a weights file by content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"file:{os.path.basename(path)}:{digest.hexdigest()[:12]}"


HF_CACHE = "hf-cache"   # encoder.weights value: the HF hub cache of this machine
_SNAPSHOT_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_cache_root() -> Path:
    """The HF hub cache as huggingface_hub finds it: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _snapshot_file(snapshot: Path) -> Path | None:
    return next((snapshot / name for name in _SNAPSHOT_FILES if (snapshot / name).is_file()), None)


def _repo_snapshot(repo: Path) -> Path | None:
    """refs/main's snapshot (what the hub client would load), else the only snapshot there is."""
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return repo / "snapshots" / ref.read_text().strip()
    snapshots = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir())
    return snapshots[0] if len(snapshots) == 1 else None


def _cache_repos(root: Path, timm_name: str) -> list[Path]:
    # timm publishes DINOv2 as timm/<name>.lvd142m; an untagged repo name is accepted too.
    return sorted(p for p in root.glob(f"models--timm--{timm_name}*")
                  if p.name == f"models--timm--{timm_name}" or p.name.startswith(f"models--timm--{timm_name}."))


def resolve_weights(timm_name: str, weights: str | None) -> str | None:
    """The local weights file `weights` stands for (see the module docstring), or None."""
    if not weights:
        return None
    location = hf_cache_root() if weights == HF_CACHE else Path(weights).expanduser()
    if location.is_file():
        return os.fspath(location)
    if not location.is_dir():
        return None
    if _snapshot_file(location):                       # a snapshot folder
        return os.fspath(_snapshot_file(location))
    if location.name.startswith("models--"):           # one repo folder
        repos = [location]
    else:                                              # a cache root (or HF_HOME holding hub/)
        root = location / "hub" if not _cache_repos(location, timm_name) and (location / "hub").is_dir() else location
        repos = _cache_repos(root, timm_name)
    for repo in repos:
        snapshot = _repo_snapshot(repo)
        if snapshot is not None and _snapshot_file(snapshot):
            return os.fspath(_snapshot_file(snapshot))
    return None


def weights_label(model: str, weights: str | None, allow_random_init: bool) -> str:
    """The label build_encoder will give, without building it (for planning Dask encode jobs)."""
    timm_name = resolve_encoder_name(model)
    path = resolve_weights(timm_name, weights)
    if path:
        return weights_file_label(path)
    if allow_random_init:
        return RANDOM_INIT_LABEL
    raise MissingWeightsError(_missing_weights_message(timm_name, weights))


def build_encoder(
    model: str,
    img_size: int,
    weights: str | None,
    allow_random_init: bool,
    seed: int = 0,
) -> tuple[nn.Module, str]:
    """Build a DINOv2 encoder in eval mode and return (model, weights_label).

    When `weights` resolves to a local file (resolve_weights) it is loaded through timm
    (safetensors in timm layout, or the original dinov2_*_pretrain.pth layout, read with
    weights_only=True). Otherwise the model is randomly initialised under `seed`
    if `allow_random_init`, else MissingWeightsError is raised. A file that cannot be read as weights,
    or whose tensors do not fit `model`, raises WeightsError naming the file and the first mismatches.
    """
    timm_name = resolve_encoder_name(model)
    path = resolve_weights(timm_name, weights)
    if path:
        # Clearing url/hf_hub_id guarantees timm has no remote source to fall back on.
        overlay = dict(file=path, url=None, hf_hub_id=None)
        try:
            encoder = timm.create_model(
                timm_name,
                pretrained=True,
                img_size=img_size,
                num_classes=0,
                pretrained_cfg_overlay=overlay,
                weight_init="skip",   # every tensor comes from the file (strict load): random init is wasted time
            )
        except Exception as error:   # timm fails deep in its filter or load_state_dict: say which file
            first = (str(error).strip().splitlines() or [""])[0][:200]
            raise WeightsError(f"encoder.weights {weights} ({path}) could not be loaded into encoder.model "
                               f"{timm_name}: {type(error).__name__}: {first}", path=path) from None
        label = weights_file_label(path)
    elif allow_random_init:
        if weights:
            logger.warning("encoder weights %s not found; using random init (allowed by config)", weights)
        # fork_rng keeps the caller's global torch RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = timm.create_model(timm_name, pretrained=False, img_size=img_size, num_classes=0)
        label = RANDOM_INIT_LABEL
    else:
        raise MissingWeightsError(_missing_weights_message(timm_name, weights))
    encoder.requires_grad_(False)
    return encoder.eval(), label


def fold_layer_scale(model: nn.Module) -> nn.Module:
    """Each block's LayerScale multiplied into the linear layer it scales (attn.proj, mlp.fc2), then dropped:
    gamma (W y + b) = (gamma W) y + gamma b, so the frozen encoder gives the same tokens up to rounding without
    two elementwise passes over the residual stream a block (on a GPU those passes are memory-bound: a
    float32 write of every token, twice a block). In place; blocks of another layout are left as they are.
    The encode stage folds its encoders; build_encoder does not, so a loaded model is the file's tensors."""
    from timm.layers import LayerScale

    for block in getattr(model, "blocks", ()):
        for scale_name, linear in (("ls1", getattr(getattr(block, "attn", None), "proj", None)),
                                   ("ls2", getattr(getattr(block, "mlp", None), "fc2", None))):
            scale = getattr(block, scale_name, None)
            if isinstance(scale, LayerScale) and isinstance(linear, nn.Linear):
                with torch.no_grad():
                    linear.weight.mul_(scale.gamma[:, None])
                    if linear.bias is not None:
                        linear.bias.mul_(scale.gamma)
                setattr(block, scale_name, nn.Identity())
    return model


def grid_size(model: nn.Module) -> int:
    """Tokens per side of the patch grid (img_size // patch)."""
    rows, cols = model.patch_embed.grid_size
    if rows != cols:
        raise ValueError(f"expected a square token grid, got {rows}x{cols}")
    return int(rows)


def token_dim(model: nn.Module) -> int:
    """Channels per patch token."""
    return int(model.embed_dim)


def _image_size(model: nn.Module) -> tuple[int, int]:
    rows, cols = model.patch_embed.img_size
    return int(rows), int(cols)


def _normalise(model: nn.Module, images01: Tensor) -> Tensor:
    """Resize [B,3,H,W] in [0,1] to the model's size and apply its mean/std."""
    size = _image_size(model)
    if tuple(images01.shape[-2:]) != size:
        images01 = F.interpolate(images01, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean, std = _mean_std(model, images01.dtype, images01.device)
    return (images01 - mean) / std


def _mean_std(model: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The model's input mean/std as [1,3,1,1] tensors, made once per dtype and device: a CUDA graph capture
    (tasks/encode/cuda_graph.py) may not copy from pageable host memory, and its warm-up passes fill this."""
    cache = model.__dict__.setdefault("_tf_mean_std", {})
    key = (dtype, device)
    if key not in cache:
        cfg = model.pretrained_cfg
        cache[key] = tuple(torch.tensor(cfg[name], dtype=dtype, device=device).view(1, 3, 1, 1)
                           for name in ("mean", "std"))
    return cache[key]


def _patch_tokens(model: nn.Module, images01: Tensor) -> Tensor:
    """[B,3,H,W] in [0,1] -> [B, T, C] patch tokens of the last block, without prefix tokens,
    after the final LayerNorm's normalisation only: (x - mean) / sqrt(var + eps) with the norm's
    eps, its weight and bias left out (the reference's RAE-style encoder has no affine there)."""
    last = model.forward_intermediates(_normalise(model, images01), indices=1, norm=False,
                                       output_fmt="NLC", intermediates_only=True)[-1]   # prefix dropped
    norm = model.norm
    return F.layer_norm(last, norm.normalized_shape, None, None, norm.eps)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(
    model: nn.Module,
    images: np.ndarray,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Encode uint8 [N,H,W,3] images to float32 token grids [N, g, g, C].

    The model is moved to `device`. A `dtype` such as torch.bfloat16 runs the
    forward pass under autocast; the result is always float32.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N,H,W,3] images, got {images.dtype} {images.shape}")
    device = torch.device(device)
    model.to(device)
    side, channels = grid_size(model), token_dim(model)
    out = np.empty((len(images), side, side, channels), dtype=np.float32)
    use_autocast = dtype is not None and dtype != torch.float32
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        batch01 = batch.permute(0, 3, 1, 2).float().div_(255.0)
        with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=use_autocast):
            tokens = _patch_tokens(model, batch01)
        out[start : start + len(batch)] = tokens.float().reshape(len(batch), side, side, channels).cpu().numpy()
    return out


@torch.no_grad()
def encode_tensor(model: nn.Module, images01: Tensor) -> Tensor:
    """Encode float [B,3,H,W] images in [0,1] (on the model's device) to [B, T, C] tokens."""
    if images01.ndim != 4 or images01.shape[1] != 3:
        raise ValueError(f"expected [B,3,H,W] images, got {tuple(images01.shape)}")
    # the model's own dtype: float32 normally, float64 when a test wants exact comparisons
    return _patch_tokens(model, images01.to(_model_device(model), next(model.parameters()).dtype))
