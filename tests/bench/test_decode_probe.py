"""bench/decode_probe.py on the CPU: the JPEGs it writes decode, the CPU share's processes are timed through
the product's DecodeSplit, the process fan-out returns every file, and the nvjpeg figures say why they are
skipped instead of holding a number."""
import json

import pytest

from bench import decode_probe


@pytest.mark.slow
def test_probe_on_cpu_times_the_cpu_decoders_and_skips_nvjpeg_with_a_reason(tmp_path):
    decode_probe.main(["--device", "cpu", "--images", "24", "--classes", "3", "--batch", "8", "--processes", "2",
                       "--workdir", str(tmp_path / "work"), "--out", str(tmp_path)])
    body = json.loads((tmp_path / "decode_probe.json").read_text())
    figures = body["figures"]
    assert figures["cpu_processes_2"]["value"] > 0
    assert figures["host_check_us_per_file"]["value"] > 0
    assert not any(name.startswith("nvjpeg") for name in figures)   # never a number without nvjpeg
    assert not any(name.startswith("nvimgcodec") for name in figures)
    assert set(body["skipped"]) == {"nvjpeg_two_threads", "nvjpeg_two_processes", *decode_probe.BESIDE,
                                    "serial_decode_then_encode", "split_processes_2",
                                    *decode_probe.NVIMGCODEC_FIGURES, "nvimgcodec_b8_img_per_s",
                                    "nvimgcodec_b64_img_per_s"}
    assert all("no CUDA" in reason for reason in body["skipped"].values())
    assert body["images"] == 24 and body["device"] == "cpu" and body["complete"]
    assert body["cuda_device_max_connections"]   # which hardware work-queue count the figures were taken with


@pytest.mark.slow
def test_processes_released_together_decode_every_file(tmp_path):
    paths, _, _ = decode_probe.make_jpegs(tmp_path / "train", 12, 2, 2)
    assert decode_probe.in_processes(paths, "cpu", 4, 2) > 0   # raises if any file failed in a process


def test_a_file_that_does_not_decode_stops_the_probe_naming_it():
    datas = [b"\xff\xd8\xff" + b"\x00" * 64]
    with pytest.raises(RuntimeError, match="did not decode"):
        decode_probe.decode_rate(datas * 2, decode_probe.torch.device("cpu"), 1)


def test_a_time_cap_ends_the_decode_after_the_batch_that_passes_it(tmp_path, monkeypatch):
    paths, _, _ = decode_probe.make_jpegs(tmp_path / "train", 12, 2, 2)
    datas = decode_probe.read_all(paths)
    calls = []
    real = decode_probe.decode_images

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_probe, "decode_images", counted)
    assert decode_probe.decode_rate(datas, decode_probe.torch.device("cpu"), 2, warm=False, max_s=0.0) > 0
    assert len(calls) == 1   # past the cap after the first batch: a starved decode ends in time
    calls.clear()
    decode_probe.decode_rate(datas, decode_probe.torch.device("cpu"), 2, warm=False)
    assert len(calls) == 6
