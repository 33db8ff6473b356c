import math
import pickle
import socket
import urllib.request

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as inception_module
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from models.encoder import build_encoder
from models.evaluation.fidelity import (
    UInt8ImageDataset,
    dinov2_extractor_label,
    dinov2_feature_fn,
    fidelity_unavailable_reason,
    inception_extractor_label,
    inception_feature_fn,
    inception_metrics,
    inception_score_from_logits,
    kid_from_features,
    register_dinov2_extractor,
)
from models.evaluation.metrics import fd_from_features, feature_stats, frechet_distance

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


# ---------------------------------------------------------------------------
# Streamed Inception features and numpy KID / IS
# ---------------------------------------------------------------------------


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.slow
def test_streamed_inception_features_match_torch_fidelity(inception_weights):
    half = N_IMAGES // 2
    # A mixed generated set, so that its IS is clearly above 1.
    generated, real = np.concatenate([_noise_images(4)[:half], _smooth_images(11)[:half]]), _smooth_images(5)
    batch = 5   # several streamed batches; torch-fidelity runs at the same batch size, so both sides
    # are the same float32 computation (a different batch picks other conv paths: last-bit changes
    # that IS's std over 4 splits amplifies past any fixed tolerance, and differently by CPU)
    features_of = inception_feature_fn(inception_weights, batch_size=batch)
    gen, ref = features_of(generated), features_of(real)
    assert gen["pool"].shape == (N_IMAGES, 2048) and gen["logits"].shape == (N_IMAGES, 1008)
    assert np.all(np.isfinite(gen["pool"])) and np.all(np.isfinite(gen["logits"]))
    raw = torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(generated), input2=UInt8ImageDataset(real),
        fid=True, kid=True, isc=True, feature_extractor="inception-v3-compat", batch_size=batch,
        feature_extractor_weights_path=inception_weights, kid_subset_size=6, isc_splits=4,
        cuda=False, cache=False, save_cpu_ram=True, verbose=False,
    )
    (mu1, sigma1), (mu2, sigma2) = feature_stats(gen["pool"]), feature_stats(ref["pool"])
    fid = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert fid > 1e-2
    # torch-fidelity takes sqrt of np.linalg.eigvals(sigma1 @ sigma2), a non-symmetric float64 problem
    # whose ~2040 null eigenvalues come back as round-off of size <= eps64 * ||sigma1 sigma2||, each
    # adding at most the square root of that to the trace; its means are float32 (<= eps32 each).
    eps32, eps64, dim = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps), len(mu1)
    fid_bound = (2 * dim * math.sqrt(eps64 * np.linalg.norm(sigma1 @ sigma2))
                 + 4 * eps32 * np.linalg.norm(mu1 - mu2) * (np.linalg.norm(mu1) + np.linalg.norm(mu2)))
    assert fid_bound < 1e-4 * fid   # the bound is tight enough to catch a wrong term
    assert abs(fid - raw[torch_fidelity.KEY_METRIC_FID]) < fid_bound
    # torch-fidelity's defaults: rng_seed=2020 for KID subsets and the IS shuffle, 100 subsets.
    kid_mean, kid_std = kid_from_features(gen["pool"], ref["pool"], subsets=100, subset_size=6, seed=2020)
    assert kid_mean > 0
    # torch-fidelity evaluates the kernels in the features' dtype: float32 end to end, where KID (a
    # difference of kernel sums ~400x its size) keeps only ~4 digits, machine-dependent. So: its formula
    # on our float64 features is ours to float64 rounding, and its float32 end-to-end KID is its formula
    # on our float32 features (the same computation on the same, bit-equal, features).
    kid_kwargs = dict(kid_subsets=100, kid_subset_size=6, rng_seed=2020, verbose=False, kid_kernel="poly",
                      kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    as_tensor = lambda features, dtype: torch.from_numpy(features).to(dtype)   # noqa: E731
    kid64 = kid_features_to_metric(as_tensor(gen["pool"], torch.float64), as_tensor(ref["pool"], torch.float64),
                                   **kid_kwargs)
    assert _rel(kid_mean, kid64[torch_fidelity.KEY_METRIC_KID_MEAN]) < 1e-9
    assert _rel(kid_std, kid64[torch_fidelity.KEY_METRIC_KID_STD]) < 1e-9
    kid32 = kid_features_to_metric(as_tensor(gen["pool"], torch.float32), as_tensor(ref["pool"], torch.float32),
                                   **kid_kwargs)
    assert _rel(raw[torch_fidelity.KEY_METRIC_KID_MEAN], kid32[torch_fidelity.KEY_METRIC_KID_MEAN]) < 1e-12
    assert _rel(raw[torch_fidelity.KEY_METRIC_KID_STD], kid32[torch_fidelity.KEY_METRIC_KID_STD]) < 1e-12
    is_mean, is_std = inception_score_from_logits(gen["logits"], splits=4, shuffle_seed=2020)
    assert is_mean > 1.0 + 1e-4
    # The formula on the same logits: torch-fidelity's own IS of our logits.
    same_logits = isc_features_to_metric(torch.from_numpy(gen["logits"]), splits=4, shuffle=True, rng_seed=2020)
    assert _rel(is_mean, same_logits[torch_fidelity.KEY_METRIC_ISC_MEAN]) < 1e-12
    assert _rel(is_std, same_logits[torch_fidelity.KEY_METRIC_ISC_STD]) < 1e-9
    # End to end: torch-fidelity's own features of the same images at the same batch are ours bit for
    # bit, so its IS differs from ours only by the formula's float64 rounding.
    extractor = create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased"], cuda=False,
                                         feature_extractor_weights_path=inception_weights)
    theirs = get_featuresdict_from_dataset(UInt8ImageDataset(generated), extractor, batch, False, True, False)
    np.testing.assert_array_equal(gen["pool"], theirs["2048"].numpy())
    np.testing.assert_array_equal(gen["logits"], theirs["logits_unbiased"].numpy())
    assert _rel(is_mean, raw[torch_fidelity.KEY_METRIC_ISC_MEAN]) < 1e-12
    assert _rel(is_std, raw[torch_fidelity.KEY_METRIC_ISC_STD]) < 1e-9


