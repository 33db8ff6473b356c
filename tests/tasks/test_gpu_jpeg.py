"""encoder.gpu_decoder: the choice of GPU JPEG decoder, its errors, and (on a GPU machine with nvImageCodec)
the hardware engines' pixels against the CPU decoder's."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from storage.config import load_config
from tasks.encode import gpu_jpeg
from tasks.encode.decode import DecodeSplit, decode_cpu, decode_images

HAS_NVIMGCODEC = gpu_jpeg.nvimgcodec_available()


def _smooth_jpeg(height: int, width: int, seed: int, mode: str = "RGB", **save) -> bytes:
    """A photo-like image (smooth gradients and blobs, no per-pixel noise): decoders that differ only in how
    they round the IDCT and upsample chroma then agree within a few levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [128 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform()))
                for _ in range(3)]
    pixels = np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format="JPEG", quality=90, **save)
    return out.getvalue()


def test_the_torchvision_decoder_is_the_default_and_unknown_names_are_refused():
    assert DecodeSplit(0.0).decode_gpu is gpu_jpeg.torchvision_nvjpeg
    with pytest.raises(ValueError, match="unknown GPU JPEG decoder 'nvdec'"):
        DecodeSplit(0.0, gpu_decoder="nvdec")
    cfg = load_config("configs/tiny.yaml", ["encoder.gpu_decoder=nvimgcodec"])
    assert cfg.encoder.gpu_decoder == "nvimgcodec"
    with pytest.raises(ValidationError, match="gpu_decoder"):
        load_config("configs/tiny.yaml", ["encoder.gpu_decoder=nvdec"])


@pytest.mark.skipif(HAS_NVIMGCODEC, reason="nvImageCodec is installed here")
def test_nvimgcodec_missing_is_named_before_any_file_is_read():
    """The stage builds its DecodeSplit before the pass: a missing package stops it there, saying what to
    install, instead of every file falling back to the CPU unseen."""
    with pytest.raises(ImportError, match="pip install nvidia-nvimgcodec-cu13"):
        DecodeSplit(0.0, gpu_decoder="nvimgcodec")


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_NVIMGCODEC),
                    reason="the hardware JPEG engines need CUDA and nvImageCodec (runs on the GPU machine)")
def test_the_hardware_engines_decode_what_the_cpu_decodes_and_refusals_go_to_the_cpu():
    device = torch.device("cuda")
    baseline = [_smooth_jpeg(120 + 8 * i, 160 - 4 * i, i) for i in range(6)]
    grey = _smooth_jpeg(96, 128, 7, mode="L")
    progressive = _smooth_jpeg(100, 140, 8, progressive=True)
    datas = [*baseline, grey, progressive]
    direct = gpu_jpeg.nvimgcodec_hardware(baseline + [grey], device)
    assert all(image is not None for image in direct), "the engines refused a baseline JPEG"
    decoded = decode_images(datas, device, split=DecodeSplit(0.0, gpu_decoder="nvimgcodec"))
    for data, image in zip(datas, decoded):
        expected = decode_cpu(data)
        assert image.device.type == "cuda" and image.dtype == torch.uint8
        assert image.shape == expected.shape   # greyscale comes back as three channels, as on the CPU
        difference = (image.cpu().int() - expected.int()).abs().float()
        assert difference.mean() < 2.0 and difference.max() <= 40, (difference.mean(), difference.max())


def test_auto_takes_nvjpeg_where_the_hardware_decoder_cannot_run_and_says_which_ran(monkeypatch):
    """encoder.gpu_decoder=auto: without nvImageCodec (or where its engines fail their first decode) the files
    go to torchvision's nvjpeg, and the encode stage's decoded_by names it."""
    calls = []
    monkeypatch.setattr(gpu_jpeg, "torchvision_nvjpeg", lambda datas, device: calls.append(len(datas)) or [])
    monkeypatch.setattr(gpu_jpeg, "nvimgcodec_available", lambda: True)

    def engines_fail(cls, device):
        raise RuntimeError("nvImageCodec's hardware JPEG decoder did not decode a baseline JPEG on cuda:0")

    monkeypatch.setattr(gpu_jpeg._HardwareDecoder, "on", classmethod(engines_fail))
    split = DecodeSplit(0.0, gpu_decoder="auto")
    assert split.summary()["gpu_decoder"] == "auto (not yet used)"
    with pytest.warns(UserWarning, match="decoding with torchvision"):
        split.decode_gpu([b"x", b"y"], torch.device("cuda"))
    split.decode_gpu([b"z"], torch.device("cuda"))   # decided once
    assert calls == [2, 1] and split.summary()["gpu_decoder"] == "torchvision"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg's streams need CUDA (runs on the GPU machine)")
@pytest.mark.parametrize("decoder", ["torchvision", "nvimgcodec"])
def test_a_decode_on_a_busy_stream_never_lands_in_memory_its_queued_work_still_writes(decoder):
    """The race behind the H200's 1e38 tokens with decode_ahead 0: a buffer freed while the stream's queued work
    will still write it, then a decode of the same size. Were the decode's output given that buffer (torchvision
    allocates on the caller's stream, writes on its own), the queued fill would land on the decoded pixels."""
    if decoder == "nvimgcodec" and not HAS_NVIMGCODEC:
        pytest.skip("nvImageCodec is not installed here")
    device = torch.device("cuda")
    decode = gpu_jpeg.gpu_decoder(decoder)
    data = _smooth_jpeg(240, 320, 11)
    expected = decode([data], device)[0].clone()
    torch.cuda.synchronize()
    busy = torch.randn(6144, 6144, device=device)
    for _ in range(8):
        slow = busy @ busy @ busy   # tens of ms queued ahead of the fill below
        pending = torch.empty(expected.numel(), dtype=torch.uint8, device=device)
        pending.fill_(0)   # runs after the matmuls, so after the decode below has written its pixels
        del pending, slow
        decoded = decode([data], device)[0]
        torch.cuda.synchronize()
        assert torch.equal(decoded, expected), "queued work overwrote the decoded pixels"
