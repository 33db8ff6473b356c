"""Issue 17: a weights file that cannot be loaded into the configured encoder fails in a few lines naming
the file, encoder.weights and the first mismatched tensors, through the real loading path (timm with
pretrained_cfg_overlay=dict(file=...)), never with torch's advice to load with weights_only=False.
models.encoder only says which file failed; tasks.encode.encoder_load reads what the file holds."""
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from models.encoder import WeightsError, build_encoder
from tasks.encode.encoder_load import load_encoder

REG = "vit_small_patch14_reg4_dinov2"
SIZE = 56


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))


@pytest.fixture(scope="module")
def vit_tiny_state():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0,
                              weight_init="skip")
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("form", ["safetensors", "pth"])
def test_wrong_architecture_names_the_file_key_and_first_mismatches(tmp_path, vit_tiny_state, form):
    path = tmp_path / f"vit_tiny.{form}"
    if form == "safetensors":
        save_file(vit_tiny_state, str(path))
    else:
        torch.save(vit_tiny_state, str(path))
    with pytest.raises(WeightsError) as info:
        load_encoder(REG, SIZE, str(path), allow_random_init=True)   # never a silent random fallback
    message = str(info.value)
    assert message.startswith(f"encoder.weights {path} does not fit encoder.model {REG}")
    assert "missing (" in message and "reg_token" in message
    assert "patch_embed.proj.weight [192, 3, 16, 16] vs [384, 3, 14, 14]" in message
    assert len(message) < 600 and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__   # no timm traceback chained


@pytest.mark.parametrize("name", ["garbage.safetensors", "garbage.pth"])
def test_garbage_file_says_it_is_not_a_weights_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(os.urandom(2048))
    with pytest.raises(WeightsError, match=f"encoder.weights {path}: cannot be read as a weights file") as info:
        load_encoder(REG, SIZE, str(path), allow_random_init=False)
    assert "weights_only" not in str(info.value)


def test_a_fitting_file_still_loads(tmp_path):
    model = timm.create_model(REG, pretrained=False, img_size=SIZE, num_classes=0, weight_init="skip")
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded, label = load_encoder(REG, SIZE, str(tmp_path / "model.safetensors"), allow_random_init=False)
    assert torch.equal(loaded.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert label.startswith("file:model.safetensors:")


def test_the_model_layer_names_the_file_and_leaves_reading_it_to_the_task(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(WeightsError) as info:
        build_encoder(REG, SIZE, str(path), allow_random_init=True)
    assert info.value.path == str(path) and str(path) in str(info.value)
