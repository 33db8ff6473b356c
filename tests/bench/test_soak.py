"""CI's kill-and-resume soak: 1 trial per stage (ingest, encode, hierarchy, train L0, evaluate) on the
built-in scenes, each SIGKILLed at a random point and run again; nothing may be lost, duplicated or
differ from an uninterrupted run. The full soak (20 per stage) is `bench/soak.py`."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_kill_per_stage_loses_duplicates_and_changes_nothing(tmp_path):
    out = tmp_path / "reliability.json"
    # A fresh interpreter: the soak forks its stage processes, which must not inherit pytest's threads.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--trials", "1", "--seed", "7",
                          "--set", "ingest.workers=1", "--set", "generator.checkpoint_every=2",
                          "--work", str(tmp_path / "work"), "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stderr[-4000:]
    body = json.loads(out.read_text())
    total = body["total"]
    assert total["trials"] == 5 and set(body["per_stage"]) == {"ingest", "encode", "hierarchy", "train", "evaluate"}
    assert total["kills"] >= 1   # a soak in which nothing was killed would prove nothing
    for stage, figures in body["per_stage"].items():
        assert figures["trials"] == 1, stage
        for name in ("lost", "duplicated", "mismatched", "store_invalid", "resume_failures"):
            assert figures[name] == 0, (stage, name, [t for t in body["trials"] if t["stage"] == stage])
