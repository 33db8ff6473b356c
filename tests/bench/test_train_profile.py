"""bench/train_profile.py on the CPU: it trains through the product's loop with the config's settings, times
its steps from the loop's own callback, profiles two of them and times the work outside the model. Its
numbers say nothing about GPUs."""
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_the_configured_loop_is_profiled_with_its_optimizer_and_emas(tmp_path, monkeypatch):
    import models.generator.train_loop as train_loop
    from bench import train_profile

    # in this process (torch is imported already); what main() changes globally is put back afterwards
    monkeypatch.setattr(train_loop, "DEVICE_RESIDENT_SHARE", train_loop.DEVICE_RESIDENT_SHARE)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["train_profile.py", "--config", "configs/tiny.yaml",
                                      "--set", "generator.optimizer=muon", "--set", "generator.compile=false",
                                      "--set", "generator.batch_size=8", "--set", "generator.device_batch=4",
                                      "--steps", "6", "--grid", "4", "--token-dim", "8", "--repeats", "2",
                                      "--host-latents", "--out", str(tmp_path)])
    rng = torch.get_rng_state()
    try:
        train_profile.main()
    finally:
        torch.set_rng_state(rng)
    report = json.loads((tmp_path / "train_profile.json").read_text())
    settings, figures = report["settings"], report["figures"]
    assert (settings["optimizer"], settings["batch_size"], settings["device_batch"]) == ("muon", 8, 4)
    assert settings["latents"] == "host (pinned gathers)"
    assert settings["emas"] == 3   # configs/tiny.yaml's EDM half-lives and the sampled one, as the stage keeps them
    assert report["timed_steps"] == 6 - 2 and report["profiled_steps"] == 2
    step_s = figures["step_s"]["value"]
    assert step_s > 0 and abs(figures["img_per_s"]["value"] - 8 / step_s) < 0.1
    assert "mfu" not in figures   # only on an H100 / H200
    assert figures["before_timed_steps_s"]["value"] > 0   # the steps before the timed ones (the compile on a GPU)
    assert all(figures[k]["value"] > 0 for k in ("optimizer_ms", "emas_ms", "grad_norm_ms"))
    assert report["families_ms"] and "aten::mm" in report["top_kernels_ms"]
    assert report["commit"] and report["command"].endswith("--out " + str(tmp_path))

    # --combine: this result and a slower copy of it, as two processes that shared a GPU
    for name, seconds in (("1", step_s), ("2", 2 * step_s)):
        (tmp_path / "procs" / name).mkdir(parents=True)
        body = json.loads(json.dumps(report))
        body["figures"]["step_s"]["value"] = seconds
        body["figures"]["before_timed_steps_s"]["value"] = 10 * seconds
        (tmp_path / "procs" / name / "train_profile.json").write_text(json.dumps(body))
    monkeypatch.setattr(sys, "argv", ["train_profile.py", "--combine", str(tmp_path / "procs"), "--out", str(tmp_path)])
    train_profile.main()
    combined = json.loads((tmp_path / "train_profile_concurrent.json").read_text())["figures"]
    assert combined["processes"]["value"] == 2 and combined["step_s_max"]["value"] == 2 * step_s
    assert abs(combined["step_s_mean"]["value"] - 1.5 * step_s) < 1e-4
    assert abs(combined["img_per_s_total"]["value"] - (8 / step_s + 4 / step_s)) < 0.1
    assert combined["before_timed_steps_s_max"]["value"] == 20 * step_s


def test_too_few_steps_to_profile_are_refused(monkeypatch):
    from bench import train_profile

    monkeypatch.setattr(sys, "argv", ["train_profile.py", "--steps", "3"])
    with pytest.raises(SystemExit, match="--steps must exceed --warmup"):
        train_profile.main()
