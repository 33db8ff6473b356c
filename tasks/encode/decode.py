"""Image file bytes -> decoded RGB tensors -> the encoder's input, on the GPU or the CPU.

On CUDA the JPEGs nvjpeg can take go through the GPU decoder (tasks.encode.gpu_jpeg: torchvision's nvjpeg or
nvImageCodec on the hardware JPEG engines) in batched calls, but for a share (DecodeSplit) that CPU threads
decode meanwhile; everything else, and every file the GPU decoder refuses, goes to the CPU decoder one by
one: libjpeg-turbo through torchvision for JPEGs, then PIL (storage.sources.to_rgb) for what that
refuses too (PNG or WebP named .JPEG, 16-bit, palette). A file nothing decodes comes back as its
exception, never raised, so the caller writes a reject row for it. EXIF orientation is not applied
(as PIL and torchvision's ImageFolder do not).

Preprocessing is the same on every device: the central crop that "resize the short side to
resize_short, then centre-crop size" keeps, then one antialiased resize to size x size.
No Prefect, Dask or pydantic here: Dask workers and the GPU bench import it cheaply.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from storage.sources import MAX_PIXELS, MIN_SIDE, BadImage, check_size, to_rgb
from tasks.encode.gpu_jpeg import as_uint8_tensor, decoder_name, gpu_decoder as _gpu_decoder

# torchvision 0.29 warns on every decode that decoding moves to torchcodec; the calls still work.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

JPEG_MAGIC = b"\xff\xd8\xff"
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}   # frame headers
_STANDALONE = {0x01, *range(0xD0, 0xD8)}   # markers without a length field


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(height, width, components, bits per sample) from a JPEG's frame header, reading markers
    only; None when `data` is no JPEG or its header is cut short."""
    if not data.startswith(JPEG_MAGIC):
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:   # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if marker in _SOF:
            if at + 10 > len(data):
                return None
            bits, height, width = data[at + 4], int.from_bytes(data[at + 5:at + 7], "big"), \
                int.from_bytes(data[at + 7:at + 9], "big")
            return height, width, data[at + 9], bits
        if marker == 0xDA:   # scan before any frame header
            return None
        at += 2 + length
    return None


def check_frame(height: int, width: int) -> None:
    """storage.sources.check_size's limits, from the header, before any pixel is decoded."""
    if height * width > MAX_PIXELS:
        raise BadImage(f"decompression bomb: {width}x{height} = {width * height} px > {MAX_PIXELS} px limit")
    if min(height, width) < MIN_SIDE:
        raise BadImage(f"image is {width}x{height} px, smaller than the {MIN_SIDE} px minimum side")


def nvjpeg_can_take(data: bytes) -> bool:
    """8-bit greyscale or YCbCr JPEGs within the size limits that end in their end-of-image marker.
    CMYK/YCCK, 12/16-bit and files cut short go to the CPU: nvjpeg refuses some and may decode a
    truncated file without error; the CPU path also names a size violation per file."""
    frame = jpeg_frame(data)
    return (frame is not None and frame[2] in (1, 3) and frame[3] == 8
            and frame[0] * frame[1] <= MAX_PIXELS and min(frame[0], frame[1]) >= MIN_SIDE
            and _ends_in_eoi(data))


def _ends_in_eoi(data: bytes) -> bool:
    """Whether `data` ends in the end-of-image marker, trailing NUL, CR, LF and space bytes aside; found without
    copying it (rstrip copies a bytearray whole, a file a call on the thread that launches the encoder)."""
    end = len(data)
    while end and data[end - 1] in b"\0\r\n ":
        end -= 1
    return end >= 2 and data[end - 2:end] == b"\xff\xd9"


