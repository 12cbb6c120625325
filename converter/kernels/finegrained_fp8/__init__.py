"""Block-FP8 matmul in Triton with the call signature of the Hub kernel `kernels-community/finegrained-fp8`.

    out = matmul_2d(input, weight, weight_scale_inv, block_size, output_dtype, activation_scale=None)

`input` is (..., K) in BF16/F16/F32; `weight` (N, K) `float8_e4m3fn` with float32 `weight_scale_inv` of shape
(ceil(N/bn), ceil(K/bk)). Activations are quantized on the fly to E4M3 per row and per K-block of `bk` values
(dynamic; scale = amax / 448), or with one static `activation_scale`. Each program computes a BLOCK_M x bn tile
of the output, so every K step meets exactly one weight scale.

Self-contained (imports only torch and triton), so that the `kernels` package can load this folder as a local
kernel build, and transformers' `FP8Linear` calls it unchanged. MoE entry points are not provided.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0

__all__ = ["matmul_2d", "matmul_batched", "matmul_grouped", "act_quant_reference"]


@triton.jit
def _round_to_e4m3(v):
    """float32 -> nearest E4M3 value (ties to even), still in float32. Used where the cast is not to be trusted:
    the Triton CPU interpreter rounds values that carry into the next binade wrongly (124.3 -> 64)."""
    a = tl.abs(v)
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(a, 1e-30))), -6.0)
    e = tl.where(a < tl.exp2(e), e - 1.0, e)  # log2 rounded up just below a power of two
    e = tl.maximum(e, -6.0)  # subnormals share the smallest binade's spacing
    ulp = tl.exp2(e - 3.0)
    r = a / ulp
    n = tl.floor(r + 0.5)
    n = tl.where((n - r == 0.5) & (n % 2.0 == 1.0), n - 1.0, n)
    return tl.where(v < 0, -n * ulp, n * ulp)


@triton.jit
def _block_fp8_matmul(
    x_ptr, w_ptr, ws_ptr, out_ptr, static_scale_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_wsn, stride_wsk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STATIC: tl.constexpr, NATIVE_FP8: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0).to(tl.float32)
        if STATIC:
            a_scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(static_scale_ptr)
        else:
            a_scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 448.0
        scaled = tl.clamp(x / a_scale[:, None], -448.0, 448.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None] * stride_wk,
                    mask=(offs_n[None, :] < N) & (k[:, None] < K), other=0.0)
        if NATIVE_FP8:
            part = tl.dot(scaled.to(tl.float8e4nv), w)
        else:  # CPU interpreter: E4M3 rounding by hand, float32 products (exact for E4M3 operands)
            part = tl.dot(_round_to_e4m3(scaled), w.to(tl.float32))
        w_scale = tl.load(ws_ptr + pid_n * stride_wsn + kb * stride_wsk)
        acc += part * a_scale[:, None] * w_scale
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def matmul_2d(input: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size=None,
              output_dtype: torch.dtype | None = None, activation_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`input @ dequant(weight).T` with E4M3 activations, as transformers' FP8Linear expects."""
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise TypeError(f"weight must be 2-D float8_e4m3fn, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if block_size is None:
        block_n, block_k = n, k
    else:
        block_n, block_k = (int(b) for b in block_size)
    if block_n != block_k or block_n & (block_n - 1) or block_n < 16:
        raise ValueError(f"builtin kernel takes square power-of-two blocks of 16 or more, got {block_size}")
    if weight_scale_inv.shape != (triton.cdiv(n, block_n), triton.cdiv(k, block_k)):
        raise ValueError(f"weight_scale_inv {tuple(weight_scale_inv.shape)} does not match weight {(n, k)} "
                         f"in blocks of {block_n}")
    lead = input.shape[:-1]
    x = input.reshape(-1, k)
    m = x.shape[0]
    out = torch.empty((m, n), dtype=output_dtype or input.dtype, device=input.device)
    if m == 0:
        return out.reshape(*lead, n)
    scales = weight_scale_inv.to(torch.float32)
    static = activation_scale is not None
    static_scale = (activation_scale.to(torch.float32).reshape(1) if static
                    else torch.ones(1, dtype=torch.float32, device=input.device))
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _block_fp8_matmul[grid](
        x, weight, scales, out, static_scale, m, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), scales.stride(0), scales.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STATIC=static,
        NATIVE_FP8=os.environ.get("TRITON_INTERPRET") != "1",
    )
    return out.reshape(*lead, n)


def matmul_batched(*args, **kwargs):
    raise NotImplementedError("the builtin finegrained-fp8 kernel covers dense Linear layers only; "
                              "MoE experts need the Hub kernel (--kernel hub or local:PATH)")


matmul_grouped = matmul_batched


def act_quant_reference(x: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantization of `matmul_2d` in plain torch: E4M3 values and per-(row, K-block) scales."""
    m, k = x.shape
    pad = (-k) % block_k
    xf = torch.nn.functional.pad(x.float(), (0, pad)).reshape(m, -1, block_k)
    scale = xf.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(m, -1)[:, :k], scale
