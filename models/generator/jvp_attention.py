"""Attention with a forward-mode derivative that keeps the fused kernel for the primal.

torch.func.jvp through F.scaled_dot_product_attention raises NotImplementedError for the flash,
memory-efficient and cuDNN kernels, and the written-out math path holds the full [B, H, N, N] score,
probability and tangent tensors. The mean-flow tangent enters the loss only through a stop-gradient,
so a forward-only JVP suffices. For O = softmax(S) V with S = scale * Q K^T:

    dS   = scale * (dQ K^T + Q dK^T)
    dO_i = sum_j P_ij (dS_ij V_j + dV_j) - mu_i O_i,      mu_i = sum_j P_ij dS_ij   (per query row i)

which a flash-style pass over key blocks computes with one online softmax (running max m, sum l) and
three accumulators (P V, P dS V + P dV, P dS), never storing an N x N tensor.

`attention_tangent` is the Triton kernel on CUDA and a query-chunked torch version of the same
formula elsewhere; `attention_tangent_op` wraps it as a custom op that torch.compile leaves opaque.
models/generator/dit_jvp.py uses it next to fused SDPA for the value. tests/models/test_jvp_attention.py checks
both against torch.func.jvp of the math path in float64 (the Triton kernel through Triton's CPU
interpreter).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

try:   # triton ships with CUDA builds of torch; CPU-only installs use the torch formula
    import triton
    import triton.language as tl
except ImportError:   # pragma: no cover - depends on the install
    triton = None


def math_attention_fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(Q K^T / sqrt(d)) V written out (differentiable in both modes, O(N^2) memory)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def tangent_torch(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor,
                  chunk: int = 1024) -> Tensor:
    """dO by the formula above, in chunks of query rows (memory [B, H, chunk, N]), computed in
    float32 at least."""
    work = torch.promote_types(q.dtype, torch.float32)
    q, k, v, dq, dk, dv = (t.to(work) for t in (q, k, v, dq, dk, dv))
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = q.new_empty(q.shape)
    for start in range(0, q.shape[-2], chunk):
        rows = slice(start, start + chunk)
        p = torch.softmax(q[..., rows, :] @ k.transpose(-2, -1) * scale, dim=-1)
        ds = (dq[..., rows, :] @ k.transpose(-2, -1) + q[..., rows, :] @ dk.transpose(-2, -1)) * scale
        pds = p * ds
        mu = pds.sum(-1, keepdim=True)
        out[..., rows, :] = pds @ v + p @ dv - mu * (p @ v)
    return out


if triton is not None:
    @triton.jit
    def _tangent_kernel(Q, K, V, DQ, DK, DV, DO, heads, n_tokens, head_dim, scale, score_scale,
                        p_b, p_h, p_n, t_b, t_h, t_n, o_b, o_h, o_n,
                        ACC: tl.constexpr, PRECISION: tl.constexpr, EXP2: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program: BLOCK_M query rows of one (batch, head). Inputs are strided [B, H, N, D] views
        with unit stride in D (p_*: strides of Q, K, V; t_*: of DQ, DK, DV; o_*: of DO)."""
        block_m = tl.program_id(0)
        b = (tl.program_id(1) // heads).to(tl.int64)
        h = (tl.program_id(1) % heads).to(tl.int64)
        p_base, t_base, o_base = b * p_b + h * p_h, b * t_b + h * t_h, b * o_b + h * o_h
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < n_tokens
        dim_ok = dims < head_dim
        q_ok = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(Q + p_base + rows[:, None] * p_n + dims[None, :], mask=q_ok, other=0.0)
        dq = tl.load(DQ + t_base + rows[:, None] * t_n + dims[None, :], mask=q_ok, other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), ACC)
        l_i = tl.zeros([BLOCK_M], ACC)
        mu = tl.zeros([BLOCK_M], ACC)
        acc_o = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        for start in range(0, n_tokens, BLOCK_N):
            keys = start + cols
            key_ok = keys < n_tokens
            kv_ok = key_ok[:, None] & dim_ok[None, :]
            p_at = p_base + keys[:, None] * p_n + dims[None, :]
            t_at = t_base + keys[:, None] * t_n + dims[None, :]
            k = tl.load(K + p_at, mask=kv_ok, other=0.0)
            dk = tl.load(DK + t_at, mask=kv_ok, other=0.0)
            v = tl.load(V + p_at, mask=kv_ok, other=0.0)
            dv = tl.load(DV + t_at, mask=kv_ok, other=0.0)
            kt, dkt = tl.trans(k), tl.trans(dk)
            # scores in log2 units (exp2 is the GPU's native exponential; fp64 keeps natural units and exp,
            # since exp2 on fp64 runs at fp32 accuracy); dS stays in natural units
            s = tl.dot(q, kt, input_precision=PRECISION, out_dtype=ACC) * score_scale
            ds = tl.dot(q, dkt, acc=tl.dot(dq, kt, input_precision=PRECISION, out_dtype=ACC),
                        input_precision=PRECISION, out_dtype=ACC) * scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if EXP2:
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
            else:
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
            pds = p * ds
            l_i = l_i * alpha + tl.sum(p, 1)
            mu = mu * alpha + tl.sum(pds, 1)
            acc_o = tl.dot(p.to(v.dtype), v, acc=acc_o * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
            acc_t = tl.dot(p.to(dv.dtype), dv,
                           acc=tl.dot(pds.to(v.dtype), v, acc=acc_t * alpha[:, None], input_precision=PRECISION,
                                      out_dtype=ACC),
                           input_precision=PRECISION, out_dtype=ACC)
            m_i = m_new
        o = acc_o / l_i[:, None]
        do = acc_t / l_i[:, None] - (mu / l_i)[:, None] * o
        tl.store(DO + o_base + rows[:, None] * o_n + dims[None, :], do.to(DO.dtype.element_ty), mask=q_ok)


def token_major_empty(like: Tensor) -> Tensor:
    """An uninitialised [B, H, N, D] tensor laid out as [B, N, H, D]: merging the heads back into
    [B, N, H * D] is then a free view (the attention output's usual layout)."""
    batch, heads, tokens, dim = like.shape
    return like.new_empty((batch, tokens, heads, dim)).transpose(1, 2)


def _same_strides(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The kernel takes one stride set per triple, unit stride in D: copy only when that fails."""
    if all(t.stride() == tensors[0].stride() for t in tensors) and tensors[0].stride(-1) == 1:
        return tensors
    return tuple(t.contiguous() for t in tensors)


def tangent_triton(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor,
                   block_m: int = 64, block_n: int = 32, num_warps: int = 4, num_stages: int = 3) -> Tensor:
    """dO through the Triton kernel: [B, H, N, D] inputs of one dtype (bf16/fp16/fp32/fp64), any
    strides with unit stride in D (e.g. head views of a fused QKV projection: no copies); the output is
    token-major (token_major_empty). fp32 accumulation (fp64 for fp64 inputs), fp32 matmuls without
    TF32. Default blocks: the fastest of twelve tried on an H200 at B=256, 12 heads, 256 tokens, d=64
    (bench/results/generators.json)."""
    if triton is None:
        raise RuntimeError("triton is not installed: use tangent_torch")
    batch, heads, tokens, dim = q.shape
    dtype = q.dtype
    q, k, v = _same_strides((q, k, v))
    dq, dk, dv = _same_strides(tuple(t.to(dtype) for t in (dq, dk, dv)))
    out = token_major_empty(q)
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    precision = "tf32" if dtype in (torch.bfloat16, torch.float16) else "ieee"   # ignored for 16-bit inputs
    block_d = max(16, triton.next_power_of_2(dim))
    grid = (triton.cdiv(tokens, block_m), batch * heads)
    exp2 = dtype != torch.float64
    scale = 1.0 / math.sqrt(dim)
    score_scale = scale * math.log2(math.e) if exp2 else scale
    _tangent_kernel[grid](q, k, v, dq, dk, dv, out, heads, tokens, dim, scale, score_scale,
                          *q.stride()[:3], *dq.stride()[:3], *out.stride()[:3],
                          ACC=acc, PRECISION=precision, EXP2=exp2, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                          num_warps=num_warps, num_stages=num_stages)
    return out


def attention_tangent(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor) -> Tensor:
    """dO in q's dtype, token-major on every device (the custom op's fake promises that layout)."""
    if q.is_cuda and triton is not None:
        return tangent_triton(q, k, v, dq, dk, dv)
    return token_major_empty(q).copy_(tangent_torch(q, k, v, dq, dk, dv))


@torch.library.custom_op("tf::attention_tangent", mutates_args=())
def attention_tangent_op(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor) -> Tensor:
    """attention_tangent as an opaque op, so torch.compile keeps the kernel as it is."""
    return attention_tangent(q, k, v, dq, dk, dv)


@attention_tangent_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor) -> Tensor:
    return token_major_empty(q)
