"""bench/encode_profile.py (the fused encode stage alone, for a profiler) and bench/pyspy_summary.py (a py-spy
raw profile per thread group)."""
import json

import pytest

from bench.pyspy_summary import frame_name, parse, summarise, thread_group

RAW = """\
thread (0x7f01): MainThread;<module> (bench/encode_profile.py:70);_encode (tasks/encode/stage.py:160);_encode_files_here (tasks/encode/stage.py:330);decode_jpeg (torchvision/io/image.py:200) 30
thread (0x7f01): MainThread;<module> (bench/encode_profile.py:70);_encode (tasks/encode/stage.py:160);_encode_files_here (tasks/encode/stage.py:330);encode_batch (tasks/encode/files.py:133) 10
thread (0x7f01): MainThread;<module> (bench/encode_profile.py:70);load_encoder (tasks/encode/encoder_load.py:40) 60
thread (0x7f02): ThreadPoolExecutor-3_0;Thread._bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:90);write_chunk (storage/zarr_store.py:300) 5
thread (0x7f03): ThreadPoolExecutor-3_1;Thread._bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:90) 15
"""


def test_a_raw_profile_is_summarised_per_thread_group_within_the_pass():
    lines = parse(RAW)
    assert lines[0][0] == "thread (0x7f01): MainThread" and lines[0][2] == 30
    assert thread_group("thread (0x7f03): ThreadPoolExecutor-3_1") == "ThreadPoolExecutor-3"
    assert frame_name("encode_batch (tasks/encode/files.py:133)") == "encode_batch (files.py)"
    whole = summarise(lines)
    assert whole["samples"] == 120 and whole["threads"]["MainThread"]["samples"] == 100
    within = summarise(lines, within="_encode_files_here")
    main = within["threads"]["MainThread"]
    assert main["samples"] == 40   # the encoder's loading is outside the pass
    assert main["inclusive"]["decode_jpeg (image.py)"] == 0.75 and main["leaves"]["encode_batch (files.py)"] == 0.25
    pool = within["threads"]["ThreadPoolExecutor-3"]   # two pool threads, one group, kept whole
    assert pool["samples"] == 20 and pool["leaves"]["_worker (thread.py)"] == 0.75
    assert "_worker (thread.py)" not in pool["inclusive"]   # a pool's own loop is no work
    assert pool["inclusive"]["write_chunk (zarr_store.py)"] == 0.25
    with pytest.raises(ValueError, match="not a py-spy raw line"):
        parse("thread (1): MainThread;f (a.py:1) many\n")


def test_the_stage_runs_alone_and_its_record_is_written(tmp_path):
    from bench.encode_profile import main

    result = main(["--images", "16", "--classes", "2", "--workdir", str(tmp_path), "--out", str(tmp_path / "out"),
                   "--set", "device=cpu", "--set", "encoder.batch_size=8", "--set", "encoder.stats_images=8",
                   "--set", "encoder.model=vit_small_patch14_reg4_dinov2", "--set", "encoder.verify_images=4"])
    [record] = result["runs"]
    assert record["status"] == "computed" and record["images"] == 16 and record["teacher"]
    assert json.loads((tmp_path / "out" / "encode_profile.json").read_text())["images"] == 16
    assert not (tmp_path / "profiled").exists()   # the stores are removed after
