"""The stages' work: thin Prefect tasks over the functions they call (flows put them together)."""
import os

# CUDA's hardware work queues for this process's streams, before any CUDA context exists (the driver reads it
# once, at the context's creation). With its default 8 the streams share queues, and work on one waits for
# what another queued before it: on an H100 the JPEG decode's stream waited for the encoder's kernels (inline
# nvjpeg's call 7.2 s on 30,000 files, 4.9 s with 32; docs/gpu.md). A value the user set stays.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