class _NotATensor:
    pass


def test_inception_feature_fn_refuses_missing_or_unsafe_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        inception_feature_fn(str(tmp_path / "missing.pth"))
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"weight": _NotATensor()}, str(unsafe))
    with pytest.raises(pickle.UnpicklingError):
        inception_feature_fn(str(unsafe))


def test_inception_extractor_label_names_the_weights(inception_weights):
    label = inception_extractor_label(inception_weights)
    assert label.startswith("inception-v3-compat:file:inception-random.pth:")
    assert len(label.rsplit(":", 1)[1]) == 12


def _cubic(x: np.ndarray, y: np.ndarray) -> float:
    return (float(np.dot(x, y)) / len(x) + 1.0) ** 3


def _direct_unbiased_mmd(x: np.ndarray, y: np.ndarray) -> float:
    m = len(x)
    xx = sum(_cubic(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(_cubic(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(_cubic(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (m * m)


def test_kid_matches_direct_unbiased_mmd():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 3))
    b = rng.normal(loc=0.5, size=(5, 3))
    # Subsets as large as both sets are permutations of them: every estimate is the full MMD.
    mean, std = kid_from_features(a, b, subsets=3, subset_size=1000)
    assert mean == pytest.approx(_direct_unbiased_mmd(a, b), rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)
    # Smaller subsets: drawn a then b per subset with RandomState(seed).choice, without replacement.
    a6 = rng.normal(size=(6, 3))
    mean, std = kid_from_features(a6, b, subsets=2, subset_size=4, seed=7)
    draws = np.random.RandomState(7)
    estimates = []
    for _ in range(2):
        xs = a6[draws.choice(6, 4, replace=False)]
        ys = b[draws.choice(5, 4, replace=False)]
        estimates.append(_direct_unbiased_mmd(xs, ys))
    assert mean == pytest.approx(np.mean(estimates), rel=1e-12)
    assert std == pytest.approx(np.std(estimates), rel=1e-9)
    with pytest.raises(ValueError, match="dims"):
        kid_from_features(a, b[:, :2])


def test_inception_score_matches_hand_computation():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.5], [1.0, 1.0, 1.0], [-2.0, 0.0, 4.0], [0.3, -0.7, 0.1]])

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    def split_score(rows):
        p = [softmax(r) for r in rows]
        q = [sum(pi[k] for pi in p) / len(p) for k in range(3)]
        kl = [sum(pi[k] * math.log(pi[k] / q[k]) for k in range(3)) for pi in p]
        return math.exp(sum(kl) / len(kl))

    # Splits of 5 rows into 2: rows [0, 2) and [2, 5).
    scores = [split_score(logits[:2]), split_score(logits[2:])]
    mean, std = inception_score_from_logits(logits, splits=2)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)
    assert inception_score_from_logits(logits, splits=1)[0] == pytest.approx(split_score(logits), rel=1e-12)
    # Shuffling permutes rows with RandomState(seed) before splitting.
    order = np.random.RandomState(3).permutation(5)
    assert inception_score_from_logits(logits, splits=2, shuffle_seed=3)[0] == pytest.approx(
        inception_score_from_logits(logits[order], splits=2)[0], rel=1e-12)
    # Uniform predictions score 1; confident predictions on K distinct classes score K.
    assert inception_score_from_logits(np.zeros((4, 3)), splits=2) == pytest.approx((1.0, 0.0))
    assert inception_score_from_logits(200.0 * np.eye(3), splits=1)[0] == pytest.approx(3.0, rel=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score_from_logits(logits, splits=6)


# ---------------------------------------------------------------------------
# FD-DINOv2 through a torch-fidelity extractor around our timm encoder
# ---------------------------------------------------------------------------

DINO_SIZE = 56


@pytest.fixture(scope="module")
def dino_encoder():
    encoder, label = build_encoder("dinov2-s14", DINO_SIZE, None, allow_random_init=True, seed=0)
    # DINOv2 initialises its LayerScale gammas at 1e-5, which leaves a random-init class token
    # almost independent of the image; unit gammas make the features depend on the input.
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(getattr(module, "gamma", None), torch.nn.Parameter):
                module.gamma.fill_(1.0)
    return encoder, label


def _fd_dinov2(name: str, first: np.ndarray, second: np.ndarray) -> float:
    raw = torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(first), input2=UInt8ImageDataset(second),
        fid=True, feature_extractor=name, feature_layer_fid="dinov2",
        batch_size=5, cuda=False, cache=False, save_cpu_ram=True, verbose=False,
    )
    return raw[torch_fidelity.KEY_METRIC_FID]