def decode_cpu(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W] on the CPU; raises what stops every CPU decoder."""
    from torchvision.io import ImageReadMode, decode_jpeg

    frame = jpeg_frame(data)
    if frame is not None:
        check_frame(frame[0], frame[1])
        if frame[3] == 8:
            try:
                return decode_jpeg(as_uint8_tensor(data), mode=ImageReadMode.RGB)
            except RuntimeError:
                pass   # PIL decides, and names the error if it fails too
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        check_size(image)
        image.load()
        rgb = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _or_error(decode: Callable[[bytes], torch.Tensor], data: bytes | Exception) -> torch.Tensor | Exception:
    if isinstance(data, Exception):
        return data
    try:
        return decode(data)
    except Exception as error:   # any undecodable file is a reject, never a crash
        return error


def _decode_worker_init(up=None) -> None:
    """In each decode process as it starts, its imports done: one decode a process (the pool's size is the
    parallelism), then counted as up in the shared counter `up`."""
    torch.set_num_threads(1)
    if up is not None:
        with up.get_lock():
            up.value += 1


WORKER_FILES = 8   # files a decode process takes per task: one shared-memory hand-over for all of them


def _decode_in_worker(datas: list[bytes | Exception]) -> tuple[torch.Tensor | np.ndarray, list, float]:
    """In a decode process, a few files: (their pixels end to end in one uint8 tensor in shared memory, each
    file's [3, H, W] shape or its exception, when the last finished on the system-wide monotonic clock, which
    the parent reads too). Each image is stored as the decoders leave it, H x W x 3 (decode_cpu's [3, H, W] is
    a view of that), so filling the buffer is one plain copy a file. Pickled by value through the pipe, the
    pixels cost the receiving process 0.59-0.99 ms of CPU a file, GIL held, against 0.12-0.16 ms this way,
    and 2 processes decoded 580-670 img/s against 970-1,030 (bench/decode_probe.py, a 2-core CPU)."""
    images = [_or_error(decode_cpu, data) for data in datas]
    good = [image for image in images if not isinstance(image, Exception)]
    total = sum(image.numel() for image in good)
    try:
        flat = torch.empty(total, dtype=torch.uint8).share_memory_()
        by_value = None
    except RuntimeError:   # /dev/shm full (a container's 64 MB default): by value through the pipe instead
        by_value = np.empty(total, dtype=np.uint8)
        flat = torch.from_numpy(by_value)
    at = 0
    for image in good:
        channels, height, width = image.shape
        flat[at:at + image.numel()].view(height, width, channels).copy_(image.permute(1, 2, 0))
        at += image.numel()
    shapes = [image if isinstance(image, Exception) else tuple(image.shape) for image in images]
    return (flat if by_value is None else by_value), shapes, time.monotonic()


def _unpack(flat: torch.Tensor, shapes: list) -> Iterator[torch.Tensor | Exception]:
    """The [3, H, W] views of a worker's buffer (on whichever device it now is), exceptions in their place."""
    at = 0
    for shape in shapes:
        if isinstance(shape, Exception):
            yield shape
            continue
        channels, height, width = shape
        yield flat[at:at + channels * height * width].view(height, width, channels).permute(2, 0, 1)
        at += channels * height * width


DECODE_AHEAD = 2   # batches decoded ahead of the encoder unless encoder.decode_ahead says otherwise


