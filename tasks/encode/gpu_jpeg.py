"""The GPU's JPEG decoders behind one call (encoder.gpu_decoder): a list of JPEG files -> each one's uint8
[3, H, W] on the device, or None where the decoder refuses it (tasks.encode.decode then decodes it on the CPU).

  torchvision  torchvision.io.decode_jpeg(device="cuda") on a list, on a stream of torchvision's own. By its
               source (csrc/io/image/cuda/decode_jpegs_cuda.cpp, 0.19 on) it asks nvjpeg for the hardware
               backend: where the GPU has the engines (A100, H100, H200), the files nvjpegDecodeBatchedSupported
               accepts go to them in one batched call, the rest one file at a time (entropy decode on the host,
               CUDA kernels, a wait on its stream per file); on an H100 all of the bench's first 2,000 files went
               to the engines (bench/nvjpeg_paths.py). Alone on an H100 it decoded 7,800-10,700 img/s, but 95
               img/s while another thread replayed the encoder.
  nvimgcodec   NVIDIA's nvImageCodec (pip: nvidia-nvimgcodec-cu13, or -cu12 for a CUDA 12 torch) on the
               hardware JPEG decode engines (NVJPG: A100, H100, H200), which are not SMs. Alone on an H200 15,600
               img/s; beside the encoder it starved as nvjpeg does (88 img/s): a decode call waits for the
               encoder's queued work, whatever runs it (encoder.decode_ahead 0 avoids that). It decodes on a
               stream of its own (before 11e8396 on the caller's: inline, behind the encoder's last batch) and
               its images are copied there into torch's memory. Only those engines are
               allowed: what they refuse (progressive or
               arithmetic-coded files) comes back None for the CPU, never through CUDA kernels that would starve.
  auto         nvimgcodec where it is installed and its engines decode on this GPU, else torchvision.

No Prefect, Dask or pydantic here (Dask workers import it).
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch

GPU_DECODERS = ("torchvision", "nvimgcodec", "auto")
NVIMGCODEC_MISSING = ("encoder.gpu_decoder=nvimgcodec needs NVIDIA's nvImageCodec: pip install "
                      "nvidia-nvimgcodec-cu13 nvidia-nvjpeg (or nvidia-nvimgcodec-cu12 nvidia-nvjpeg-cu12 for a "
                      "CUDA 12 torch); scripts/gpu_wheels.py carries it to a GPU machine")


_IDLE_STREAMS: dict[int, torch.cuda.Stream] = {}
_idle_made = threading.Lock()


def idle_stream(device: torch.device) -> torch.cuda.Stream:
    """A CUDA stream of this process's own on `device` (cudaStreamCreate, not one of PyTorch's pooled streams,
    which other code is handed too) that never runs a kernel: memory the caching allocator gives out for it was
    freed only once every use of it had finished, so a write from any other stream may land there at once."""
    import ctypes

    index = device.index if device.index is not None else torch.cuda.current_device()
    with _idle_made:
        if index not in _IDLE_STREAMS:
            handle = ctypes.c_void_p()
            with torch.cuda.device(index):
                error = torch.cuda.cudart().cudaStreamCreate(ctypes.addressof(handle))
            if int(error) != 0:
                raise RuntimeError(f"cudaStreamCreate failed on cuda:{index}: {error}")
            _IDLE_STREAMS[index] = torch.cuda.ExternalStream(handle.value, device=index)
        return _IDLE_STREAMS[index]


def as_uint8_tensor(data: bytes | bytearray) -> torch.Tensor:
    """A file's bytes as a uint8 tensor: a bytearray (what the readers give) as it is, bytes copied once (torch
    wraps only writable buffers)."""
    return torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)


def torchvision_nvjpeg(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """One batched nvjpeg call; when it fails, file by file, None where nvjpeg refuses (the CPU retries).

    torchvision allocates the output on the caller's current stream but writes it on a stream of its own,
    ordered after none of the caller's queued work. On a busy stream the allocator may hand out a block that
    queued kernels still read or write (the last batch's images, the resize's scratch), and the decode and
    those kernels then overwrite each other: on an H200 with decode_ahead 0 the statistics pass saw tokens
    of 1e38 (docs/gpu.md). So the call allocates on an idle stream, and the caller's stream waits for it and
    is recorded as the outputs' user (their memory is reused only after that stream's use)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [as_uint8_tensor(d) for d in datas]
    caller = torch.cuda.current_stream(device)
    own = idle_stream(device)
    with torch.cuda.stream(own):
        try:
            out = list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out = []
            for tensor in tensors:
                try:
                    out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
    caller.wait_stream(own)
    for image in out:
        if image is not None:
            image.record_stream(caller)
    return out


def nvimgcodec_available() -> bool:
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


