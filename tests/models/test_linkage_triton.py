"""The fused Triton merge loop (models.hierarchy.linkage_triton) against the torch loop of models.hierarchy.batched.

No GPU here: the kernel runs on CPU tensors through Triton's interpreter. TRITON_INTERPRET=1 has
to be set before triton.language is first imported, so the checks (linkage_triton_checks.py)
run once, in one subprocess, and each test reads its own result.
"""
from pathlib import Path

import pytest
import torch

from models.hierarchy.batched import build_hierarchies_batched
from specs import hierarchy_spec
from triton_interpreter import run_interpreted

pytestmark = pytest.mark.slow   # Triton kernels in the interpreter: left out of `make check`

CHECKS = Path(__file__).with_name("linkage_triton_checks.py")


@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton", reason="triton is not installed: the fused kernel cannot run")
    return run_interpreted([str(CHECKS)])


@pytest.mark.parametrize("check", ["kernel_T24_all_steps", "kernel_T19_fewer_steps", "kernel_T2_one_step"])
def test_kernel_gives_the_torch_loops_heights_and_labels(interpreted_results, check):
    """Random problems (~60% object tokens), one all background, one full of ties, one all object."""
    assert interpreted_results[check] == "ok", interpreted_results[check]


def test_hierarchies_with_the_triton_linkage_equal_the_torch_linkage(interpreted_results):
    assert interpreted_results["hierarchies"] == "ok", interpreted_results["hierarchies"]


def test_generated_regions_with_the_triton_linkage_equal_scipys(interpreted_results):
    assert interpreted_results["generated_regions"] == "ok", interpreted_results["generated_regions"]


def test_unknown_linkage_is_refused():
    with pytest.raises(ValueError, match="linkage"):
        build_hierarchies_batched(torch.randn(1, 2, 2, 3), hierarchy_spec(), linkage="cuda")
