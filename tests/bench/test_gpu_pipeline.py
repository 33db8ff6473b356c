"""bench/gpu_pipeline.py at a toy size on the CPU: the acceptance run's own code path (JPEGs, a weights
file in timm's format, `tf pipeline` as a subprocess, figures read back from tables/runs)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOY = ["device=cpu", "encoder.model=vit_small_patch14_reg4_dinov2", "source.image_size=56", "source.resize_short=64",
       "encoder.batch_size=16", "encoder.stats_images=8", "ingest.chunk_size=16", "ingest.workers=1",
       "generator.preset=tiny", "generator.steps=3", "generator.batch_size=8", "generator.compile=false",
       "decoder.width=32", "decoder.depth=1", "decoder.heads=2", "decoder.steps=3", "decoder.batch_size=8",
       "evaluate.num_samples=8", "evaluate.keep_trajectories=4", "evaluate.edits_per_level=1",
       "evaluate.bootstrap=10", "evaluate.grid_rows=4"]


def test_the_acceptance_run_reports_every_stage_from_the_runs_table(tmp_path):
    out = tmp_path / "out"
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
    assert (out / "grid.png").stat().st_size > 1000 and "pipeline" in (out / "pipeline.log").read_text()
