"""The fused Triton k-means (models.hierarchy.kmeans_triton) against the torch loop of models.hierarchy.batched.

No GPU here: the kernel runs on CPU tensors through Triton's interpreter, in one subprocess with
TRITON_INTERPRET=1 (kmeans_triton_checks.py); each test reads its own result.
"""
from pathlib import Path

import pytest
import torch

from models.hierarchy.batched import object_masks, uses_triton
from specs import hierarchy_spec
from triton_interpreter import run_interpreted

pytestmark = pytest.mark.slow   # Triton kernels in the interpreter: left out of `make check`

CHECKS = Path(__file__).with_name("kmeans_triton_checks.py")


@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton", reason="triton is not installed: the fused kernel cannot run")
    return run_interpreted([str(CHECKS)])


@pytest.mark.parametrize("check", ["labels_T49_k2", "labels_T36_k3_alpha", "labels_T25_two_iterations",
                                   "labels_T16_no_iteration"])
def test_kernel_gives_the_torch_loops_labels(interpreted_results, check):
    """Blob images (one all identical, one of duplicated tokens), k 2 and 3, full and cut-short runs."""
    assert interpreted_results[check] == "ok", interpreted_results[check]


@pytest.mark.parametrize("check", ["plusplus_T30_k2", "plusplus_T30_k5"])
def test_kernel_picks_the_torch_plusplus_centres(interpreted_results, check):
    assert interpreted_results[check] == "ok", interpreted_results[check]


def test_object_masks_and_hierarchies_equal_the_torch_kmeans(interpreted_results):
    assert interpreted_results["masks_and_hierarchies"] == "ok", interpreted_results["masks_and_hierarchies"]


def test_auto_uses_torch_on_cpu_and_rejects_unknown_names():
    assert not uses_triton("auto", torch.device("cpu"), "kmeans")
    assert not uses_triton("torch", torch.device("cuda"), "kmeans")
    with pytest.raises(ValueError, match="kmeans must be one of"):
        object_masks(torch.zeros(1, 4, 3), torch.zeros(4, 2), hierarchy_spec(), kmeans="sklearn")
