"""bench/nvjpeg_paths.py: which of torchvision's CUDA decode paths a JPEG takes, asked of nvjpeg itself."""
import ctypes
import io

import numpy as np
import pytest
import torch
from PIL import Image

from bench.nvjpeg_paths import _bind, nvjpeg_library, nvjpeg_paths


def _jpeg(progressive: bool, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def test_the_library_torchvision_decodes_with_is_found_and_exports_what_the_probe_calls():
    path = nvjpeg_library()
    if path is None:
        pytest.skip("this torchvision ships no libnvjpeg and the system has none")
    lib = _bind(ctypes.CDLL(path))   # argtypes set on every function the probe calls: each symbol exists
    assert all(hasattr(lib, name) for name in ("nvjpegCreateEx", "nvjpegJpegStreamParseHeader",
                                               "nvjpegDecodeBatchedSupported", "nvjpegDestroy"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
def test_without_a_gpu_it_says_why_instead_of_counting():
    result = nvjpeg_paths([_jpeg(False)])
    assert set(result) == {"skipped"} and "CUDA" in result["skipped"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg's hardware backend needs CUDA (GPU machine)")
def test_baseline_files_go_to_the_engines_and_progressive_ones_one_by_one():
    result = nvjpeg_paths([_jpeg(False, s) for s in range(3)] + [_jpeg(True, 9)])
    assert "skipped" not in result, result
    if "note" in result:   # a GPU without JPEG engines: torchvision decodes every file one at a time
        assert result["per_file"] == 4
        return
    assert (result["hardware"], result["per_file"], result["unparsed"]) == (3, 1, 0), result
