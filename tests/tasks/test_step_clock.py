"""The train stage's StepClock: the step time it records (and the MFU made from it) covers the timed steps
and nothing the run does after its last step."""
import time

import pytest

from models.generator.train_loop import train_generator
from specs import objective, optim, tiny_data, tiny_model
from tasks.train.stage import StepClock, run_with_progress


def test_the_step_time_leaves_out_what_the_run_does_after_its_last_step():
    """Five steps 0.05 s apart, then a second of end-of-run work (the final weight check, the bar's close):
    counted, it would make each of the 3 timed steps about 0.38 s."""
    clock = StepClock(total=5, batch=8, skip=2)
    for step in range(5):
        time.sleep(0.05)
        clock.on_step(step)
    time.sleep(1.0)
    rates = clock.rates("cpu")
    assert rates["timed_steps"] == 3
    assert 0.05 <= rates["step_s"] < 0.2   # sleeps overshoot on a busy machine, never by the end's second
    assert rates["after_last_step_s"] >= 1.0
    assert rates["train_img_per_s"] == pytest.approx(8 / rates["step_s"], rel=1e-3)
    assert "mfu" not in rates   # no H100 / H200 here


def test_the_product_loop_reports_its_last_step_before_it_returns():
    """The loop reports a step's stats one step late; the last step's come after the loop, before the run's
    final checks, so the clock's last mark is the end of the last step and every step is counted."""
    clock = StepClock(total=6, batch=4, skip=2)
    cfg = optim(steps=6, batch_size=4, lr=1e-3, ema_halflives_kimg=[], ema_decays=[0.9])
    run_with_progress("train test", 6, 0, lambda on_step: train_generator(
        tiny_model(), tiny_data(), 1, objective(), cfg, "cpu", on_step), clock)
    assert clock.steps == 6
    rates = clock.rates("cpu")
    assert rates["timed_steps"] == 4 and rates["step_s"] > 0 and rates["after_last_step_s"] >= 0
