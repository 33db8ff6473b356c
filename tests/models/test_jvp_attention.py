"""The forward-only attention tangent (models/generator/jvp_attention.py) against torch.func.jvp of the written-out
math path, in float64: the torch formula, the custom op, and the Triton kernel itself through Triton's
CPU interpreter (in a subprocess: triton_interpreter.py)."""
from __future__ import annotations

import pytest
import torch

from models.generator.jvp_attention import attention_tangent_op, math_attention_fn, tangent_torch
from triton_interpreter import REPO, run_interpreted


def qkv_and_tangents(shape=(2, 3, 37, 8), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    primals = tuple(torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    tangents = tuple(torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    return primals, tangents


def math_tangent(primals, tangents):
    return torch.func.jvp(math_attention_fn, primals, tangents)


def test_torch_formula_equals_math_jvp_in_float64():
    primals, tangents = qkv_and_tangents()
    expected = math_tangent(primals, tangents)[1]
    for chunk in (5, 1024):   # several query chunks, and one
        got = tangent_torch(*primals, *tangents, chunk=chunk)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_tangent_is_not_the_trivial_part():
    """dO has a softmax term; dropping it (P dV only) must be visibly wrong, so the check above bites."""
    primals, tangents = qkv_and_tangents(seed=1)
    expected = math_tangent(primals, tangents)[1]
    p = torch.softmax(primals[0] @ primals[1].transpose(-2, -1) / primals[0].shape[-1] ** 0.5, -1)
    assert (p @ tangents[2] - expected).abs().max() > 0.1


def test_custom_op_equals_math_jvp_and_has_a_fake():
    primals, tangents = qkv_and_tangents(seed=2)
    expected = math_tangent(primals, tangents)[1]
    got = attention_tangent_op(*primals, *tangents)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    torch.library.opcheck(attention_tangent_op, (*primals, *tangents))   # schema, fake tensor and strides


def test_custom_op_takes_head_views_and_returns_token_major():
    """q, k, v as strided head views of one fused projection; the output merges heads by a view."""
    g = torch.Generator().manual_seed(3)
    fused = [torch.randn((2, 11, 3, 4, 8), generator=g, dtype=torch.float64) for _ in range(2)]
    primals, tangents = (tuple(f.permute(2, 0, 3, 1, 4)) for f in fused)
    expected = math_tangent(tuple(x.contiguous() for x in primals), tuple(x.contiguous() for x in tangents))[1]
    got = attention_tangent_op(*primals, *tangents)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert got.transpose(1, 2).is_contiguous()
    torch.library.opcheck(attention_tangent_op, (*primals, *tangents))


INTERPRETED = r"""
import json, os, sys, torch
sys.path.insert(0, sys.argv[1])
from models.generator.jvp_attention import math_attention_fn, tangent_triton
out = {}
for dtype, name in ((torch.float64, "float64"), (torch.float32, "float32")):
    g = torch.Generator().manual_seed(5)
    shape = (2, 2, 37, 8)   # 37 tokens: partial last block; head dim 8 padded to 16
    p = tuple(torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    t = tuple(torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    ref = torch.func.jvp(math_attention_fn, p, t)[1]
    got = tangent_triton(*(x.to(dtype) for x in p + t), block_m=16, block_n=16).double()
    out[name] = float(((got - ref).abs().max() / ref.abs().max()))
# head views of fused [B, N, 3, H, D] projections, as the DiT passes them: strided, no copies
g = torch.Generator().manual_seed(6)
fused = [torch.randn((2, 37, 3, 2, 8), generator=g, dtype=torch.float64) for _ in range(2)]
p, t = (tuple(f.permute(2, 0, 3, 1, 4)) for f in fused)
ref = torch.func.jvp(math_attention_fn, tuple(x.contiguous() for x in p), tuple(x.contiguous() for x in t))[1]
got = tangent_triton(*p, *t, block_m=16, block_n=16)
out["strided"] = float(((got - ref).abs().max() / ref.abs().max()))
out["token_major"] = got.transpose(1, 2).is_contiguous()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_triton_kernel_in_interpreter_equals_math_jvp():
    pytest.importorskip("triton", reason="triton is not installed")
    errors = run_interpreted(["-c", INTERPRETED, str(REPO)])
    assert errors["float64"] < 1e-12, errors
    assert errors["float32"] < 1e-5, errors
    assert errors["strided"] < 1e-12, errors
    assert errors["token_major"], errors