def _offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torch.hub, "load", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_fd_dinov2_through_registered_extractor(dino_encoder, monkeypatch):
    _offline(monkeypatch)
    encoder, weights_label = dino_encoder
    name = register_dinov2_extractor(encoder, weights_label)
    mixed = np.concatenate([_noise_images(6)[:4], _smooth_images(7)[:4]])
    assert abs(_fd_dinov2(name, mixed, mixed.copy())) < 1e-3
    noise, smooth = _noise_images(8), _smooth_images(9)
    fd = _fd_dinov2(name, noise, smooth)
    assert fd > 1e-2
    features_of = dinov2_feature_fn(encoder, batch_size=3)
    noise_features, smooth_features = features_of(noise), features_of(smooth)
    assert noise_features.shape == (N_IMAGES, encoder.embed_dim) and noise_features.dtype == np.float32
    # The feature is the class token after the final norm.
    with torch.no_grad():
        direct = encoder.forward_features(_to_encoder_input(encoder, noise))[:, 0].numpy()
    np.testing.assert_allclose(noise_features, direct, rtol=1e-5, atol=1e-5)
    assert _rel(fd_from_features(noise_features, smooth_features), fd) < 1e-4


def _to_encoder_input(encoder, images: np.ndarray) -> torch.Tensor:
    from models.encoder import _normalise

    return _normalise(encoder, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)


def test_offline_guard_catches_torch_fidelitys_own_dinov2(monkeypatch):
    # The guard used above is real: torch-fidelity's own DINOv2 extractor trips it.
    _offline(monkeypatch)
    images = _noise_images(10)
    with pytest.raises(AssertionError, match="network access attempted"):
        _fd_dinov2("dinov2-vit-s-14", images, images)


def test_dinov2_registration_is_idempotent_and_weights_specific(dino_encoder):
    encoder, weights_label = dino_encoder
    name = register_dinov2_extractor(encoder, weights_label)
    assert name.startswith("tf-dinov2-") and name in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
    assert register_dinov2_extractor(encoder, weights_label) == name
    assert register_dinov2_extractor(encoder, "file:model.safetensors:0123456789ab") != name
    other_seed, other_label = build_encoder("dinov2-s14", DINO_SIZE, None, allow_random_init=True, seed=1)
    assert register_dinov2_extractor(other_seed, other_label) != name
    label = dinov2_extractor_label(encoder, weights_label)
    assert label.startswith(f"dinov2-cls:vit_small_patch14_dinov2@{DINO_SIZE}:random-init:")
    assert dinov2_extractor_label(other_seed, other_label) != label