class DecodeSplit:
    """How a batch's nvjpeg-decodable JPEGs are shared among the decoders: how many the CPU decoders take
    instead, so that both finish together, how many files each GPU decoder call takes (`nvjpeg_batch`; None:
    one call), and which GPU decoder that is (`gpu_decoder`, tasks.encode.gpu_jpeg). torchvision's nvjpeg
    decodes one call at a time behind one lock (how it decodes: tasks.encode.gpu_jpeg):
    alone on an H100 10,700 img/s in calls of 64, 7,800 in calls of 512, but about 3,000 inside the encode
    pass, beside the encoder (docs/gpu.md). libjpeg-turbo decodes beside it, in the reader threads or, with
    `processes`, in that many spawned processes (their Python holds no GIL that the thread launching the
    encoder needs; pixels come back through shared memory, WORKER_FILES files a hand-over, and are pinned
    here; no share until they are up).
    `share` None balances by the rates the last batches measured (nvjpeg's host time per image against the
    CPU side's wall time per image, queueing included); a number fixes it. Which decoder took a file changes
    its pixels only by the decoders' rounding."""

    def __init__(self, share: float | None = None, start: float = 0.25, low: float = 0.0, high: float = 0.9,
                 processes: int = 0, nvjpeg_batch: int | None = None, gpu_decoder: str = "torchvision",
                 ahead: int = DECODE_AHEAD, priority: str = "normal"):
        if nvjpeg_batch is not None and nvjpeg_batch < 1:
            raise ValueError(f"nvjpeg_batch must be >= 1 (None: one call a batch), got {nvjpeg_batch}")
        if ahead < 0:
            raise ValueError(f"decode_ahead must be >= 0, got {ahead}")
        self.ahead = ahead   # encoder.decode_ahead: batches decoded ahead of the encoder (tasks.encode.files)
        if priority not in ("normal", "high"):
            raise ValueError(f"decode_priority must be normal or high, got {priority!r}")
        self.priority = priority   # encoder.decode_priority: the side stream's CUDA priority
        self.gpu_decoder = gpu_decoder   # encoder.gpu_decoder: which GPU decoder takes the files (gpu_jpeg)
        self.decode_gpu = _gpu_decoder(gpu_decoder)   # a missing package is named here, before any file
        self.nvjpeg_batch = nvjpeg_batch   # files per nvjpeg call (encoder.nvjpeg_batch); None: the whole batch
        self.fixed = share
        self.share = start if share is None else share
        self.low, self.high = low, high
        self.counts = {"nvjpeg": 0, "cpu": 0}
        self.processes = processes
        self._pool: cf.ProcessPoolExecutor | None = None
        self._up = None   # how many decode processes have started (a shared counter)
        self._pin_thread: cf.ThreadPoolExecutor | None = None   # pins what the processes decoded
        if processes and (share is None or share > 0):
            self._start_pool()

    @classmethod
    def for_encoder(cls, encoder, processes: int = 0) -> "DecodeSplit":
        """The split encoder settings (storage.config.EncoderConfig) ask for: cpu_decode_share, nvjpeg_batch,
        gpu_decoder, decode_ahead, decode_priority; `processes` where the caller may spawn decode processes (not in a
        Dask worker)."""
        return cls(encoder.cpu_decode_share, processes=processes, nvjpeg_batch=encoder.nvjpeg_batch,
                   gpu_decoder=encoder.gpu_decoder, ahead=encoder.decode_ahead, priority=encoder.decode_priority)

    def _start_pool(self) -> None:
        """`processes` spawned decoders (no GIL shared with the thread that launches the encoder), started
        now so that their imports overlap the stage's set-up."""
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._up = context.Value("i", 0)
        self._pool = cf.ProcessPoolExecutor(self.processes, mp_context=context, initializer=_decode_worker_init,
                                            initargs=(self._up,))
        for _ in range(self.processes):   # each submit to a pool with no idle process starts one
            self._pool.submit(time.monotonic)
        # a stage that fails before close() still ends its processes once the split is dropped
        weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

    def decode_in_processes(self, datas: list[bytes | Exception], device: torch.device | None = None
                            ) -> Iterator[tuple]:
        """(uint8 [3, H, W] tensor or exception, monotonic finish time) per file, in order; every file is
        submitted before this returns, so the processes decode while the caller runs nvjpeg. With a CUDA
        `device`, each worker's buffer is pinned and uploaded whole (one copy on the current stream) and the
        images are views of it there; else CPU views."""
        if self._pool is None:
            self._start_pool()
        results = self._pool.map(_decode_in_worker, [datas[i:i + WORKER_FILES]
                                                     for i in range(0, len(datas), WORKER_FILES)])
        upload = device is not None and device.type == "cuda"
        # numpy where the worker had no shared memory left
        buffers = ((torch.as_tensor(flat), shapes, finished) for flat, shapes, finished in results)
        if upload:   # the copies into pinned memory (tens of MB a batch) release the GIL: in a thread of their
            # own they overlap the caller's nvjpeg calls instead of following them on the encoder's thread
            arrived = self._pinner().submit(lambda: [(flat.pin_memory() if flat.numel() else flat, shapes, t)
                                                     for flat, shapes, t in buffers])

        def received():
            for flat, shapes, finished in (arrived.result() if upload else buffers):
                if upload and flat.numel():
                    flat = flat.to(device, non_blocking=True)
                for image in _unpack(flat, shapes):
                    yield image, finished

        return received()

    def _pinner(self) -> cf.ThreadPoolExecutor:
        if self._pin_thread is None:
            self._pin_thread = cf.ThreadPoolExecutor(1, thread_name_prefix="pin-decoded")
        return self._pin_thread

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._pin_thread is not None:
            self._pin_thread.shutdown(wait=True)
            self._pin_thread = None

    def ready(self) -> bool:
        """Whether every decode process is up (spawned, torch imported): a few seconds after the stage starts.
        Until then the CPU takes no share: a process still starting would leave its files waiting."""
        return self._up is None or self._up.value >= self.processes

    def wait_ready(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.02)
        return self.ready()

    def to_cpu(self, n: int) -> int:
        """How many of n files the CPU takes; none while its processes are still starting, so that the first
        batches (the statistics pass's) never wait for them: the H200 run at dcebc41 lost 8 s there."""
        if not self.ready():
            return 0
        return int(round(n * self.share))

    def update(self, gpu_images: int, gpu_s: float, cpu_images: int, cpu_s: float) -> None:
        self.counts["nvjpeg"] += gpu_images
        self.counts["cpu"] += cpu_images
        if self.fixed is not None or gpu_images == 0 or cpu_images == 0 or gpu_s <= 0 or cpu_s <= 0:
            return
        gpu_rate, cpu_rate = gpu_images / gpu_s, cpu_images / cpu_s
        balanced = cpu_rate / (cpu_rate + gpu_rate)   # both sides then take the same time
        self.share = min(self.high, max(self.low, 0.5 * self.share + 0.5 * balanced))

    def summary(self) -> dict:
        total = sum(self.counts.values())
        return {**self.counts, "gpu_decoder": decoder_name(self.decode_gpu, self.gpu_decoder),
                "cpu_share": round(self.counts["cpu"] / total, 3) if total else 0.0,
                "decode_ahead": self.ahead, "decode_priority": self.priority, "balanced": self.fixed is None,
                "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "default"),
                "cpu_decoders": f"{self.processes} processes" if self.processes else "reader threads"}


