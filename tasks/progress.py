"""Progress for long steps: a tqdm bar in the terminal and, inside a Prefect run, a progress artifact."""
from __future__ import annotations

import time

from tqdm import tqdm


def _in_prefect_run() -> bool:
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None
    except Exception:  # Prefect missing or not configured: terminal bar only
        return False


class Progress:
    """`with Progress(total, "encode") as bar: bar.advance(n)`. Artifact updates are throttled."""

    def __init__(self, total: int, description: str, unit: str = "it", min_interval_s: float = 1.0):
        self.total = max(int(total), 1)
        self.description = description
        self.done = 0
        self._bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, mininterval=0.5)
        self._artifact = None
        self._last = 0.0
        self._min_interval = min_interval_s
        if _in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact = create_progress_artifact(progress=0.0, description=description)

    def advance(self, n: int = 1, **postfix) -> None:
        self.done += n
        self._bar.update(n)
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        now = time.monotonic()
        if self._artifact is not None and (now - self._last >= self._min_interval or self.done >= self.total):
            self._last = now
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact, progress=100.0 * min(self.done, self.total) / self.total)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._artifact is not None and exc[0] is None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact, progress=100.0)
        self._bar.close()
