"""The encoder's forward as one CUDA graph per batch shape (encoder.cuda_graph), and the fused hierarchy
(encoder.hierarchy_graph).

Eager, a DINOv2-B batch is hundreds of kernel launches issued by one Python thread. In the encode pass that
thread shares the GIL with the readers, the preparing thread and the writers, and every time it waits for
the GIL the GPU may run dry (docs/gpu.md: the encoder's phase took three times its resident time while CPU
threads decoded). Replayed as a graph, a batch is one launch. The graph is captured at the first batch of
each shape (the full batch and the pass's last one), after warm-up passes on a side stream as
torch.cuda.graphs asks; a replay copies the batch into the captured input and the captured output out, so
what it returns is never overwritten by the next replay. The same bf16 autocast as the eager path (its
weight-cast cache off: the casts are captured with the graph).

Capture is thread-local: the preparing thread keeps decoding on its own stream meanwhile. But a capture
fails when any thread synchronises the whole device during it (on an H100 the hierarchy's kernel warm-up
did, beside the statistics pass's first capture: cuDNN's attention failed inside the capture and the stage
with it), so captures and such work hold CAPTURE_LOCK. No I/O here.
"""
from __future__ import annotations

import threading
import warnings

import torch

from models.encoder import encode_tensor

WARMUP_PASSES = 3   # cuBLAS and autocast state settle before capture (torch.cuda.graphs' advice)
CAPTURE_LOCK = threading.Lock()   # held by every capture here, and by other threads' device-wide work


def _captured(run, *static: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, its output) of run(*static): warmed up on a side stream first, as torch.cuda.graphs asks, then
    captured thread-locally (the preparing thread keeps decoding on its own stream meanwhile)."""
    device = static[0].device
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    with CAPTURE_LOCK:
        side.wait_stream(current)
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                run(*static)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = run(*static)
    return graph, out


class EncoderGraphs:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _forward(self, images01: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return encode_tensor(self.model, images01)

    def _capture(self, example: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = example.clone()
        graph, static_out = _captured(self._forward, static_in)
        return graph, static_in, static_out

    def _graph_for(self, example: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        key = (tuple(example.shape), example.dtype, example.device)
        if key not in self.graphs:
            self.graphs[key] = self._capture(example)
        return self.graphs[key]

    def capture(self, batch: int, size: int, device: torch.device | str) -> None:
        """Capture the graph of [batch, 3, size, size] float32 batches now (the stage does so for its full batch
        before other threads start work on the device)."""
        self._graph_for(torch.zeros((batch, 3, size, size), dtype=torch.float32, device=device))

    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] on CUDA -> the encoder's [B, T, C] tokens, as encode_tensor under autocast."""
        graph, static_in, static_out = self._graph_for(images01)
        static_in.copy_(images01)
        graph.replay()
        return static_out.clone()


class HierarchyGraphs:
    """The fused pass's hierarchy (models.hierarchy.batched.build_hierarchies_batched with the statistics made on
    the device and the NaN flag, the call that never waits for the device) as one CUDA graph per batch shape
    (encoder.hierarchy_graph). Eager it is a few hundred launches a batch from the thread that also launches the
    encoder: 7.8 s of that thread's time for 1.4 s of device work on 50,000 images (docs/gpu.md). A replay copies
    the batch in, clears the graph's own NaN flag, and ORs it into the caller's. Should a capture fail, the
    warning says why and every batch runs eagerly, as without the setting."""

    def __init__(self, spec, stats: tuple):
        self.spec, self.stats = spec, stats
        self.graphs: dict[tuple, tuple] = {}
        self.failed: str | None = None

    def _eager(self, tokens: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
        from models.hierarchy.batched import build_hierarchies_batched

        return build_hierarchies_batched(tokens, self.spec, stats=self.stats, nonfinite=nonfinite)

    def _capture(self, example: torch.Tensor) -> tuple:
        static_in = example.clone()
        flag = torch.zeros((), dtype=torch.bool, device=example.device)

        def run(tokens: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
            nonfinite.zero_()   # the graph's own flag, cleared at each replay
            return self._eager(tokens, nonfinite)

        # the warm-up passes also compile the Triton kernels and cache the k-means++ draws' table
        graph, static_out = _captured(run, static_in, flag)
        return graph, static_in, flag, static_out

    def __call__(self, tokens: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
        """int16 region ids [B, levels, g, g] of tokens [B, g, g, C] on CUDA, as _eager gives them."""
        key = (tuple(tokens.shape), tokens.dtype, tokens.device)
        if self.failed is None and key not in self.graphs:
            try:
                self.graphs[key] = self._capture(tokens)
            except Exception as error:   # a head start only: the pass goes on eagerly, and says why
                self.failed = repr(error)
                warnings.warn(f"capturing the hierarchy as a CUDA graph failed ({self.failed}); it runs eagerly",
                              stacklevel=2)
        if self.failed is not None:
            return self._eager(tokens, nonfinite)
        graph, static_in, flag, static_out = self.graphs[key]
        static_in.copy_(tokens)
        graph.replay()
        nonfinite.logical_or_(flag)
        return static_out.clone()