def decode_images(datas: Sequence[bytes | Exception], device: torch.device,
                  cpu_map: Callable = map, split: DecodeSplit | None = None) -> list[torch.Tensor | Exception]:
    """Each file's uint8 [3, H, W] on `device`, or the exception that stopped it. `cpu_map` spreads
    the CPU decodes (a thread pool's map: libjpeg-turbo and PIL release the GIL; it submits at once, so
    with `split` the CPU's share decodes while nvjpeg takes the rest)."""
    out: list[torch.Tensor | Exception | None] = [None] * len(datas)
    gpu = [i for i, d in enumerate(datas) if device.type == "cuda" and not isinstance(d, Exception)
           and nvjpeg_can_take(d)]
    beside = []
    if split is not None and gpu:
        moved = split.to_cpu(len(gpu))
        gpu, beside = gpu[:len(gpu) - moved], gpu[len(gpu) - moved:]
    finished: list[float] = []
    pin = device.type == "cuda"

    def decode_beside(data: bytes) -> torch.Tensor | Exception:
        image = _or_error(decode_cpu, data)
        if pin and not isinstance(image, Exception):
            image = image.pin_memory()   # here, in parallel: the upload below is then asynchronous
        finished.append(time.perf_counter())
        return image

    began, began_monotonic = time.perf_counter(), time.monotonic()
    in_processes = split is not None and split.processes > 0 and bool(beside)
    if in_processes:   # on the device as results arrive; finish times are the workers' own
        beside_results = split.decode_in_processes([datas[i] for i in beside], device)
    else:
        beside_results = cpu_map(decode_beside, [datas[i] for i in beside])
    calls = (split.nvjpeg_batch if split is not None else None) or max(1, len(gpu))
    decode_gpu = split.decode_gpu if split is not None else _gpu_decoder("torchvision")
    for first in range(0, len(gpu), calls):
        part = gpu[first:first + calls]
        for i, image in zip(part, decode_gpu([datas[i] for i in part], device)):
            out[i] = image
    gpu_s = time.perf_counter() - began
    for i, result in zip(beside, beside_results):
        image = result
        if in_processes:   # already on the device, uploaded a worker's buffer at a time
            image, done = result
            finished.append(done - began_monotonic + began)
        out[i] = image if isinstance(image, Exception) else image.to(device, non_blocking=True)
    if split is not None:
        split.update(len(gpu), gpu_s, len(beside), (max(finished) - began) if finished else 0.0)
    cpu = [i for i, image in enumerate(out) if image is None]
    for i, image in zip(cpu, cpu_map(lambda d: _or_error(decode_cpu, d), [datas[i] for i in cpu])):
        out[i] = image if isinstance(image, Exception) else image.to(device, non_blocking=True)
    return out


def crop_resize(images: Sequence[torch.Tensor], size: int, resize_short: int,
                interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 [3, H, W] images (any sizes, one device) -> float [B, 3, size, size] in [0, 1].

    "Resize the short side to resize_short, then centre-crop size" as the equivalent crop first (the
    central size/resize_short share of the short side) and one antialiased resize; images of one shape
    (most ImageNet photos share a few) go through one interpolate call."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape[1:]), []).append(index)
    device = images[0].device
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=device)
    rows = _index_on([i for members in groups.values() for i in members], device)   # every group's, in turn
    at = 0
    for (h, w), members in groups.items():
        crop = max(1, round(min(h, w) * size / resize_short))
        top, left = (h - crop) // 2, (w - crop) // 2
        patch = torch.stack([images[i][:, top:top + crop, left:left + crop] for i in members]).float()
        resized = F.interpolate(patch, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
        out.index_copy_(0, rows[at:at + len(members)], resized)
        at += len(members)
    return out.div_(255.0).clamp_(0.0, 1.0)   # bicubic overshoots


def _index_on(rows: list[int], device: torch.device) -> torch.Tensor:
    """rows as a long tensor on `device`, copied from pinned memory without waiting: `out[rows] = ...` with a
    list copies it from pageable memory, which waits for everything queued on the stream (on the encoder's
    stream when decoding inline: the pass's thread then waited for the last batch's encoder, once a shape)."""
    index = torch.tensor(rows, dtype=torch.long)
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)   # the CPU's own, or another accelerator's (a plain copy there)


def uint8_pixels(images01: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] in [0, 1] -> uint8 [B, S, S, 3] on their device (the image store's pixels)."""
    return images01.mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1)


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    """uint8_pixels on the host, as numpy."""
    return uint8_pixels(images01).cpu().numpy()
