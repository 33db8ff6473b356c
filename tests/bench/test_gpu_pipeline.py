"""bench/gpu_pipeline.py at a toy size on the CPU: the acceptance run's own code path (JPEGs, a weights
file in timm's format, `tf pipeline` as a subprocess, figures read back from tables/runs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOY = ["device=cpu", "encoder.model=vit_small_patch14_reg4_dinov2", "source.image_size=56", "source.resize_short=64",
       "encoder.batch_size=16", "encoder.stats_images=8", "ingest.chunk_size=16", "ingest.workers=1",
       "generator.preset=tiny", "generator.steps=3", "generator.batch_size=8", "generator.compile=false",
       "decoder.width=32", "decoder.depth=1", "decoder.heads=2", "decoder.steps=3", "decoder.batch_size=8",
       "evaluate.num_samples=8", "evaluate.keep_trajectories=4", "evaluate.edits_per_level=1",
       "evaluate.bootstrap=10", "evaluate.grid_rows=4",
       "evaluate.structure_workers=0"]   # imagenet.yaml's 12 processes take 19 s to start on 2 cores


def test_the_acceptance_run_reports_every_stage_from_the_runs_table(tmp_path, migrated_prefect_home):
    out = tmp_path / "out"
    migrated_prefect_home(tmp_path / "work" / "prefect")   # the bench's PREFECT_HOME: its server need not migrate
    command = [sys.executable, str(REPO / "bench" / "gpu_pipeline.py"), "--images", "40", "--classes", "3",
               "--workdir", str(tmp_path / "work"), "--out", str(out), "--jpeg-workers", "1",
               "--model", "vit_small_patch14_reg4_dinov2"]
    for item in TOY:
        command += ["--set", item]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "gpu_pipeline.json").read_text())
    stages = result["stages"]
    assert [s for s in stages if stages[s]["status"] != "computed"] == ["hierarchy"]   # filled by the encode pass
    assert set(stages) >= {"ingest", "encode", "hierarchy", "train-decoder", "train-L0", "train-L3", "evaluate"}
    assert {"encoder", "decode", "resize", "store_write"} <= set(stages["encode"]["phases_s"]["cpu"])
    figures = result["figures"]
    assert 0 < figures["jpeg_to_teacher_img_per_s"]["value"] < 40 / stages["encode"]["duration_s"] + 1
    assert figures["pipeline_wall_s"]["value"] > stages["evaluate"]["duration_s"]
    assert stages["train-L0"]["train_img_per_s"] > 0 and "mfu" not in stages["train-L0"]   # no MFU on a CPU
    assert stages["train-L0"]["after_last_step_s"] >= 0   # the run's end, kept out of the step time
    assert (out / "grid.png").stat().st_size > 1000 and "pipeline" in (out / "pipeline.log").read_text()
    assert result["pipeline"] == "completed" and {"check_source", "pass"} <= set(stages["encode"]["wall_s"])
    assert "random values" in result["encoder_weights"]   # no reader takes the grid for a trained model's
    for level in ("train-L0", "train-L3"):   # a generator stage's time besides its timed steps
        laps = stages[level]["wall_s"]
        assert {"load_latents", "load_teacher_regions", "build_model", "train", "save_checkpoints"} <= set(laps)
        assert laps["train_before_timed_steps"] <= laps["train"]
        assert sum(v for k, v in laps.items() if k != "train_before_timed_steps") <= stages[level]["duration_s"] + 0.5
    evaluate_laps = stages["evaluate"]["wall_s"]   # where the evaluation's time went, around its sample loop
    assert {"load_scoring_and_reference", "sample_loop", "edits", "write_outputs"} <= set(evaluate_laps)
    assert sum(evaluate_laps.values()) <= stages["evaluate"]["duration_s"] + 0.5
    loading = stages["evaluate"]["load_s"]   # the real images' features beside the latents' read
    rounding = 0.005   # every figure is rounded to the millisecond
    assert loading["until_both_done"] + rounding >= max(loading["real_images_beside"],
                                                        loading["latents_teacher_decoder"])
    assert loading["until_both_done"] + loading["level_reference"] <= \
        evaluate_laps["load_scoring_and_reference"] + rounding


def test_a_pipeline_past_its_time_limit_is_stopped_with_its_process_group_and_reported(tmp_path):
    import os
    import signal

    sys.path.insert(0, str(REPO))
    from bench.gpu_pipeline import recorded, run_pipeline, write_weights

    log = tmp_path / "pipeline.log"
    (tmp_path / "train").mkdir()
    write_weights(tmp_path / "w.safetensors", "vit_small_patch14_reg4_dinov2")   # what the config accepts
    wall, ended = run_pipeline(tmp_path / "root", tmp_path / "train", tmp_path / "w.safetensors",
                               TOY, log, "configs/imagenet.yaml", time_limit=2.0)
    assert ended.startswith("stopped at the time limit") and wall < 30
    assert recorded(tmp_path / "root") == (None, [])   # nothing recorded yet: an empty report, not a crash
    leftovers = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                 if _session(pid) is not None and "--root " + str(tmp_path / "root") in _cmdline(pid)]
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_stages_reused_from_an_earlier_run_give_no_throughput():
    sys.path.insert(0, str(REPO))
    from bench.gpu_pipeline import figures_of

    def rows(encode_status: str) -> list[dict]:
        seconds = 0.006 if encode_status == "reused" else 20.0
        return [{"stage": "encode", "status": encode_status, "duration_s": seconds},
                {"stage": "hierarchy", "status": "reused", "duration_s": 0.002},
                {"stage": "evaluate", "status": encode_status, "duration_s": 0.01, "images_per_s": 5e6}]
    figures, table = figures_of(rows("reused"), 50_000)
    assert "jpeg_to_teacher_img_per_s" not in figures and "evaluate_img_per_s" not in figures
    assert figures["encode_s"] == (0.01, "s (reused)") and table["encode"]["status"] == "reused"
    figures, _ = figures_of(rows("computed"), 50_000)
    assert figures["jpeg_to_teacher_img_per_s"][0] == round(50_000 / 20.002, 1)
    assert figures["evaluate_img_per_s"][0] == 5e6
