"""Which of torchvision's two CUDA decode paths each JPEG takes (docs/gpu.md, "The hardware JPEG engines").

torchvision's batched `decode_jpeg(device="cuda")` creates its nvjpeg handle with the hardware backend where
the GPU has JPEG engines (A100, H100, H200) and sends them every file for which nvjpegDecodeBatchedSupported
answers 0; every other file is decoded one at a time on the hybrid path, with a stream synchronisation per
file. This asks nvjpeg the same question through ctypes, with the nvjpeg library torchvision ships (else the
system's), so a bench can say which path its files took: {"hardware": n, "per_file": m, "unparsed": k,
"library": path}, or {"skipped": reason}. A diagnostic for the benches; the product never calls it.
"""
from __future__ import annotations

import ctypes
import glob
from pathlib import Path

NVJPEG_BACKEND_HARDWARE = 3       # nvjpegBackend_t
NVJPEG_STATUS_ARCH_MISMATCH = 7   # nvjpegStatus_t: this GPU has no JPEG engines


def nvjpeg_library() -> str | None:
    """The path (or soname) of a loadable libnvjpeg: torchvision's bundled copy first, as it decodes with it."""
    import torchvision

    site = Path(torchvision.__file__).parent.parent
    candidates = [*sorted(glob.glob(str(site / "torchvision.libs" / "libnvjpeg*.so*"))),
                  *sorted(glob.glob(str(site / "nvidia" / "*" / "lib" / "libnvjpeg.so*"))), "libnvjpeg.so"]
    for candidate in candidates:
        try:
            ctypes.CDLL(candidate)
            return candidate
        except OSError:
            continue
    return None


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    handle, stream = ctypes.c_void_p, ctypes.c_void_p
    lib.nvjpegCreateEx.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
                                   ctypes.POINTER(handle)]
    lib.nvjpegJpegStreamCreate.argtypes = [handle, ctypes.POINTER(stream)]
    lib.nvjpegJpegStreamParseHeader.argtypes = [handle, ctypes.c_void_p, ctypes.c_size_t, stream]
    lib.nvjpegDecodeBatchedSupported.argtypes = [handle, stream, ctypes.POINTER(ctypes.c_int)]
    lib.nvjpegJpegStreamDestroy.argtypes = [stream]
    lib.nvjpegDestroy.argtypes = [handle]
    return lib


def nvjpeg_paths(datas: list[bytes]) -> dict:
    """How many of `datas` torchvision's decoder would send to the JPEG engines, and how many one by one."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: nvjpeg's hardware backend needs one"}
    torch.cuda.current_device()   # a CUDA context, as torchvision has when it creates its handle
    path = nvjpeg_library()
    if path is None:
        return {"skipped": "no loadable libnvjpeg (torchvision.libs, nvidia/*/lib or the system's)"}
    lib = _bind(ctypes.CDLL(path))
    handle = ctypes.c_void_p()
    status = lib.nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE, None, None, 0, ctypes.byref(handle))
    if status == NVJPEG_STATUS_ARCH_MISMATCH:   # torchvision then decodes every file one at a time
        return {"hardware": 0, "per_file": len(datas), "unparsed": 0, "library": path,
                "note": "no JPEG engines on this GPU (nvjpegCreateEx: status 7)"}
    if status != 0:
        return {"skipped": f"nvjpegCreateEx with the hardware backend returned status {status}"}
    stream = ctypes.c_void_p()
    counts = {"hardware": 0, "per_file": 0, "unparsed": 0}
    try:
        if lib.nvjpegJpegStreamCreate(handle, ctypes.byref(stream)) != 0:
            return {"skipped": "nvjpegJpegStreamCreate failed"}
        for data in datas:
            buffer = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
            if lib.nvjpegJpegStreamParseHeader(handle, buffer, len(data), stream) != 0:
                counts["unparsed"] += 1
                continue
            supported = ctypes.c_int(-1)
            lib.nvjpegDecodeBatchedSupported(handle, stream, ctypes.byref(supported))
            counts["hardware" if supported.value == 0 else "per_file"] += 1
    finally:
        if stream.value:
            lib.nvjpegJpegStreamDestroy(stream)
        lib.nvjpegDestroy(handle)
    return {**counts, "library": path}
