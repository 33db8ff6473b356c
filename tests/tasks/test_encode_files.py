"""The direct encode path (tasks/encode/files.py): ImageNet-layout files -> latent store on the CPU,
with the files nvjpeg would refuse (CMYK, a PNG named .JPEG) and one nothing decodes (truncated)."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from storage import zarr_store
from storage.config import load_config
from storage.keys import Layout
from storage.sources import SourceChanged
from storage.tables import load_rejects
from tasks.encode.decode import DecodeSplit, decode_cpu, decode_images, jpeg_frame, nvjpeg_can_take

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
SIZE = 56
ODD = {"n02/cmyk.JPEG", "n02/png_named.JPEG", "n02/truncated.JPEG"}


def _jpeg(pixels: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    shapes = [(60, 80), (80, 60), (60, 80), (70, 70), (64, 96)]   # two of one shape: one batched resize
    for synset in ("n01", "n02"):
        (root / synset).mkdir()
        for i, shape in enumerate(shapes):
            (root / synset / f"{synset}_{i}.JPEG").write_bytes(_jpeg(rng.integers(0, 255, (*shape, 3), np.uint8)))
    pixels = rng.integers(0, 255, (66, 90, 3), np.uint8)
    (root / "n02" / "cmyk.JPEG").write_bytes(_jpeg(pixels, "CMYK"))
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    (root / "n02" / "png_named.JPEG").write_bytes(png.getvalue())
    (root / "n02" / "truncated.JPEG").write_bytes((root / "n01" / "n01_0.JPEG").read_bytes()[:300])
    return root


def _cfg(tree: Path, *more: str):
    return load_config(TINY, ["source.kind=imagefolder", f"source.path={tree}", "source.num_images=0",
                              f"source.image_size={SIZE}", "ingest.chunk_size=4", "encoder.dtype=float32", *more])


def _expected_tokens(paths: list[Path], resize_short: int) -> np.ndarray:
    """Independent of tasks.encode.decode: PIL decode, the central crop of the short side, one
    antialiased bicubic resize, the random-init encoder the stage builds (seed 0)."""
    from models.encoder import build_encoder, encode_tensor

    batch = []
    for path in paths:
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()
        h, w = image.shape[1:]
        crop = round(min(h, w) * SIZE / resize_short)
        top, left = (h - crop) // 2, (w - crop) // 2
        batch.append(F.interpolate(image[None, :, top:top + crop, left:left + crop], size=(SIZE, SIZE),
                                   mode="bicubic", antialias=True, align_corners=False).div(255).clamp(0, 1))
    model, _ = build_encoder("vit_small_patch14_reg4_dinov2", SIZE, None, True, seed=0)
    return encode_tensor(model.eval(), torch.cat(batch)).numpy()


def test_files_are_read_into_bytearrays_that_torch_wraps_without_a_copy_and_padding_is_skipped(tree):
    """The readers give a folder's files as bytearrays (storage.imagenet.read_whole), which the GPU and CPU
    decoders wrap as tensors as they are; the end-of-image check sees past trailing padding without copying."""
    from storage.imagenet import SampleFiles
    from tasks.encode.gpu_jpeg import as_uint8_tensor

    path = tree / "n02" / "n02_0.JPEG"
    [data] = SampleFiles(paths=(str(path),)).read(0, 1)
    assert isinstance(data, bytearray) and data == path.read_bytes()
    wrapped = as_uint8_tensor(data)
    data[0] ^= 0xFF
    assert int(wrapped[0]) == data[0]   # the same memory
    data[0] ^= 0xFF
    copied = as_uint8_tensor(bytes(data))
    assert torch.equal(copied, wrapped) and copied.data_ptr() != wrapped.data_ptr()
    assert nvjpeg_can_take(data + b"\0\0\r\n  ") and nvjpeg_can_take(bytes(data) + b"\0" * 300)
    assert not nvjpeg_can_take(data[:-2] + b"\0\0") and not nvjpeg_can_take(b"\xff\xd8\0")
    assert torch.equal(decode_cpu(data), decode_cpu(bytes(data)))


def test_a_batch_is_read_by_one_task_a_reader_in_order(tree):
    """read_parts hands a batch to at most `readers` pool tasks (not one future a file); collect gives every
    file's bytes, or its read error, in slot order."""
    import concurrent.futures as cf

    from storage.imagenet import SampleFiles
    from tasks.encode.files import collect, read_parts

    paths = sorted(str(p) for p in tree.rglob("*.JPEG"))
    files = SampleFiles(paths=(*paths, str(tree / "gone.JPEG")))

    class Counting(cf.ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args, **kwargs):
            Counting.submitted += 1
            return super().submit(*args, **kwargs)

    with Counting(3) as pool:
        got = collect(read_parts(files, 1, len(files), pool, 3), timeout=30)
        empty = collect(read_parts(files, 2, 2, pool, 3), timeout=30)
    assert Counting.submitted == 3 and empty == []
    assert [bytes(d) for d in got[:-1]] == [Path(p).read_bytes() for p in paths[1:]]
    assert isinstance(got[-1], FileNotFoundError)


