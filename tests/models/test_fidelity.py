import math

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as inception_module

from models.fidelity import fidelity_unavailable_reason, inception_metrics

N_IMAGES = 8
SIZE = 32


def _no_download(*args, **kwargs):
    raise AssertionError("torch-fidelity tried to download Inception weights")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised Inception file in torch-fidelity's own key layout."""
    with pytest.MonkeyPatch.context() as patch:
        # Build the real module without its download/load step, then save its state dict.
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *a, **k: None)
        patch.setattr(inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        network = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(0)
    # He-scaled weights keep activations alive through ~90 layers, so features are not degenerate.
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in)
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data = 1 + 0.1 * torch.randn(module.weight.shape, generator=generator)
            module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=generator)
        elif isinstance(module, torch.nn.Linear):
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * 30 / math.sqrt(module.in_features)
            module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=generator)
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(network.state_dict(), str(path))
    return str(path)


@pytest.fixture(autouse=True)
def _sandbox(monkeypatch, tmp_path):
    monkeypatch.setattr(inception_module, "load_state_dict_from_url", _no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    yield
    # cache=False must mean no feature cache anywhere, not even under TORCH_HOME.
    assert not (tmp_path / "torch_home").exists()


def _noise_images(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)


def _smooth_images(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, SIZE)
    images = np.empty((N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(N_IMAGES):
        colour = rng.uniform(0, 255, size=3)
        field = np.outer(ramp, rng.uniform(0.2, 1.0, size=SIZE))[..., None] * colour
        images[i] = field.clip(0, 255).astype(np.uint8)
    return images


def test_identical_sets_have_zero_fid(inception_weights):
    half = N_IMAGES // 2
    images = np.concatenate([_noise_images(0)[:half], _smooth_images(1)[:half]])
    result = inception_metrics(images, images.copy(), inception_weights, batch_size=4)
    assert set(result) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std"}
    assert all(np.isfinite(v) for v in result.values())
    assert abs(result["fid"]) < 1e-2
    # Splits of one image would pin IS at exactly 1; a mixed set must score above it.
    assert result["is_mean"] > 1.0 + 1e-4


def test_different_sets_score_apart(inception_weights):
    noise, smooth = _noise_images(1), _smooth_images(2)
    result = inception_metrics(noise, smooth, inception_weights, metrics=("fid", "kid"), kid_subset_size=6)
    assert set(result) == {"fid", "kid_mean", "kid_std"}
    assert all(np.isfinite(v) for v in result.values())
    assert result["fid"] > 1e-2
    assert result["kid_mean"] > 0


def test_argument_checks(inception_weights, tmp_path):
    images = _noise_images(3)
    with pytest.raises(ValueError, match="subset"):
        inception_metrics(images, images, inception_weights, metrics=("fid", "lpips"))
    with pytest.raises(ValueError, match="uint8"):
        inception_metrics(images.astype(np.float32), images, inception_weights)
    with pytest.raises(FileNotFoundError, match="not found"):
        inception_metrics(images, images, str(tmp_path / "missing.pth"))


def test_unavailable_reason(inception_weights, tmp_path):
    assert fidelity_unavailable_reason(inception_weights) is None
    assert fidelity_unavailable_reason(None) == "no Inception weights configured (evaluate.inception_weights)"
    assert fidelity_unavailable_reason("") == "no Inception weights configured (evaluate.inception_weights)"
    missing = str(tmp_path / "pt_inception.pth")
    assert fidelity_unavailable_reason(missing) == f"Inception weights file not found: {missing}"
