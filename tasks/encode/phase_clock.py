"""Where a pipelined pass spends its time, measured inside the pass without stalling it.

Device phases are bracketed by CUDA events on the stream that runs them and read only at the end
(one synchronisation for the whole pass); the issuing thread's wall time inside each is kept too, as
`<phase>_host` (where it exceeds the device time, the host bounds the phase: nvjpeg's Huffman stage runs
on the host, an eager encoder is hundreds of launches). Host phases (waiting for files, for a free buffer,
writing) are summed wall-clock seconds, from any thread. `summary()` gives seconds per phase: device
phases as the GPU ran them (phases on different streams overlap, so they need not add up to the wall
time), host phases as the threads waited or worked. On the CPU, device phases are host-timed.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator


class PhaseClock:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._events: list[tuple[str, object, object]] = []
        self._host: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def device(self, name: str, stream=None) -> Iterator[None]:
        """A phase of device work issued on `stream` (the current one when None)."""
        if not self.cuda:
            with self.host(name):
                yield
            return
        import torch

        stream = stream or torch.cuda.current_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began = time.perf_counter()
        start.record(stream)
        try:
            yield
        finally:
            end.record(stream)
            self.add(f"{name}_host", time.perf_counter() - began)
            with self._lock:
                self._events.append((name, start, end))

    @contextlib.contextmanager
    def host(self, name: str) -> Iterator[None]:
        """A phase of host time (waiting or working), from any thread."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - began)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._host[name] += seconds

    def summary(self) -> dict[str, float]:
        """Seconds per phase (device phases: after their events have completed)."""
        out = dict(self._host)
        with self._lock:
            events = list(self._events)
        for name, start, end in events:
            end.synchronize()
            out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        return {name: round(seconds, 3) for name, seconds in sorted(out.items())}


class Laps:
    """Wall-clock seconds of a stage's consecutive steps (checking the source, loading the encoder, the
    pass...): `lap(name)` closes the step that began at the previous lap. What the phases inside the pass
    cannot show: where the stage's time went before and after it."""

    def __init__(self):
        self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self._last = now
