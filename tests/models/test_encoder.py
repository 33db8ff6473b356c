import copy
import hashlib

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from models.encoder import (
    ENCODERS,
    MissingWeightsError,
    build_encoder,
    encode_images,
    encode_tensor,
    fold_layer_scale,
    grid_size,
    token_dim,
)

SMALL_REG = "vit_small_patch14_reg4_dinov2"
SMALL = "vit_small_patch14_dinov2"
CHECKPOINT_SIZE = 518  # the released DINOv2 checkpoints carry a 37x37 position grid


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    # Any attempt to reach a hub or write a cache outside the temp dir would show up here.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def _random_timm_state(timm_name: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    # weight_init="skip" + randn: timm's own init of a 518 px model is slow and nothing here needs it.
    model = timm.create_model(timm_name, pretrained=False, img_size=CHECKPOINT_SIZE, num_classes=0,
                              weight_init="skip")
    state = {k: (torch.randn_like(v) * 0.02).contiguous() for k, v in model.state_dict().items()}
    # Layer-scale gammas start at a constant 1e-5; randomise them so a mix-up would show.
    for key, value in state.items():
        if key.endswith(".gamma") or key.endswith("_token") or key == "pos_embed":
            state[key] = torch.randn_like(value) * 0.1
    return state


def _to_facebook_layout(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Inverse of timm's _convert_dinov2: timm keys -> original dinov2_*_pretrain.pth keys."""
    original = {k: v.clone() for k, v in state.items()}
    dim = state["cls_token"].shape[-1]
    generator = torch.Generator().manual_seed(seed)
    original["mask_token"] = torch.randn(1, dim, generator=generator)
    if "reg_token" in original:
        # Original puts the class position in pos_embed; timm folds it into cls_token.
        class_position = torch.randn(1, 1, dim, generator=generator)
        original["register_tokens"] = original.pop("reg_token")
        original["cls_token"] = state["cls_token"] - class_position
        original["pos_embed"] = torch.cat([class_position, state["pos_embed"]], dim=1)
    return original


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov2")
    files = {}
    for timm_name, tag in ((SMALL_REG, "vits14_reg4"), (SMALL, "vits14")):
        state = _random_timm_state(timm_name, seed=3)
        safetensors_path = root / f"{timm_name}.safetensors"
        save_file(state, str(safetensors_path))
        original_path = root / f"dinov2_{tag}_pretrain.pth"
        torch.save(_to_facebook_layout(state, seed=4), str(original_path))
        files[timm_name] = (str(safetensors_path), str(original_path))
    return files


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_short_and_timm_names_cover_all_dinov2_sizes():
    for size in ("s", "b", "l", "g"):
        assert f"dinov2-{size}14" in ENCODERS and f"dinov2-{size}14-reg" in ENCODERS
    assert ENCODERS["dinov2-b14-reg"] == "vit_base_patch14_reg4_dinov2"
    assert all(name in timm.list_models("*dinov2*") for name in ENCODERS.values())
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("resnet50", 112, None, allow_random_init=True)


def test_safetensors_file_loads_exact_weights_with_content_label(weight_files):
    path, _ = weight_files[SMALL_REG]
    model, label = build_encoder("dinov2-s14-reg", CHECKPOINT_SIZE, path, allow_random_init=False)
    saved = load_file(path)
    loaded = model.state_dict()
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()[:12]
    assert label == f"file:{SMALL_REG}.safetensors:{sha}"
    assert not model.training


@pytest.mark.parametrize("timm_name", [SMALL_REG, SMALL])
def test_original_facebook_layout_matches_timm_layout(weight_files, timm_name):
    safetensors_path, original_path = weight_files[timm_name]
    # 112 px forces timm to resample the 37x37 position grid to 8x8 for both files.
    from_timm, _ = build_encoder(timm_name, 112, safetensors_path, allow_random_init=False)
    from_original, label = build_encoder(timm_name, 112, original_path, allow_random_init=False)
    assert label.startswith("file:dinov2_vits14")
    images = _images(3, 112)
    a = encode_images(from_timm, images)
    b = encode_images(from_original, images)
    assert a.shape == (3, 8, 8, 384)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    random_model, _ = build_encoder(timm_name, 112, None, allow_random_init=True)
    assert np.abs(encode_images(random_model, images) - a).max() > 1e-2


def test_missing_weights_raise_with_instructions(tmp_path):
    for weights in (None, str(tmp_path / "absent.safetensors")):
        with pytest.raises(MissingWeightsError) as info:
            build_encoder("dinov2-s14-reg", 112, weights, allow_random_init=False)
        message = str(info.value)
        assert "encoder.weights" in message and "encoder.allow_random_init: true" in message
        assert "safetensors" in message and "_pretrain.pth" in message
        assert isinstance(info.value, FileNotFoundError)


def test_random_init_is_seeded_labelled_and_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    state_before = torch.get_rng_state()
    a, label_a = build_encoder("dinov2-s14-reg", 112, None, allow_random_init=True, seed=0)
    assert torch.equal(torch.get_rng_state(), state_before)
    b, label_b = build_encoder(SMALL_REG, 112, str(tmp_path / "absent.pth"), allow_random_init=True, seed=0)
    c, _ = build_encoder("dinov2-s14-reg", 112, None, allow_random_init=True, seed=1)
    assert label_a == label_b == "random-init"
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.pos_embed, c.pos_embed)
    assert torch.equal(torch.get_rng_state(), state_before)


