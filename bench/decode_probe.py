"""Where the encode pass's JPEG decode spends its time on one GPU (issue 29): the product's own decode call
(tasks.encode.decode.decode_images, what the pass's preparing thread runs for every batch) on the bench's
JPEGs, alone and beside each thing the pass runs next to it.

    python bench/decode_probe.py --images 8192 --workdir /tmp/dp [--batch 512] [--processes 4,8] [--out DIR]

Inside the encode pass nvjpeg decodes about 3,000 img/s (0.33 ms a file on an H100). At c8299f5 on an H100
this probe found it 10,700 img/s alone in calls of 64 and 7,800 in calls of 512, but 95 img/s while another
thread replayed the encoder: the decode starves beside the encoder. The contention figures say under what
conditions (run it again under CUDA_DEVICE_MAX_CONNECTIONS=32 to see whether streams sharing one of CUDA's 8
hardware work queues is why), every figure on the same files read into memory first (no disk in any figure):

  nvjpeg_b{B}_img_per_s        decode_images alone, batches of B (64, 256 and --batch), on a side stream as
                               in the pass: the one-thread rate
  nvjpeg_*beside_encoder*      while another thread replays the encoder (CUDA graph, as configs/imagenet.yaml)
                               on resident batches (BESIDE: which stream, how many batches queued, nvjpeg call
                               size); `encoder_beside_*` is the encoder's rate meanwhile, `encoder_alone` without
  serial_decode_then_encode*   decode, resize and encode one batch after another in one thread: a pass that
                               never overlaps them
  nvjpeg_two_threads           two threads calling it at once (torchvision holds one decoder behind a lock)
  nvjpeg_two_processes         two processes at once, each half the files, started together: with one
                               process's host work overlapping the other's engine time, the JPEG engines' cap
  cpu_processes_{k}            the CPU share's own decoders (DecodeSplit.decode_in_processes) alone, k processes,
                               and the receiving process's CPU time a file (`_parent_cpu_us`)
  split_processes_{k}          decode_images with the balanced CPU share in k processes (encoder.cpu_decode_share
                               null, encoder.cpu_decode_processes k), and the share it settled at
  host_check_us_per_file       the preparing thread's Python per file before nvjpeg (nvjpeg_can_take, the copy)
  nvimgcodec_*                 the same with encoder.gpu_decoder=nvimgcodec (the hardware JPEG engines, not SMs),
                               where nvImageCodec is installed: alone, beside the encoder, serial, and its
                               pixels against nvjpeg's (`nvimgcodec_vs_nvjpeg_*`, `nvimgcodec_refused`)

Without CUDA the nvjpeg figures are written as skipped with the reason; the CPU decoders are still timed.
Writes <out>/decode_probe.json (DESIGN §7 shape) after every figure, `complete` true at the end. The JPEGs are
bench/dataplane.py's (the same names and bytes, so a --workdir that holds its files reuses them).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import results_io  # noqa: E402
from bench.dataplane import make_jpegs, sync  # noqa: E402
from tasks.encode.decode import DecodeSplit, crop_resize, decode_images, nvjpeg_can_take  # noqa: E402
from tasks.encode.gpu_jpeg import nvimgcodec_available  # noqa: E402


def read_all(paths: list[str]) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


def decode_rate(datas: list[bytes], device: torch.device, batch: int, split: DecodeSplit | None = None,
                stream: torch.cuda.Stream | None = None, warm: bool = True, max_s: float | None = None) -> float:
    """Images a second through decode_images over `datas` in batches of `batch`, on `stream` (a side stream as
    the pass's preparing thread uses; the current one when None). With `warm`, a first batch untimed; with
    `max_s`, batches stop once that long has passed (the rate of those done: a starved decode ends in time)."""
    def run(part: list[bytes], began: float) -> int:
        done = 0
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for start in range(0, len(part), batch):
                images = decode_images(part[start:start + batch], device, split=split)
                bad = [i for i, image in enumerate(images) if isinstance(image, Exception)]
                if bad:
                    raise RuntimeError(f"{len(bad)} of the probe's JPEGs did not decode: {images[bad[0]]}")
                done += len(images)
                if max_s is not None and time.perf_counter() - began > max_s:
                    break
        if stream is not None:   # this stream alone: not whatever another thread has queued on the device
            stream.synchronize()
        else:
            sync(device)
        return done

    if warm:
        run(datas[:batch], time.perf_counter())
    began = time.perf_counter()
    done = run(datas, began)
    return done / (time.perf_counter() - began)


def two_threads(datas: list[bytes], device: torch.device, batch: int) -> float:
    """Both halves at once from two threads, each on its own side stream: images a second together."""
    half = len(datas) // 2
    parts = [datas[:half], datas[half:2 * half]]
    streams = [torch.cuda.Stream(device) for _ in parts]
    for part, stream in zip(parts, streams):
        decode_rate(part[:batch], device, batch, stream=stream)   # each thread's warm-up
    with cf.ThreadPoolExecutor(2) as pool:
        began = time.perf_counter()
        running = [pool.submit(decode_rate, part, device, batch, stream=stream, warm=False)
                   for part, stream in zip(parts, streams)]
        for future in running:
            future.result()   # a thread's error is raised here, not lost
        return 2 * half / (time.perf_counter() - began)


def _process_decode(paths: list[str], device: str, batch: int, barrier, results) -> None:
    """In a spawned process: read, warm up, wait for the others, then time this process's share."""
    datas = read_all(paths)
    dev = torch.device(device)
    decode_rate(datas[:batch], dev, batch)
    barrier.wait()
    began = time.monotonic()   # the system-wide clock: the parent compares the processes' spans
    decode_rate(datas, dev, batch, warm=False)
    results.put((len(datas), began, time.monotonic()))


def in_processes(paths: list[str], device: str, batch: int, count: int) -> float:
    """`count` processes decoding a share each, released together: images a second over the span from the
    first start to the last finish."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(count), context.Queue()
    shares = [paths[i::count] for i in range(count)]
    workers = [context.Process(target=_process_decode, args=(share, device, batch, barrier, results))
               for share in shares]
    for worker in workers:
        worker.start()
    done = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    return sum(n for n, _, _ in done) / (max(end for _, _, end in done) - min(start for _, start, _ in done))


# How the encoder runs beside the decode in each contention figure: (stream, batches queued before a wait).
# The pass launches the encoder on the driving thread's default stream and waits for each batch's copies;
# a side stream with four batches queued keeps the GPU busiest.
# Last: which GPU decoder (encoder.gpu_decoder); nvimgcodec's figures are skipped where it is not installed.
BESIDE = {"nvjpeg_beside_encoder": ("side", 4, None, "torchvision"),
          "nvimgcodec_beside_encoder": ("side", 4, None, "nvimgcodec"),
          "nvimgcodec_beside_encoder_default_stream": ("default", 1, None, "nvimgcodec"),
          "nvjpeg_beside_encoder_depth1": ("side", 1, None, "torchvision"),
          "nvjpeg_beside_encoder_default_stream": ("default", 1, None, "torchvision"),
          "nvjpeg_b64_beside_encoder": ("side", 4, 64, "torchvision"),
          "nvjpeg_b64_beside_encoder_default_stream": ("default", 1, 64, "torchvision")}


# The figures that need nvImageCodec's hardware decoder (and its rates, nvimgcodec_b{B}_img_per_s): written as
# skipped, with the reason, where it cannot run.
NVIMGCODEC_FIGURES = ["nvimgcodec_refused", "nvimgcodec_same_shape", "nvimgcodec_vs_nvjpeg_max_abs",
                      "nvimgcodec_vs_nvjpeg_mean_abs",
                      *(name for name, (*_, decoder) in BESIDE.items() if decoder == "nvimgcodec"),
                      "serial_decode_then_encode_nvimgcodec"]


def contention(datas: list[bytes], device: torch.device, batch: int, image_size: int, model_name: str,
               max_s: float, record, decoders: tuple[str, ...] = ("torchvision",)) -> None:
    """The decode's rate while another thread replays the encoder (CUDA graph, as configs/imagenet.yaml) on a
    resident batch, for each of BESIDE, and the encoder's rate meanwhile (`encoder_beside_<name>`), alone, and
    both in one thread, one after the other (`serial_decode_then_encode*`: a pass with no overlap at all).
    Each decode figure stops after `max_s` (at c8299f5 the first took 86 s for 8,192 files: 95 img/s)."""
    from tasks.encode.cuda_graph import EncoderGraphs
    from tasks.encode.encoder_load import load_encoder
    from tasks.encode.files import encode_batch

    model, _ = load_encoder(model_name, image_size, None, True)
    model = model.to(device).eval()
    graphs = EncoderGraphs(model)
    resident = torch.rand(batch, 3, image_size, image_size, device=device)
    with torch.no_grad():
        encode_batch(model, resident, graphs)   # capture the graph, untimed
        sync(device)
        began = time.perf_counter()
        for _ in range(8):
            encode_batch(model, resident, graphs)
        sync(device)
    record("encoder_alone", 8 * batch / (time.perf_counter() - began),
           "img/s, the encoder as a CUDA graph on resident batches")
    side = torch.cuda.Stream(device)
    decode_rate(datas[:batch], device, batch, stream=side)
    for name, (where, depth, calls, decoder) in BESIDE.items():
        if decoder not in decoders:
            continue
        stop, counted = threading.Event(), []
        encoder_stream = torch.cuda.Stream(device) if where == "side" else torch.cuda.default_stream(device)

        def encode_until_stopped() -> None:
            with torch.no_grad(), torch.cuda.stream(encoder_stream):
                began, n = time.perf_counter(), 0
                while not stop.is_set():
                    encode_batch(model, resident, graphs)
                    n += 1
                    if n % depth == 0:
                        encoder_stream.synchronize()
                encoder_stream.synchronize()
                counted.append(n * batch / (time.perf_counter() - began))

        split = DecodeSplit(0.0, nvjpeg_batch=calls, gpu_decoder=decoder)
        thread = threading.Thread(target=encode_until_stopped)
        thread.start()
        try:
            rate = decode_rate(datas, device, batch, split=split, stream=side, warm=False, max_s=max_s)
        finally:
            stop.set()
            thread.join()
        record(name, rate, f"img/s, decode_images ({decoder}, calls of {calls or batch}) on a side stream while a "
                           f"thread replays the encoder on the {where} stream, {depth} batch(es) queued")
        record(f"encoder_beside_{name.removeprefix('nvjpeg_')}", counted[0],
               "img/s, the encoder meanwhile (CUDA graph, resident batches)")
    serial = [(None, "torchvision"), (64, "torchvision"), (None, "nvimgcodec")]
    for calls, decoder in [(c, d) for c, d in serial if d in decoders]:   # one thread: decode a batch, resize
        split = DecodeSplit(0.0, nvjpeg_batch=calls, gpu_decoder=decoder)   # it as the pass does, encode it, ...
        began, done = time.perf_counter(), 0
        with torch.no_grad():
            for start in range(0, len(datas), batch):
                images = decode_images(datas[start:start + batch], device, split=split)
                pixels = crop_resize(images, image_size, image_size * 8 // 7, "bicubic")
                encode_batch(model, pixels, graphs if len(pixels) == batch else None)
                done += len(images)
                if time.perf_counter() - began > max_s:
                    break
            sync(device)
        record("serial_decode_then_encode" + (f"_b{calls}" if calls else "") + ("_nvimgcodec" if decoder ==
               "nvimgcodec" else ""), done / (time.perf_counter() - began),
               f"img/s, one thread: decode ({decoder}, calls of {calls or batch}), resize, encoder, no overlap")


def cpu_processes(datas: list[bytes], count: int) -> tuple[float, float]:
    """The CPU share's decoders alone: every file through DecodeSplit.decode_in_processes as the pass receives
    them: (images a second, this process's CPU time a file in microseconds, its threads together: what
    receiving the pixels costs the process that also drives the GPU)."""
    split = DecodeSplit(1.0, processes=count)
    try:
        split.wait_ready(120)
        list(split.decode_in_processes(datas[:32 * count]))   # every process busy once, untimed
        began, cpu_began = time.perf_counter(), time.process_time()
        results = list(split.decode_in_processes(datas))
        rate = len(datas) / (time.perf_counter() - began)
        parent_us = (time.process_time() - cpu_began) / len(datas) * 1e6
    finally:
        split.close()
    bad = [image for image, _ in results if isinstance(image, Exception)]
    if bad:
        raise RuntimeError(f"{len(bad)} of the probe's JPEGs did not decode on the CPU: {bad[0]}")
    return rate, parent_us


def split_processes(datas: list[bytes], device: torch.device, batch: int, count: int) -> tuple[float, float]:
    """decode_images with a balanced CPU share in `count` processes: (images a second, the CPU's share)."""
    split = DecodeSplit(None, processes=count)
    try:
        list(split.decode_in_processes(datas[:32 * count]))
        rate = decode_rate(datas, device, batch, split=split, stream=torch.cuda.Stream(device))
        return rate, split.share
    finally:
        split.close()


def nvimgcodec_works(device: torch.device) -> bool | str:
    """True, or why encoder.gpu_decoder=nvimgcodec cannot run here."""
    if not nvimgcodec_available():
        return "nvImageCodec is not installed (nvidia-nvimgcodec-cu13)"
    try:
        DecodeSplit(0.0, gpu_decoder="nvimgcodec").decode_gpu([], device)
    except RuntimeError as error:
        return str(error)
    return True


def agreement(datas: list[bytes], device: torch.device, record) -> None:
    """nvImageCodec's hardware decode against torchvision's nvjpeg on the same files: how many the engines
    refused (the CPU takes those) and how far apart the pixels are (both round an IDCT; not bit-equal)."""
    from tasks.encode.gpu_jpeg import nvimgcodec_hardware, torchvision_nvjpeg

    hardware, reference = nvimgcodec_hardware(datas, device), torchvision_nvjpeg(datas, device)
    pairs = [(a, b) for a, b in zip(hardware, reference) if a is not None and b is not None]
    record("nvimgcodec_refused", sum(a is None for a in hardware), f"of {len(datas)} files, the engines refused")
    if pairs:
        shapes = sum(a.shape == b.shape for a, b in pairs)
        record("nvimgcodec_same_shape", shapes, f"of {len(pairs)} decoded by both, the same [3, H, W]")
        diffs = [(a.int() - b.int()).abs() for a, b in pairs if a.shape == b.shape]
        if diffs:
            record("nvimgcodec_vs_nvjpeg_max_abs", max(float(d.max()) for d in diffs), "uint8 levels, worst pixel")
            record("nvimgcodec_vs_nvjpeg_mean_abs", sum(float(d.float().mean()) for d in diffs) / len(diffs),
                   "uint8 levels, mean over pixels and files")


def host_check_us(datas: list[bytes]) -> float:
    """The preparing thread's Python per file before nvjpeg sees it: the frame check and the bytes' copy."""
    began = time.perf_counter()
    for data in datas:
        nvjpeg_can_take(data)
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return (time.perf_counter() - began) / len(datas) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=512, help="the pass's batch (encoder.batch_size)")
    parser.add_argument("--processes", default="4,8", help="CPU decode process counts to time")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--encoder", default="vit_base_patch14_reg4_dinov2",
                        help="the encoder beside the decode (random-init; its speed, not its values, matters)")
    parser.add_argument("--beside-s", type=float, default=6.0,
                        help="seconds each decode-beside-the-encoder figure decodes for at most")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=None, help="folder for decode_probe.json (default bench/results)")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    paths, _, mean_bytes = make_jpegs(Path(args.workdir) / "train", args.images, args.classes, os.cpu_count() or 4)
    datas = read_all(paths)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    print(f"{len(datas)} JPEGs ({mean_bytes / 1024:.0f} KB mean) ready in {time.perf_counter() - began:.1f}s",
          flush=True)
    per_s = "img/s, decode_images on files in memory"
    figures: dict[str, tuple[float, str]] = {
        "host_check_us_per_file": (round(host_check_us(datas), 2), "us a file, nvjpeg_can_take + the copy")}
    skipped: dict[str, str] = {}
    extra = {"images": len(datas), "mean_kb": round(mean_bytes / 1024, 1), "batch": args.batch,
             "device": str(device), "skipped": skipped, "cores": os.cpu_count(), "complete": False,
             # hardware work queues the streams share (CUDA's default 8): streams on one queue wait for each other
             "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "default")}

    def record(name: str, value: float, unit: str) -> None:
        """Each figure is written as it comes: a probe stopped at its time limit keeps what it measured."""
        figures[name] = (round(value, 1), unit)
        print(f"{name}: {value:,.1f} {unit}", flush=True)
        results_io.write_result("decode_probe", figures, extra, args.out)

    hardware_batches = sorted({64, args.batch})
    nvimgcodec_figures = [*NVIMGCODEC_FIGURES, *(f"nvimgcodec_b{batch}_img_per_s" for batch in hardware_batches)]
    if cuda:
        side = torch.cuda.Stream(device)
        for batch in sorted({64, 256, args.batch}):
            record(f"nvjpeg_b{batch}_img_per_s", decode_rate(datas, device, batch, stream=side),
                   f"{per_s}, batches of {batch}, one thread")
        decoders = ("torchvision",)
        hardware = nvimgcodec_works(device)
        if hardware is True:
            decoders += ("nvimgcodec",)
            agreement(datas[:256], device, record)
            for batch in hardware_batches:
                record(f"nvimgcodec_b{batch}_img_per_s", decode_rate(
                    datas, device, batch, split=DecodeSplit(0.0, gpu_decoder="nvimgcodec"), stream=side),
                    f"{per_s}, nvImageCodec on the hardware JPEG engines, batches of {batch}, one thread")
        else:
            skipped.update({name: hardware for name in nvimgcodec_figures})
        contention(datas, device, args.batch, args.image_size, args.encoder, args.beside_s, record, decoders)
        record("nvjpeg_two_threads", two_threads(datas, device, args.batch), f"{per_s}, two threads together")
        record("nvjpeg_two_processes", in_processes(paths, args.device, args.batch, 2),
               f"{per_s}, two processes together")
    else:
        skipped.update({name: f"no CUDA device ({args.device}): nvjpeg needs one"
                        for name in ["nvjpeg_two_threads", "nvjpeg_two_processes", *BESIDE,
                                     "serial_decode_then_encode", *nvimgcodec_figures]})
    for count in [int(c) for c in args.processes.split(",") if c.strip()]:
        rate, parent_us = cpu_processes(datas, count)
        record(f"cpu_processes_{count}", rate, f"img/s, the CPU share's {count} decode processes alone")
        record(f"cpu_processes_{count}_parent_cpu_us", parent_us,
               "us of the receiving process's CPU a file (all its threads)")
        if cuda:
            rate, share = split_processes(datas, device, args.batch, count)
            figures[f"split_processes_{count}_cpu_share"] = (round(share, 3), "share of files the CPU took")
            record(f"split_processes_{count}", rate, f"{per_s}, nvjpeg + a balanced CPU share in {count} processes")
        else:
            skipped[f"split_processes_{count}"] = f"no CUDA device ({args.device})"
    extra["complete"] = True
    path = results_io.write_result("decode_probe", figures, extra, args.out)
    print(f"wrote {path} in {time.perf_counter() - began:.0f}s", flush=True)


if __name__ == "__main__":
    main()
