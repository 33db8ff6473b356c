"""Real-weight loading: the test writes one random DINOv2 in every supported format itself
(timm safetensors, Meta's original *_pretrain.pth layout, an HF hub cache tree) and checks that
build_encoder loads exactly the saved parameters from each, without any network."""
import hashlib
import os

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from models.encoder import (MissingWeightsError, build_encoder, encode_images, resolve_weights,
                            weights_label)

REG = "vit_small_patch14_reg4_dinov2"
PLAIN = "vit_small_patch14_dinov2"
SIZE = 56          # a 4x4 token grid keeps the model small and fast
REPO = f"models--timm--{REG}.lvd142m"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def _quantised(tensor: torch.Tensor) -> torch.Tensor:
    # Multiples of 2^-8: cls_token -/+ the class position is then exact in float32.
    return torch.round(tensor * 256) / 256


def _random_state(timm_name: str, seed: int) -> dict[str, torch.Tensor]:
    # Every tensor random (timm's own init is slow and leaves gammas/tokens constant, hiding mix-ups).
    generator = torch.Generator().manual_seed(seed)
    model = timm.create_model(timm_name, pretrained=False, img_size=SIZE, num_classes=0, weight_init="skip")
    return {key: _quantised(torch.randn(value.shape, generator=generator) * 0.1)
            for key, value in model.state_dict().items()}


def _meta_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm keys -> Meta's dinov2_*_pretrain.pth keys (the inverse of timm's _convert_dinov2)."""
    meta = {k: v.clone() for k, v in state.items()}
    dim = state["cls_token"].shape[-1]
    meta["mask_token"] = torch.randn(1, dim)
    if "reg_token" in meta:
        class_position = _quantised(torch.randn(1, 1, dim))
        meta["register_tokens"] = meta.pop("reg_token")
        meta["cls_token"] = state["cls_token"] - class_position
        meta["pos_embed"] = torch.cat([class_position, state["pos_embed"]], dim=1)
    return meta


def _hf_cache(root, state) -> str:
    """root/models--timm--<name>.lvd142m laid out as huggingface_hub writes it: blobs, symlinked
    snapshot files, refs/main naming the current snapshot (a stale second snapshot beside it)."""
    repo = root / REPO
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    blob = repo / "blobs" / "0123abcd"
    save_file(state, str(blob))
    for snapshot, target in (("aaaa1111", blob), ("ffff9999", None)):
        folder = repo / "snapshots" / snapshot
        folder.mkdir(parents=True)
        if target is not None:
            os.symlink(os.path.relpath(target, folder), folder / "model.safetensors")
        else:   # stale snapshot: must not be picked over refs/main
            save_file({"pos_embed": torch.zeros(1)}, str(folder / "model.safetensors"))
    (repo / "refs" / "main").write_text("aaaa1111")
    return str(repo / "snapshots" / "aaaa1111" / "model.safetensors")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov2-weights")
    out = {}
    for timm_name, tag in ((REG, "vits14_reg4"), (PLAIN, "vits14")):
        state = _random_state(timm_name, seed=7)
        save_file(state, str(root / f"{timm_name}.safetensors"))
        torch.save(_meta_layout(state), str(root / f"dinov2_{tag}_pretrain.pth"))
        out[timm_name] = {"state": state, "safetensors": str(root / f"{timm_name}.safetensors"),
                          "meta": str(root / f"dinov2_{tag}_pretrain.pth")}
    out["cache_root"] = root / "hub"
    out["cache_file"] = _hf_cache(out["cache_root"], out[REG]["state"])
    return out


def _reference_output(timm_name, state, images):
    model = timm.create_model(timm_name, pretrained=False, img_size=SIZE, num_classes=0, weight_init="skip").eval()
    model.load_state_dict(state, strict=True)
    return encode_images(model, images)


@pytest.mark.parametrize("timm_name,form", [(REG, "safetensors"), (REG, "meta"), (PLAIN, "meta"),
                                            (REG, "hf-cache-env")])
def test_each_format_loads_the_saved_parameters_exactly(saved, monkeypatch, timm_name, form):
    state = saved[timm_name]["state"]
    if form == "hf-cache-env":
        monkeypatch.setenv("HF_HUB_CACHE", str(saved["cache_root"]))
        weights = "hf-cache"
    else:
        weights = saved[timm_name][form]
    model, label = build_encoder(timm_name, SIZE, weights, allow_random_init=False)
    loaded = model.state_dict()
    assert set(loaded) == set(state)                       # mask_token dropped, registers renamed
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    images = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    assert np.array_equal(encode_images(model, images), _reference_output(timm_name, state, images))
    path = resolve_weights(timm_name, weights)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:12]
    assert label == f"file:{os.path.basename(path)}:{digest}" == weights_label(timm_name, weights, False)


def test_cache_resolution_follows_refs_main_from_every_entry_point(saved, monkeypatch):
    expected = os.path.realpath(saved["cache_file"])
    repo = saved["cache_root"] / REPO
    for weights in (str(saved["cache_root"]), str(repo), str(repo / "snapshots" / "aaaa1111")):
        assert os.path.realpath(resolve_weights(REG, weights)) == expected
    monkeypatch.setenv("HF_HOME", str(saved["cache_root"].parent))   # HF_HOME/hub is the cache
    assert os.path.realpath(resolve_weights(REG, "hf-cache")) == expected
    assert os.path.realpath(resolve_weights(REG, str(saved["cache_root"].parent))) == expected
    assert resolve_weights(PLAIN, str(saved["cache_root"])) is None    # another model is not in this cache
    # The timm name with its pretrained tag is accepted from config as well.
    model, label = build_encoder(REG + ".lvd142m", SIZE, str(saved["cache_root"]), allow_random_init=False)
    assert label.startswith("file:model.safetensors:")


def test_meta_checkpoint_position_grid_is_resampled_like_timm_layout(saved):
    from_timm, _ = build_encoder(REG, 2 * SIZE, saved[REG]["safetensors"], allow_random_init=False)
    from_meta, _ = build_encoder(REG, 2 * SIZE, saved[REG]["meta"], allow_random_init=False)
    assert from_meta.pos_embed.shape == (1, 64, 384)
    assert torch.equal(from_meta.pos_embed, from_timm.pos_embed)
    assert torch.equal(from_meta.cls_token, saved[REG]["state"]["cls_token"])
    # The resampled grid still carries the saved one: the 4x4 corners of the 8x8 grid are close.
    assert not torch.equal(from_meta.pos_embed[:, :16], saved[REG]["state"]["pos_embed"])


def test_missing_weights_name_the_file_or_cache_and_the_config_key(tmp_path):
    missing = tmp_path / "dinov2_vitb14_reg4_pretrain.pth"
    with pytest.raises(MissingWeightsError, match="encoder.weights") as info:
        build_encoder("vit_base_patch14_reg4_dinov2", 224, str(missing), allow_random_init=False)
    assert str(missing) in str(info.value)
    empty_cache = tmp_path / "hub"
    empty_cache.mkdir()
    with pytest.raises(MissingWeightsError) as info:
        build_encoder(REG, SIZE, str(empty_cache), allow_random_init=False)
    message = str(info.value)
    assert str(empty_cache) in message and f"{REPO}/snapshots/<hash>/model.safetensors" in message
    assert "encoder.weights" in message and "encoder.allow_random_init" in message
    with pytest.raises(MissingWeightsError, match="hf-cache"):
        weights_label(REG, "hf-cache", allow_random_init=False)   # HF_HOME points at an empty folder
    assert weights_label(REG, str(empty_cache), allow_random_init=True) == "random-init"
