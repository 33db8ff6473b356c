"""The encoders' names and parameter shapes, without torch or timm, so the checks that run before any
stage can tell in a fraction of a second whether a weights file fits the configured encoder (importing
torch and timm alone takes several seconds).

`expected_shapes` is timm's state dict of a DINOv2 ViT (`num_classes=0`) written out from its
architecture; tests/models/test_encoder_layout.py holds it equal to a meta-device timm model's for every
name in ENCODERS. `misfit` compares a file's tensors with it the way timm's DINOv2 checkpoint filter
loads them: Meta's original key names are renamed, `mask_token` is dropped, and the position embedding
and the patch kernel's spatial size are resampled to the model, so neither is a misfit.
"""
from __future__ import annotations

import re

# Short names -> timm architectures. Both forms are accepted by build_encoder.
ENCODERS: dict[str, str] = {
    "dinov2-s14": "vit_small_patch14_dinov2",
    "dinov2-b14": "vit_base_patch14_dinov2",
    "dinov2-l14": "vit_large_patch14_dinov2",
    "dinov2-g14": "vit_giant_patch14_dinov2",
    "dinov2-s14-reg": "vit_small_patch14_reg4_dinov2",
    "dinov2-b14-reg": "vit_base_patch14_reg4_dinov2",
    "dinov2-l14-reg": "vit_large_patch14_reg4_dinov2",
    "dinov2-g14-reg": "vit_giant_patch14_reg4_dinov2",
}

# (width, depth, MLP hidden width, SwiGLU) of each size, as timm builds it (giant: a packed SwiGLU MLP)
_SIZES = {"small": (384, 12, 1536, False), "base": (768, 12, 3072, False), "large": (1024, 24, 4096, False),
          "giant": (1536, 40, 4096, True)}
_NAME = re.compile(r"^vit_(small|base|large|giant)_patch(\d+)(_reg(\d+))?_dinov2$")

_DROPPED = {"mask_token"}                             # dropped by timm's DINOv2 filter
_RENAMES = {"register_tokens": "reg_token"}           # Meta's names -> timm's
_MLP_RENAMES = ((".mlp.w12.", ".mlp.fc1."), (".mlp.w3.", ".mlp.fc2."))   # Meta's SwiGLU (giant) -> timm's
_RESAMPLED = {"pos_embed"}                            # resampled to img_size (and the class slot folded in)


def resolve_encoder_name(model: str) -> str:
    """Map a short name from ENCODERS (or a timm name, with or without its `.lvd142m` tag) to
    the timm architecture name."""
    if model in ENCODERS:
        return ENCODERS[model]
    if model.split(".", 1)[0] in ENCODERS.values():
        return model.split(".", 1)[0]
    known = ", ".join(sorted(ENCODERS) + sorted(ENCODERS.values()))
    raise ValueError(f"unknown encoder {model!r}; expected one of: {known}")


def expected_shapes(timm_name: str, img_size: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the state dict of `timm_name` built for `img_size` px inputs."""
    match = _NAME.match(timm_name)
    if match is None:
        raise ValueError(f"no parameter layout for {timm_name!r} (one of {sorted(ENCODERS.values())})")
    size, patch, registers = match.group(1), int(match.group(2)), int(match.group(4) or 0)
    width, depth, hidden, swiglu = _SIZES[size]
    grid = img_size // patch
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, width)}
    if registers:
        shapes["reg_token"] = (1, registers, width)
    # with registers the class slot has no position embedding of its own (timm: no_embed_class)
    shapes["pos_embed"] = (1, grid * grid + (0 if registers else 1), width)
    shapes["patch_embed.proj.weight"] = (width, 3, patch, patch)
    shapes["patch_embed.proj.bias"] = (width,)
    block = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
             "attn.qkv.bias": (3 * width,), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
             "ls1.gamma": (width,), "norm2.weight": (width,), "norm2.bias": (width,),
             "mlp.fc1.weight": ((2 if swiglu else 1) * hidden, width), "mlp.fc1.bias": ((2 if swiglu else 1) * hidden,),
             "mlp.fc2.weight": (width, hidden), "mlp.fc2.bias": (width,), "ls2.gamma": (width,)}
    for index in range(depth):
        shapes.update({f"blocks.{index}.{name}": shape for name, shape in block.items()})
    shapes["norm.weight"], shapes["norm.bias"] = (width,), (width,)
    return shapes


def _as_timm_names(found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, shape in found.items():
        if name in _DROPPED or "pre_logits" in name:
            continue
        name = _RENAMES.get(name, name)
        for meta, timm_name in _MLP_RENAMES:
            name = name.replace(meta, timm_name)
        out[name] = tuple(shape)
    return out


def _fits(name: str, found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    if name in _RESAMPLED:
        return True
    if name.endswith("patch_embed.proj.weight") and len(found) == len(expected) == 4:
        return found[:2] == expected[:2]   # another patch size is resampled to the model's
    return found == expected


def misfit(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    """The first tensors of a weights file (`found`: name -> shape) that do not fit a model whose state dict
    has `expected` shapes, or None when every tensor fits."""
    found = _as_timm_names(found)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {list(found[k])} vs {list(expected[k])}" for k in expected
              if k in found and not _fits(k, found[k], tuple(expected[k]))]
    parts = [f"{label} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected),
                                 ("shape in file vs model", shapes)) if keys]
    return "; ".join(parts) or None
