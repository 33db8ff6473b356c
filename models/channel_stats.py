"""Per-channel mean/std in one streaming pass (Chan et al. parallel merge of Welford moments).

Each encode chunk contributes (count, mean, M2); merging the chunks in any order gives the
dataset statistics without ever holding all latents, and a resumed run merges the same chunks.
"""
from __future__ import annotations

import numpy as np


def chunk_moments(values: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """values [..., C] -> (count, mean [C], M2 [C]) in float64."""
    flat = np.asarray(values, np.float64).reshape(-1, values.shape[-1])
    if len(flat) == 0:
        zeros = np.zeros(values.shape[-1])
        return 0, zeros, zeros.copy()
    mean = flat.mean(0)
    return len(flat), mean, ((flat - mean) ** 2).sum(0)


def merge_moments(a: tuple[int, np.ndarray, np.ndarray], b: tuple[int, np.ndarray, np.ndarray]):
    count_a, mean_a, m2_a = a
    count_b, mean_b, m2_b = b
    count = count_a + count_b
    if count == 0:
        return a
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    m2 = m2_a + m2_b + delta**2 * (count_a * count_b / count)
    return count, mean, m2


def mean_std(counts: np.ndarray, means: np.ndarray, m2s: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-chunk moments -> (mean [C], population std [C]) as float32."""
    total = (0, np.zeros(means.shape[-1]), np.zeros(means.shape[-1]))
    for moments in zip(counts, means, m2s):
        total = merge_moments(total, (int(moments[0]), moments[1], moments[2]))
    count, mean, m2 = total
    if count == 0:
        raise ValueError("no valid samples to compute channel statistics from")
    return mean.astype(np.float32), np.sqrt(m2 / count + eps).astype(np.float32)


class DeviceMoments:
    """(count, mean, M2) per channel accumulated on the values' device in float64, batch by batch:
    each batch's own two-pass moments merged by merge_moments' formula, with no host sync until
    `result()`. What the encode pass keeps per chunk so float32 tokens never travel to the host."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, values) -> None:
        """values [..., C] (a torch tensor); an empty batch adds nothing."""
        flat = values.reshape(-1, values.shape[-1]).double()
        if len(flat) == 0:
            return
        mean = flat.mean(0)
        m2 = (flat - mean).square_().sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = len(flat), mean, m2
            return
        count = self.count + len(flat)
        delta = mean - self.mean
        self.mean = self.mean + delta * (len(flat) / count)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * len(flat) / count)
        self.count = count

    def result(self, channels: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(count, mean [C], M2 [C]) as chunk_moments gives them (zeros when nothing was added)."""
        if self.mean is None:
            zeros = np.zeros(channels)
            return 0, zeros, zeros.copy()
        return self.count, self.mean.cpu().numpy(), self.m2.cpu().numpy()