class _HardwareDecoder:
    """One nvImageCodec decoder a device, hardware engines only, used by one thread at a time."""
    _by_device: dict[int, "_HardwareDecoder"] = {}
    _made = threading.Lock()

    def __init__(self, index: int):
        from nvidia import nvimgcodec

        self.codec = nvimgcodec
        self.decoder = nvimgcodec.Decoder(device_id=index,
                                          backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
        # EXIF orientation is not applied, as by every other decoder here (PIL and ImageFolder do not)
        self.params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                              sample_format=nvimgcodec.SampleFormat.I_RGB)
        self.lock = threading.Lock()
        # decodes run here, not on the caller's stream: decoding inline, that is the encoder's, and a decode
        # queued behind the last batch's encoder waited for it (torchvision decodes on a stream of its own too)
        self.stream = torch.cuda.Stream(index)
        if self._one(nvimgcodec.CodeStream(_small_jpeg()), torch.cuda.current_stream(index)) is None:
            # no nvJPEG library found, or a GPU without the engines: say so, once
            raise RuntimeError(f"nvImageCodec's hardware JPEG decoder did not decode a baseline JPEG on cuda:{index} "
                               "(no nvJPEG library, or a GPU without JPEG engines): use encoder.gpu_decoder="
                               "torchvision")

    def _one(self, code, stream: torch.cuda.Stream):
        try:
            return self.decoder.decode(code, params=self.params, cuda_stream=stream.cuda_stream)
        except RuntimeError:
            return None

    @classmethod
    def on(cls, device: torch.device) -> "_HardwareDecoder":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with cls._made:
            if index not in cls._by_device:
                cls._by_device[index] = cls(index)
            return cls._by_device[index]

    def __call__(self, datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
        if not datas:
            return []
        # bytes, as it was given before the readers gave bytearrays (a bytearray is untried on its CodeStream)
        streams = [self.codec.CodeStream(bytes(data)) for data in datas]
        caller, own = torch.cuda.current_stream(device), self.stream
        with self.lock, torch.cuda.stream(own):
            try:
                images = self.decoder.decode(streams, params=self.params, cuda_stream=own.cuda_stream)
            except RuntimeError:   # the batch failed as a whole: file by file, None where a file fails
                images = [self._one(code, own) for code in streams]
            # H x W x 3 copied on the decode's stream into memory of torch's, allocated there: nvImageCodec's own
            # buffers go back to it when the Images do, ordered on that stream, after these copies
            out = [None if image is None else torch.as_tensor(image, device=device).clone() for image in images]
        caller.wait_stream(own)
        for image in out:
            if image is not None:
                image.record_stream(caller)   # its memory is reused only after the caller's use
        return [None if image is None else image.permute(2, 0, 1) for image in out]


def _small_jpeg() -> bytes:
    """A 160 x 128 baseline 4:2:0 JPEG (a gradient), what every JPEG decoder takes."""
    import io

    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 160, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.stack([np.tile(ramp, (128, 1))] * 3, -1)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def nvimgcodec_hardware(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    return _HardwareDecoder.on(device)(datas, device)


class FirstThatWorks:
    """encoder.gpu_decoder=auto: nvImageCodec's hardware engines where it is installed and decodes on this
    GPU (checked at the first call), else torchvision's nvjpeg; `chosen` names the one that runs."""

    def __init__(self):
        self.chosen: str | None = None
        self._decode = None

    def __call__(self, datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
        if self._decode is None:
            self.chosen, self._decode = "torchvision", torchvision_nvjpeg
            if nvimgcodec_available():
                try:
                    _HardwareDecoder.on(device)
                    self.chosen, self._decode = "nvimgcodec", nvimgcodec_hardware
                except RuntimeError as error:
                    warnings.warn(f"encoder.gpu_decoder=auto: {error}; decoding with torchvision", stacklevel=2)
        return self._decode(datas, device)


def gpu_decoder(name: str) -> Callable[[list[bytes], torch.device], list[torch.Tensor | None]]:
    """The decode call of encoder.gpu_decoder `name`; a clear error when its package is missing."""
    if name == "torchvision":
        return torchvision_nvjpeg
    if name == "auto":
        return FirstThatWorks()
    if name == "nvimgcodec":
        if not nvimgcodec_available():
            raise ImportError(NVIMGCODEC_MISSING)
        return nvimgcodec_hardware
    raise ValueError(f"unknown GPU JPEG decoder {name!r}: one of {', '.join(GPU_DECODERS)}")


def decoder_name(decode: Callable, name: str) -> str:
    """Which decoder `decode` (from gpu_decoder(name)) is: auto's choice once it has run."""
    return (decode.chosen or "auto (not yet used)") if isinstance(decode, FirstThatWorks) else name
