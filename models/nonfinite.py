"""Noticing a diverged training run without a host sync every step.

Each step `observe` folds "is this step's loss or gradient norm NaN or infinite, or is every gradient
exactly zero while the loss is not?" into a flag kept on the device (with the first such step and its
values); nothing is read back. The second is divergence that stays finite: a learning rate far too high
throws the weights so far (decoder.lr 1e6 on configs/tiny.yaml: 7e5 within 8 updates) that the output
saturates and no gradient flows any more; healthy training never has a zero gradient above a non-zero
loss. `check` reads the flag, one small device-to-host copy, at a cadence (`due`) and always before a
snapshot or the run's end, and raises NonFiniteTraining naming the first bad step and its values. A check
at a snapshot or the end also looks at the weights themselves: an update can overflow them while the loss
that drove it was still finite.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

CHECK_EVERY = 25   # steps between reads of the flag: a diverged run stops within this many steps


class NonFiniteTraining(RuntimeError):
    """A training run produced a NaN or infinite loss, gradient or weight, or its gradient vanished."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step   # the first bad update, 1-based (None: only the weights were found bad)


def _text(value: float) -> str:
    return "nan" if math.isnan(value) else repr(value)


class DivergenceWatch:
    """The device-side flag of one run. `observe(loss, grad_norm, step)` each step, `check()` at times."""

    def __init__(self, device: torch.device | str, start: int = 0):
        """`start`: updates already done (a resumed run), so the error names the run's own update number."""
        self.device = torch.device(device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.values = torch.zeros(2, dtype=torch.float32, device=self.device)   # loss, grad norm at first_bad
        self.counter = torch.full((), start, dtype=torch.int64, device=self.device)   # updates done, on the device

    def observe(self, loss: Tensor, grad_norm: Tensor) -> None:
        """One update's loss and gradient norm (0-d tensors on the run's device); no host sync."""
        self.counter += 1
        now = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())])
        dead = (now[1] == 0) & (now[0] > 0)   # a finite loss no parameter can move: saturated
        newly = ((~torch.isfinite(now)).any() | dead) & (self.first_bad < 0)
        self.first_bad = torch.where(newly, self.counter, self.first_bad)
        self.values = torch.where(newly, now, self.values)

    @staticmethod
    def due(step: int) -> bool:
        """Whether the flag is read after update `step` (1-based) at the cadence alone."""
        return step % CHECK_EVERY == 0

    def check(self, weights: Iterable[Tensor] = ()) -> None:
        """Raise NonFiniteTraining if any update so far had a non-finite loss or gradient norm, or any of
        `weights` holds a non-finite value."""
        first = int(self.first_bad)
        if first >= 0:
            loss, norm = (float(v) for v in self.values.tolist())
            if math.isfinite(loss) and norm == 0:
                raise NonFiniteTraining(f"the gradient vanished at update {first}: loss {_text(loss)}, gradient "
                                        "norm 0.0 (every gradient exactly zero above a non-zero loss: the weights "
                                        "were thrown so far that the output saturated)", step=first)
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise NonFiniteTraining(f"non-finite {what} at update {first}: loss {_text(loss)}, gradient norm "
                                    f"{_text(norm)}", step=first)
        bad = nonfinite_count(weights)
        if bad:
            raise NonFiniteTraining(f"{bad} non-finite weight values after update {int(self.counter)}")


def nonfinite_count(tensors: Iterable[Tensor]) -> int:
    """How many NaN or infinite values the floating-point tensors hold (one read-back)."""
    counts = [(~torch.isfinite(t.detach())).sum() for t in tensors if t.is_floating_point()]
    return int(torch.stack(counts).sum()) if counts else 0
