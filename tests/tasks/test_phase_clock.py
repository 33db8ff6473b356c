"""PhaseClock: host phases summed from any thread; device phases timed by CUDA events, with the issuing
thread's own wall time beside them (tasks/encode/phase_clock.py)."""
import threading
import time

import pytest
import torch

from tasks.encode.phase_clock import PhaseClock


def test_host_phases_add_up_across_threads_and_device_phases_are_host_timed_on_the_cpu():
    clock = PhaseClock(False)

    def wait():
        with clock.host("wait_for_files"):
            time.sleep(0.05)

    threads = [threading.Thread(target=wait) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with clock.device("decode"):
        time.sleep(0.02)
    summary = clock.summary()
    assert summary["wait_for_files"] >= 0.15
    assert summary["decode"] >= 0.02
    assert "decode_host" not in summary   # on the CPU the device phase is the host time already


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need CUDA (runs on the GPU machine)")
def test_a_device_phase_bound_by_its_host_thread_shows_it_in_the_host_time():
    clock = PhaseClock(True)
    x = torch.ones(1024, device="cuda")
    with clock.device("decode"):
        x.add_(1)
        time.sleep(0.1)   # the host works (nvjpeg's Huffman stage) while the stream has one tiny kernel
        x.add_(1)
    summary = clock.summary()
    assert summary["decode_host"] >= 0.1
    assert summary["decode"] <= summary["decode_host"] + 0.05   # the stream waited for the host