@pytest.mark.parametrize("img_size,side", [(112, 8), (224, 16)])
def test_encode_images_returns_patch_grid_without_prefix_tokens(img_size, side):
    model, _ = build_encoder("dinov2-s14-reg", img_size, None, allow_random_init=True)
    assert grid_size(model) == side and token_dim(model) == 384
    images = _images(3, img_size, seed=1)
    latents = encode_images(model, images, batch_size=2)
    assert latents.dtype == np.float32 and latents.shape == (3, side, side, 384)

    # Manual reference: normalise with the pretrained mean/std, forward_features, drop cls + 4 registers
    # (a random init's final norm has weight 1 and bias 0, so here its affine changes nothing).
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    with torch.no_grad():
        full = model.forward_features(x)
    assert model.num_prefix_tokens == 5 and full.shape[1] == side * side + 5
    expected = full[:, 5:].reshape(3, side, side, 384).numpy()
    np.testing.assert_allclose(latents, expected, rtol=1e-5, atol=1e-5)

    tokens = encode_tensor(model, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    assert tokens.shape == (3, side * side, 384)
    np.testing.assert_allclose(tokens.numpy(), expected.reshape(3, -1, 384), rtol=1e-5, atol=1e-5)


def test_latents_are_the_final_norm_without_its_scale_and_shift():
    """DESIGN section 3 (ref, as RAE): the last LayerNorm normalises only. Compared in float64 against
    timm's forward_features of a copy whose final norm has weight 1 and bias 0: the same ops on the
    same values, so only rounding at 1e-16 relative separates them, far below any affine effect."""
    torch.manual_seed(0)
    model = timm.create_model(SMALL_REG, pretrained=False, img_size=56, num_classes=0).double().eval()
    with torch.no_grad():   # a non-trivial affine, so leaving it out shows
        model.norm.weight.copy_(torch.empty(384, dtype=torch.float64).uniform_(0.5, 2.0))
        model.norm.bias.copy_(torch.randn(384, dtype=torch.float64))
    identity = copy.deepcopy(model)
    with torch.no_grad():
        identity.norm.weight.fill_(1.0)
        identity.norm.bias.zero_()
    images01 = torch.from_numpy(_images(2, 56, seed=5)).permute(0, 3, 1, 2).double() / 255.0
    mean = torch.tensor(model.pretrained_cfg["mean"], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = identity.forward_features((images01 - mean) / std)[:, model.num_prefix_tokens:]
        with_affine = model.forward_features((images01 - mean) / std)[:, model.num_prefix_tokens:]
    tokens = encode_tensor(model, images01)
    assert tokens.dtype == torch.float64 and tokens.shape == (2, 16, 384)
    torch.testing.assert_close(tokens, expected, rtol=1e-12, atol=1e-12)
    assert (tokens - with_affine).abs().max() > 0.1   # the affine would have mattered
    # per token: zero mean and unit variance over channels (up to eps), as a bare LayerNorm gives
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 16, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(2, 16, dtype=torch.float64), rtol=0, atol=1e-4)


def test_encode_images_resizes_other_resolutions_and_supports_autocast():
    model, _ = build_encoder("dinov2-s14", 112, None, allow_random_init=True)
    assert model.num_prefix_tokens == 1
    images = _images(2, 64, seed=2)
    latents = encode_images(model, images)
    assert latents.shape == (2, 8, 8, 384)
    upsized = torch.nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0,
        size=(112, 112), mode="bilinear", align_corners=False, antialias=True,
    )
    np.testing.assert_allclose(latents, encode_tensor(model, upsized).reshape(2, 8, 8, 384).numpy(), atol=1e-5)
    low_precision = encode_images(model, images, dtype=torch.bfloat16)
    assert low_precision.dtype == np.float32
    cosine = (low_precision * latents).sum(-1) / (
        np.linalg.norm(low_precision, axis=-1) * np.linalg.norm(latents, axis=-1)
    )
    assert cosine.min() > 0.95
    with pytest.raises(ValueError):
        encode_images(model, images.astype(np.float32))


def test_folding_layer_scale_keeps_the_tokens():
    """In float64 the folded encoder's tokens equal timm's own blocks' (gamma (W y + b) = (gamma W) y + gamma b)
    to rounding, with non-trivial gammas, and no LayerScale is left to run."""
    from timm.layers import LayerScale

    torch.manual_seed(0)
    model = timm.create_model(SMALL_REG, pretrained=False, img_size=56, num_classes=0).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LayerScale):
                module.gamma.copy_(torch.empty_like(module.gamma).uniform_(-2.0, 2.0))
    images01 = torch.from_numpy(_images(2, 56, seed=3)).permute(0, 3, 1, 2).double() / 255.0
    expected = encode_tensor(model, images01)
    folded = fold_layer_scale(copy.deepcopy(model))
    assert not any(isinstance(m, LayerScale) for m in folded.modules())
    assert sum(isinstance(m, LayerScale) for m in model.modules()) == 2 * len(model.blocks)
    torch.testing.assert_close(encode_tensor(folded, images01), expected, rtol=1e-12, atol=1e-12)
    assert (encode_tensor(fold_layer_scale(timm.create_model(SMALL_REG, pretrained=False, img_size=56,
                                                             num_classes=0).double().eval()), images01)
            - expected).abs().max() > 0.1   # another encoder's tokens differ: the comparison can fail