def test_decoders_route_what_nvjpeg_refuses_to_the_cpu(tree):
    good, cmyk, png, cut = ((tree / "n02" / name).read_bytes()
                            for name in ("n02_0.JPEG", "cmyk.JPEG", "png_named.JPEG", "truncated.JPEG"))
    assert jpeg_frame(good)[:3] == (60, 80, 3) and jpeg_frame(cmyk)[2] == 4 and jpeg_frame(png) is None
    assert nvjpeg_can_take(good) and not any(nvjpeg_can_take(d) for d in (cmyk, png, cut))
    decoded = decode_images([good, cmyk, png, cut, OSError("gone")], torch.device("cpu"))
    assert [tuple(d.shape) for d in decoded[:3]] == [(3, 60, 80), (3, 66, 90), (3, 66, 90)]
    assert all(isinstance(d, Exception) for d in decoded[3:])
    # CMYK through libjpeg-turbo gives PIL's RGB
    assert np.array_equal(decoded[1].permute(1, 2, 0).numpy(), np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB")))


def test_the_decode_split_settles_where_nvjpeg_and_the_cpu_threads_finish_together():
    gpu_rate, cpu_rate = 4000.0, 2000.0   # img/s: the balance gives the CPU a third of each batch
    split = DecodeSplit()
    for _ in range(30):
        to_cpu = split.to_cpu(512)
        split.update(512 - to_cpu, (512 - to_cpu) / gpu_rate, to_cpu, to_cpu / cpu_rate)
    assert abs(split.share - 1 / 3) < 0.01
    to_cpu = split.to_cpu(512)
    assert abs(to_cpu / cpu_rate - (512 - to_cpu) / gpu_rate) < 0.01 * 512 / gpu_rate   # equal finish times
    assert split.summary()["nvjpeg"] + split.summary()["cpu"] == 30 * 512 and split.summary()["balanced"]
    fixed = DecodeSplit(0.5)
    fixed.update(100, 1.0, 100, 10.0)   # a fixed share stays whatever the rates
    assert fixed.share == 0.5 and fixed.to_cpu(10) == 5 and not fixed.summary()["balanced"]
    slow_cpu = DecodeSplit(high=0.9)
    for _ in range(30):
        slow_cpu.update(100, 0.01, 100, 100.0)
    assert slow_cpu.share < 0.01


def test_decode_processes_give_the_cpu_decoders_pixels_and_errors_and_end_with_the_split(tree):
    files = sorted(tree.rglob("*.JPEG"))
    datas = [p.read_bytes() for p in files] + [OSError("gone")]
    split = DecodeSplit(None, processes=2)
    try:
        results = list(split.decode_in_processes(datas))
    finally:
        split.close()
    assert len(results) == len(datas)
    for path, data, (image, finished) in zip(files + [None], datas, results):
        assert finished > 0
        if isinstance(data, Exception):
            assert image is data or (isinstance(image, OSError) and str(image) == "gone")
            continue
        try:
            expected = decode_cpu(data)
        except Exception as error:   # the truncated file: the same refusal, by value
            assert isinstance(image, type(error)), path
            continue
        assert torch.equal(image, expected), path
        assert image.is_shared()   # handed over in shared memory, not pickled through the pipe
    assert split._pool is None and split.summary()["cpu_decoders"] == "2 processes"


def test_a_decode_process_without_shared_memory_hands_its_pixels_back_by_value(tree, monkeypatch):
    from tasks.encode import decode

    def full(self):
        raise RuntimeError("unable to allocate shared memory(shm): No space left on device (28)")

    datas = [p.read_bytes() for p in sorted(tree.rglob("*.JPEG"))[:3]] + [OSError("gone")]
    shared, shapes, _ = decode._decode_in_worker(datas)
    monkeypatch.setattr(torch.Tensor, "share_memory_", full)
    by_value, same_shapes, _ = decode._decode_in_worker(datas)
    assert shared.is_shared() and isinstance(by_value, np.ndarray) and str(same_shapes) == str(shapes)
    assert sum(not isinstance(shape, Exception) for shape in shapes) >= 2
    for a, b, data in zip(decode._unpack(shared, shapes), decode._unpack(torch.as_tensor(by_value), shapes), datas):
        assert (isinstance(a, Exception) and isinstance(b, Exception)) or (
            torch.equal(a, b) and torch.equal(a, decode_cpu(data)))


def test_the_cpu_takes_no_share_until_its_decode_processes_are_up():
    split = DecodeSplit(0.5, processes=1)
    try:
        assert split.to_cpu(100) == 0   # a spawned process needs seconds to import torch: nvjpeg takes all
        assert split.wait_ready(120) and split.ready()
        assert split.to_cpu(100) == 50
    finally:
        split.close()
    assert DecodeSplit(0.5).to_cpu(100) == 50   # threads: no start-up


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg needs CUDA (runs on the GPU machine)")
@pytest.mark.parametrize("processes", [0, 2])
def test_a_batch_split_between_nvjpeg_and_the_cpu_decodes_every_file_as_either_alone(tree, processes):
    import concurrent.futures as cf

    files = sorted(p for p in tree.rglob("*.JPEG") if p.name.startswith("n0"))
    datas = [p.read_bytes() for p in files] + [(tree / "n02" / "cmyk.JPEG").read_bytes(), OSError("gone")]
    device = torch.device("cuda")
    with cf.ThreadPoolExecutor(4) as pool:
        splits = {share: DecodeSplit(share, processes=processes) for share in (0.0, 0.5, 1.0)}
        assert all(split.wait_ready(120) for split in splits.values())
        runs = {share: decode_images(datas, device, cpu_map=pool.map, split=split) for share, split in splits.items()}
    for split in splits.values():
        split.close()
    assert all(isinstance(run[-1], Exception) for run in runs.values())
    nvjpeg_alone, cpu_alone = runs[0.0][:-1], runs[1.0][:-1]
    for data, image in zip(datas[:-1], cpu_alone):
        assert image.device.type == "cuda" and torch.equal(image.cpu(), decode_cpu(data))
    # the two decoders round their IDCT and chroma upsampling differently (on these noisy test images by
    # up to ~13 levels on average), so a split file must equal one of them exactly, not approximately
    from_gpu = from_cpu = 0
    for i, image in enumerate(runs[0.5][:-1]):
        assert image.device.type == "cuda" and image.shape == cpu_alone[i].shape
        same_gpu, same_cpu = torch.equal(image, nvjpeg_alone[i]), torch.equal(image, cpu_alone[i])
        assert same_gpu or same_cpu, i
        from_gpu += same_gpu and not same_cpu
        from_cpu += same_cpu and not same_gpu
    assert from_gpu > 0 and from_cpu > 0, (from_gpu, from_cpu)   # the split really split


def test_nvjpeg_takes_a_batch_in_calls_of_its_batch_size_and_every_file_keeps_its_place(tree, monkeypatch):
    """encoder.nvjpeg_batch: the nvjpeg calls' sizes, and each file's image back in its slot (nvjpeg itself is
    stood in for by the CPU decoder here; the CUDA test below runs the real one)."""
    import tasks.encode.gpu_jpeg as gpu_jpeg

    files = sorted(p for p in tree.rglob("*.JPEG") if p.name.startswith("n0"))
    datas = [p.read_bytes() for p in files]
    calls = []

    def fake_nvjpeg(part, device):
        calls.append(len(part))
        return [decode_cpu(d) for d in part]

    monkeypatch.setattr(gpu_jpeg, "torchvision_nvjpeg", fake_nvjpeg)
    with_bad = datas[:3] + [OSError("gone")] + datas[3:]
    decoded = decode_images(with_bad, torch.device("cuda"), split=DecodeSplit(0.0, nvjpeg_batch=4))
    n = len(datas)
    assert calls == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    assert isinstance(decoded[3], OSError)
    for data, image in zip(datas, decoded[:3] + decoded[4:]):
        assert torch.equal(image, decode_cpu(data))
    calls.clear()
    decode_images(datas, torch.device("cuda"), split=DecodeSplit(0.0))
    assert calls == [n]   # None: one call a batch, as before
    with pytest.raises(ValueError, match="nvjpeg_batch"):
        DecodeSplit(0.0, nvjpeg_batch=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg needs CUDA (runs on the GPU machine)")
def test_nvjpeg_in_small_calls_gives_the_pixels_of_one_call(tree):
    files = sorted(p for p in tree.rglob("*.JPEG") if p.name.startswith("n0"))
    datas = [p.read_bytes() for p in files]
    device = torch.device("cuda")
    whole = decode_images(datas, device, split=DecodeSplit(0.0))
    for size in (1, 3):
        for a, b in zip(decode_images(datas, device, split=DecodeSplit(0.0, nvjpeg_batch=size)), whole):
            assert torch.equal(a, b)


def _prepared_runs(tree: Path, device: torch.device, aheads: tuple[int, ...], monkeypatch) -> dict:
    """Every file of the tree (the odd ones too) through prepared_batches in batches of 3, for each
    encoder.decode_ahead: the batches, and the threads that decoded them."""
    import threading

    import tasks.encode.files as files_module
    from storage.imagenet import SampleFiles
    from tasks.encode.files import Preprocess, prepared_batches
    from tasks.encode.phase_clock import PhaseClock

    paths = tuple(sorted(str(p) for p in tree.rglob("*.JPEG")))
    spans = [(b, min(b + 3, len(paths))) for b in range(0, len(paths), 3)]
    decoded_on, real = [], files_module.prepare_batch

    def recorded(*args, **kwargs):
        decoded_on.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(files_module, "prepare_batch", recorded)
    runs = {}
    for ahead in aheads:
        decoded_on.clear()
        split = DecodeSplit(0.0, ahead=ahead)
        batches = [(b.images(), b.ok, b.rejects) for b in prepared_batches(
            SampleFiles(paths=paths), spans, Preprocess(SIZE, SIZE), device, 2, None, PhaseClock(False), split)]
        runs[ahead] = batches, set(decoded_on)
    return runs


def _same_pixels(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


def test_decoding_ahead_or_on_the_encoders_thread_gives_the_same_batches(tree, monkeypatch):
    """encoder.decode_ahead: with 0 the thread that asks for the batches decodes each one itself (on CUDA on
    its own stream, never beside the encoder); with 1 or 2 a preparing thread does. The batches are the same:
    pixels, decoded flags and reject rows, in order."""
    import threading

    runs = _prepared_runs(tree, torch.device("cpu"), (0, 1, 2), monkeypatch)
    assert runs[0][1] == {threading.get_ident()}
    assert threading.get_ident() not in runs[2][1] and threading.get_ident() not in runs[1][1]
    for ahead in (1, 2):
        assert len(runs[ahead][0]) == len(runs[0][0]) == 5
        for (a, ok_a, rej_a), (b, ok_b, rej_b) in zip(runs[0][0], runs[ahead][0]):
            assert _same_pixels(a, b) and np.array_equal(ok_a, ok_b) and rej_a == rej_b
    assert sum(len(rejects) for _, _, rejects in runs[0][0]) == 1   # the truncated file
    with pytest.raises(ValueError, match="decode_ahead"):
        DecodeSplit(0.0, ahead=-1)
    assert DecodeSplit.for_encoder(_cfg(tree, "encoder.decode_ahead=0").encoder).ahead == 0
    with pytest.raises(ValueError, match="decode_priority"):
        DecodeSplit(0.0, priority="urgent")
    split = DecodeSplit.for_encoder(_cfg(tree, "encoder.decode_priority=high").encoder)
    assert split.priority == "high" and split.summary()["decode_priority"] == "high"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg needs CUDA (runs on the GPU machine)")
def test_on_cuda_decoding_on_the_encoders_stream_gives_the_side_streams_pixels(tree, monkeypatch):
    runs = _prepared_runs(tree, torch.device("cuda"), (0, 2), monkeypatch)
    for (a, ok_a, rej_a), (b, ok_b, rej_b) in zip(runs[0][0], runs[2][0]):
        assert a is None or a.device.type == "cuda"
        assert _same_pixels(a, b) and np.array_equal(ok_a, ok_b) and rej_a == rej_b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA (runs on the GPU machine)")
def test_the_encoder_replayed_as_cuda_graphs_gives_the_eager_tokens_for_every_batch():
    from models.encoder import build_encoder
    from tasks.encode.cuda_graph import EncoderGraphs
    from tasks.encode.files import encode_batch

    model, _ = build_encoder("vit_small_patch14_reg4_dinov2", SIZE, None, True, seed=0)
    model = model.eval().cuda()
    graphs = EncoderGraphs(model)
    noise = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.rand((n, 3, SIZE, SIZE), device="cuda", generator=noise) for n in (8, 8, 5, 8)]
    with torch.no_grad():
        outs = [encode_batch(model, batch, graphs) for batch in batches]   # captured at the first 8 and the 5
        eager = [encode_batch(model, batch) for batch in batches]
    assert len(graphs.graphs) == 2
    for got, want in zip(outs, eager):   # each replay its own batch's tokens, none overwritten by a later one
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(outs[0], outs[1])


def test_a_batch_of_several_shapes_is_resized_image_by_image_in_its_order():
    from tasks.encode.decode import crop_resize

    noise = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=noise)
              for h, w in ((60, 80), (66, 90), (60, 80), (80, 60), (66, 90))]
    out = crop_resize(images, SIZE, 64)
    for got, image in zip(out, images):
        torch.testing.assert_close(got, crop_resize([image], SIZE, 64)[0])
    assert not torch.equal(out[0], out[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)")
def test_on_cuda_the_resize_never_waits_for_the_device(tree):
    """crop_resize on the GPU with images of several shapes (one group each) under CUDA's sync debug mode:
    no copy or read waits for the stream, whose queue holds the encoder's last batch when decoding inline
    (a list index, `out[rows] = ...`, copied from pageable memory and waited, once a shape). The values are
    each image's own crop and resize."""
    from tasks.encode.decode import crop_resize

    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device="cuda")
              for h, w in ((60, 80), (66, 90), (60, 80), (80, 60), (66, 90))]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = crop_resize(images, SIZE, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, image in zip(out, images):
        torch.testing.assert_close(got, crop_resize([image], SIZE, 64)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA (runs on the GPU machine)")
def test_a_capture_waits_for_device_wide_work_holding_the_capture_lock():
    """On an H100 the hierarchy's warm-up thread synchronised the device during the statistics pass's first
    capture, and cuDNN's attention failed inside it. Captures hold CAPTURE_LOCK; work that synchronises the
    device holds it too: a capture started meanwhile waits, then succeeds, and so does that work."""
    import concurrent.futures as cf

    from models.encoder import build_encoder, encode_tensor
    from tasks.encode.cuda_graph import CAPTURE_LOCK, EncoderGraphs

    model, _ = build_encoder("vit_small_patch14_reg4_dinov2", SIZE, None, True, seed=0)
    graphs = EncoderGraphs(model.eval().cuda())
    with cf.ThreadPoolExecutor(1) as pool:
        with CAPTURE_LOCK:
            capture = pool.submit(graphs.capture, 8, SIZE, "cuda")
            for _ in range(20):   # the other thread's device-wide work, while the capture is asked for
                torch.matmul(torch.randn(512, 512, device="cuda"), torch.randn(512, 512, device="cuda"))
                torch.cuda.synchronize()
            assert not capture.done()
        capture.result(timeout=120)
    assert len(graphs.graphs) == 1
    batch = torch.rand((8, 3, SIZE, SIZE), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = encode_tensor(model, batch)
    torch.testing.assert_close(graphs(batch).float(), eager.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA (runs on the GPU machine)")
def test_the_hierarchy_replayed_as_cuda_graphs_gives_the_eager_regions_and_flags_nan():
    """encoder.hierarchy_graph: each batch's region ids equal the eager call's, none overwritten by a later
    replay; a NaN batch sets the caller's flag through the graph, and the next clean batch leaves it as it is."""
    from models.hierarchy.batched import build_hierarchies_batched, device_stats
    from tasks.encode.cuda_graph import HierarchyGraphs
    from tasks.plan import hierarchy_spec

    spec = hierarchy_spec(load_config(TINY).hierarchy)
    noise = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randn((n, 8, 8, 32), device="cuda", generator=noise) for n in (8, 8, 5, 8)]
    stats = device_stats((np.full(32, 0.1), np.full(32, 2.0)), 32, "cuda")
    graphs = HierarchyGraphs(spec, stats)
    flag = torch.zeros((), dtype=torch.bool, device="cuda")
    with torch.no_grad():
        outs = [graphs(batch, flag) for batch in batches]   # captured at the first 8 and the 5
        eager = [build_hierarchies_batched(batch, spec, stats=stats) for batch in batches]
    assert graphs.failed is None and len(graphs.graphs) == 2 and not bool(flag)
    for got, want in zip(outs, eager):
        assert torch.equal(got, want)
    assert not torch.equal(outs[0], outs[1])
    bad = batches[0].clone()
    bad[3, 1, 1, 0] = float("nan")
    graphs(bad, flag)
    assert bool(flag)
    graphs(batches[1], flag)
    assert bool(flag)   # ORed in: a chunk's flag stays set


def test_a_hierarchy_graph_that_cannot_be_captured_warns_and_runs_eagerly():
    """Here the capture fails (no CUDA): the warning names it, and every batch gets the eager call's regions and
    NaN flag, as without encoder.hierarchy_graph."""
    from models.hierarchy.batched import build_hierarchies_batched, device_stats
    from tasks.encode.cuda_graph import HierarchyGraphs
    from tasks.plan import hierarchy_spec

    if torch.cuda.is_available():
        pytest.skip("on the GPU machine the capture succeeds")
    spec = hierarchy_spec(load_config(TINY).hierarchy)
    tokens = torch.randn((4, 4, 4, 16), generator=torch.Generator().manual_seed(1))
    stats = device_stats((np.zeros(16), np.ones(16)), 16, "cpu")
    graphs, flag = HierarchyGraphs(spec, stats), torch.zeros((), dtype=torch.bool)
    with pytest.warns(UserWarning, match="capturing the hierarchy as a CUDA graph failed"):
        first = graphs(tokens, flag)
    assert graphs.failed and torch.equal(first, build_hierarchies_batched(tokens, spec, stats=stats))
    bad = tokens.clone()
    bad[0, 0, 0, 0] = float("nan")
    graphs(bad, flag)
    assert bool(flag) and not graphs.graphs


def test_every_file_is_a_latent_or_a_reject_and_latents_match_an_independent_encode(tree, tmp_path):
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    cfg = _cfg(tree)
    ingest = ingest_images.fn(cfg, str(tmp_path))
    images = Layout(tmp_path, cfg).images()
    # the listing, and pixels only for the sample (here every file: 13 < ingest.sample_pixels 64)
    assert zarr_store.store_attrs(images)["read_from"] == "files" and ingest["seen"] == 13
    result = encode_latents.fn(cfg, str(tmp_path))
    assert (result["accepted"], result["rejected"]) == (12, 1)
    path = Layout(tmp_path, cfg).latents()
    ds = zarr_store.open_dataset(path)
    ids, valid = list(ds["sample"].values), ds["valid"].values
    listed = sorted(str(p.relative_to(tree)) for p in tree.rglob("*.JPEG"))
    rejects = load_rejects(path)
    rejected = [str(Path(p).relative_to(tree)) for p in rejects.path]
    assert sorted(ids) == listed and rejected == ["n02/truncated.JPEG"] and rejects.reason.iloc[0]
    assert sorted([i for i, ok in zip(ids, valid) if ok] + rejected) == listed   # each once, none lost
    assert list(ds["label"].values) == [0] * 5 + [1] * 8
    tokens = ds["tokens"].values
    assert not tokens[~valid].any()
    good = np.flatnonzero(valid)
    expected = _expected_tokens([tree / ids[slot] for slot in good], SIZE).reshape(tokens[good].shape)
    np.testing.assert_allclose(tokens[good], expected, atol=2e-3, rtol=0)
    flat = tokens[valid].reshape(-1, tokens.shape[-1]).astype(np.float64)
    np.testing.assert_allclose(ds["mean"].values, flat.mean(0), rtol=1e-4, atol=1e-4)
    # the image store's sample holds the pixels the encoder saw; the truncated file is a reject there too
    stored = zarr_store.open_dataset(images)
    assert stored["image"].shape[0] == 13 and not stored["valid"].values[ids.index("n02/truncated.JPEG")]


def test_rerun_after_a_lost_marker_recomputes_only_that_chunk(tree, tmp_path):
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    cfg = _cfg(tree, "encoder.verify_images=0")   # the sentinel below is wrong data that the check would refuse
    ingest_images.fn(cfg, str(tmp_path))
    encode_latents.fn(cfg, str(tmp_path))
    path = Layout(tmp_path, cfg).latents()
    before = zarr_store.open_array(path, "tokens")[:]
    (path / "_COMPLETE").unlink()
    (path / "_chunks" / "000001.json").unlink()
    sentinel = np.full((4,) + before.shape[1:], 7.0, np.float32)
    zarr_store.write_rows(path, slice(0, 4), {"tokens": sentinel})   # chunk 0: must stay untouched
    zarr_store.write_rows(path, slice(4, 8), {"tokens": np.zeros_like(sentinel)})
    assert encode_latents.fn(cfg, str(tmp_path))["status"] == "computed"
    after = zarr_store.open_array(path, "tokens")[:]
    assert np.array_equal(after[:4], sentinel)                 # not recomputed
    np.testing.assert_array_equal(after[4:8], before[4:8])     # recomputed, same values
    assert sorted(p.name for p in (path / "_chunks").iterdir()) == [f"{c:06d}.json" for c in range(4)]


def test_encode_refuses_a_folder_changed_since_ingest(tree, tmp_path):
    import shutil

    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    cfg = _cfg(copy)
    ingest_images.fn(cfg, str(tmp_path / "root"))
    (copy / "n01" / "n01_1.JPEG").unlink()
    with pytest.raises(SourceChanged, match="1 removed"):
        encode_latents.fn(cfg, str(tmp_path / "root"))
    # the check runs beside the encoder's loading, but nothing is written (or read) before it has passed
    latents = Layout(str(tmp_path / "root"), cfg).latents()
    assert sorted(p.name for p in latents.iterdir()) == ["_LINEAGE.json"]   # no array, no chunk


def test_imagefolder_stages_complete_with_a_pixel_sample(tree, tmp_path):
    """ingest (listing + 6 sampled images) -> encode (every file) -> the decoder, trained on the sample."""
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images
    from tasks.train.stage import train_decoder_task

    cfg = _cfg(tree, "ingest.sample_pixels=6")
    root = str(tmp_path)
    assert ingest_images.fn(cfg, root)["accepted"] == 13   # listed regular files; pixels decoded for 6
    assert zarr_store.open_array(Layout(root, cfg).images(), "image").shape[0] == 6
    assert encode_latents.fn(cfg, root)["accepted"] == 12
    result = train_decoder_task.fn(cfg, root)
    assert result["status"] == "computed" and result["holdout_n"] == 1   # 10% of the 6 sampled, valid images


def test_real_pixels_decode_what_the_image_store_does_not_hold(tree, tmp_path):
    """The evaluation's real side on a direct-path source: with 6 images stored, the other valid samples
    are decoded from their files; the result equals a store holding all of them (ingest's own decode)."""
    from tasks.encode.pixels import real_pixel_batches
    from tasks.ingest.stage import ingest_images

    stores = {}
    for pixels in (6, 13):
        cfg = _cfg(tree, f"ingest.sample_pixels={pixels}")
        root = tmp_path / f"sample{pixels}"
        ingest_images.fn(cfg, str(root))
        stores[pixels] = (cfg, Layout(root, cfg).images())
    valid = np.flatnonzero(zarr_store.open_array(stores[13][1], "valid")[:])
    parts = [valid[:3], valid[3:8], valid[8:]]   # held only, held and decoded, decoded only
    full = list(real_pixel_batches(stores[13][0].source, stores[13][1], parts))
    sampled = list(real_pixel_batches(stores[6][0].source, stores[6][1], parts, readers=2))
    inline = list(real_pixel_batches(stores[6][0].source, stores[6][1], parts, split=DecodeSplit(0.0, ahead=0)))
    assert all(np.array_equal(a, b) for a, b in zip(inline, sampled))   # decoded on this thread: the same
    assert valid[3] < 6 <= valid[7] and [len(p) for p in sampled] == [len(p) for p in parts]
    assert all(isinstance(p, np.ndarray) and p.shape[1:] == (SIZE, SIZE, 3) for p in sampled)
    assert np.array_equal(np.concatenate(sampled), np.concatenate(full))
    assert np.concatenate(full)[valid >= 6].std() > 10   # real pixels, not zeros
    if torch.cuda.is_available():   # on the GPU machine: decoded rows stay there, as the encode pass decodes them
        from storage.imagenet import resize_short_side, sample_files
        from tasks.encode.files import Preprocess
        from tasks.encode.pixels import decode_pixels

        cfg, images = stores[6]
        on_gpu = list(real_pixel_batches(cfg.source, images, parts, device="cuda"))
        assert all(p.is_cuda and p.dtype == torch.uint8 for p in on_gpu[1:])
        assert np.array_equal(on_gpu[0], sampled[0])   # held rows: the store's own
        ids = [str(i) for i in zarr_store.open_array(images, "sample")[:]]
        rows = np.concatenate(parts[1:])
        rows = rows[rows >= 6]
        files = sample_files(cfg.source, [ids[r] for r in rows])
        alone = decode_pixels(files, 0, len(rows), Preprocess(SIZE, resize_short_side(cfg.source)), device="cuda")[0]
        decoded = torch.cat(on_gpu[1:]).cpu().numpy()[np.concatenate(parts[1:]) >= 6]
        assert np.array_equal(decoded, alone)


def test_a_file_that_never_finishes_reading_becomes_a_reject_and_the_run_goes_on(tree, tmp_path, monkeypatch):
    """A read that hangs (a network file system gone quiet; here one file's open blocks until released)
    costs only that file: after encoder.read_timeout_s it is a reject row, every other file is encoded."""
    import threading
    import time

    import storage.imagenet as imagenet
    from storage.imagenet import resize_short_side, sample_files
    from storage.latent_store import latent_store_arrays
    from tasks.encode.files import Preprocess, encode_file_chunks
    from tasks.encode.encoder_load import load_encoder

    cfg = _cfg(tree)
    paths = sorted(str(p.relative_to(tree)) for p in tree.rglob("*.JPEG") if str(p.relative_to(tree)) not in ODD)
    hung, release = paths[3], threading.Event()
    real_open = imagenet.open_regular

    def open_regular(path):
        if str(path).endswith(hung):
            release.wait(60)
        return real_open(path)

    monkeypatch.setattr(imagenet, "open_regular", open_regular)
    model, label = load_encoder(cfg.encoder.model, SIZE, None, True)
    store = tmp_path / "latents"
    zarr_store.create_store(store, latent_store_arrays(len(paths), 1, model.patch_embed.grid_size[0],
                                                       model.embed_dim, "float32"), len(paths), {})
    started = time.monotonic()
    try:
        encode_file_chunks(model, sample_files(cfg.source, paths), np.zeros(len(paths), np.int64), store,
                           [(0, 0, len(paths))], Preprocess(SIZE, resize_short_side(cfg.source)), "cpu",
                           batch_size=4, dtype="float32", weights_label=label, readers=4, read_timeout=1.0)
    finally:
        release.set()
    assert time.monotonic() - started < 30
    valid = zarr_store.open_array(store, "valid")[:]
    assert not valid[3] and valid[np.arange(len(paths)) != 3].all()
    (row,) = load_rejects(store).itertuples()
    assert row.path.endswith(hung) and "read_timeout_s" in row.reason


def test_the_hierarchy_fused_into_encode_equals_the_hierarchy_stage_and_is_reused(tree, tmp_path):
    """encoder.stats_images fixes the channel statistics before the pass (here from 5 of the 13 files,
    spread over both class folders); with the batched backend the pass then also fills the teacher
    store. `tf hierarchy` reuses it, and recomputed from the stored latents it is the same, region for
    region; the store's mean/std are the sample's, with the whole set's distance from them on record."""
    from tasks.encode.stage import encode_latents, sample_rows
    from tasks.hierarchy.stage import build_teacher
    from tasks.ingest.stage import ingest_images

    cfg = _cfg(tree, "encoder.stats_images=5", "hierarchy.backend=batched", "encoder.dtype=bfloat16")
    root = str(tmp_path)
    ingest_images.fn(cfg, root)
    layout = Layout(root, cfg)
    result = encode_latents.fn(cfg, root, with_teacher=True)
    assert result["teacher"] == str(layout.teacher()) and zarr_store.is_complete(layout.teacher())
    assert set(result["channel_stats"]) == {"max_mean_shift_in_std", "std_ratio_range"}
    # where the statistics pass's time went, beside the pass's own phases
    assert result["stats_pass_s"] > 0 and {"decode", "encoder", "resize"} <= set(result["stats_phases_s"])
    fused = zarr_store.open_array(layout.teacher(), "regions")[:]
    assert build_teacher.fn(cfg, root)["status"] == "reused"
    again = build_teacher.fn(cfg, root, force=True)
    assert again["status"] == "computed"
    assert np.array_equal(zarr_store.open_array(layout.teacher(), "regions")[:], fused)
    assert len(np.unique(fused[:, 1])) > 2   # parts found, not a constant map
    # the store's statistics: those of the sampled files' tokens, independent of the pass
    ids = list(zarr_store.open_array(layout.images(), "sample")[:])
    rows = sample_rows(len(ids), 5)
    assert len(rows) == 5 and {ids[r].split("/")[0] for r in rows} == {"n01", "n02"}
    sampled = [tree / ids[r] for r in rows if ids[r] not in ODD]
    tokens = _expected_tokens(sampled, SIZE).reshape(-1, zarr_store.open_array(layout.latents(), "mean").shape[0])
    np.testing.assert_allclose(zarr_store.open_array(layout.latents(), "mean")[:], tokens.mean(0), atol=2e-3)
    np.testing.assert_allclose(zarr_store.open_array(layout.latents(), "std")[:], tokens.std(0), rtol=2e-2)


def test_without_the_hierarchy_in_the_run_encode_leaves_the_teacher_alone(tree, tmp_path):
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    cfg = _cfg(tree, "encoder.stats_images=5", "hierarchy.backend=batched")
    ingest_images.fn(cfg, str(tmp_path))
    result = encode_latents.fn(cfg, str(tmp_path))
    assert "teacher" not in result and not Layout(tmp_path, cfg).teacher().exists()


def test_nan_tokens_stop_the_fused_pass_naming_the_chunk_without_its_marker(tree, tmp_path, monkeypatch):
    """The fused hierarchy does not wait for the device per batch to check the tokens: the check is a device
    flag per chunk, read by the chunk's writer. An encoder that turns NaN on one batch still stops the stage
    with an error naming NaN and that chunk; the chunk gets no marker, the one before it keeps its own."""
    import tasks.encode.files as files
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    cfg = _cfg(tree, "encoder.stats_images=5", "hierarchy.backend=batched", "encoder.batch_size=4")
    root = str(tmp_path)
    ingest_images.fn(cfg, root)
    calls, real_encode = [], files.encode_tensor

    def encode_tensor(model, images01):
        calls.append(len(images01))
        tokens = real_encode(model, images01)
        return tokens * float("nan") if len(calls) == 4 else tokens   # after the statistics, a later chunk

    monkeypatch.setattr(files, "encode_tensor", encode_tensor)
    with pytest.raises(ValueError, match=r"chunk \d+: the encoder's tokens contain NaN") as raised:
        encode_latents.fn(cfg, root, with_teacher=True)
    bad = int(str(raised.value).split(":")[0].split()[-1])
    latents = Layout(root, cfg).latents()
    assert bad > 0 and zarr_store.chunk_done(latents, 0) and not zarr_store.chunk_done(latents, bad)
    assert not zarr_store.is_complete(latents)


def test_the_encode_stage_runs_with_the_gil_slice_it_is_given_and_restores_it(tree, tmp_path, monkeypatch):
    """encoder.gil_switch_ms: the stage's passes (statistics and encode) run with that GIL time slice, and the
    process gets its own back after the stage, also after a failing one."""
    import sys

    import tasks.encode.files as files
    from tasks.encode.stage import encode_latents
    from tasks.ingest.stage import ingest_images

    cfg = _cfg(tree, "encoder.stats_images=5", "hierarchy.backend=batched", "encoder.gil_switch_ms=0.25")
    root = str(tmp_path)
    ingest_images.fn(cfg, root)
    before, seen, real_encode = sys.getswitchinterval(), [], files.encode_tensor

    def encode_tensor(model, images01):
        seen.append(sys.getswitchinterval())
        return real_encode(model, images01)

    monkeypatch.setattr(files, "encode_tensor", encode_tensor)
    encode_latents.fn(cfg, root, with_teacher=True)
    assert len(seen) > 2 and seen == pytest.approx([0.25e-3] * len(seen))
    assert sys.getswitchinterval() == before

    def failing(model, images01):
        raise RuntimeError("a pass that fails")

    monkeypatch.setattr(files, "encode_tensor", failing)
    with pytest.raises(RuntimeError, match="a pass that fails"):
        encode_latents.fn(cfg, root, with_teacher=True, force=True)
    assert sys.getswitchinterval() == before
