"""Accuracy of the builtin block-FP8 kernel against float64 references, and through transformers' FP8Linear.

    python -m converter.kernels.check [--device cuda|cpu] [--shapes M,N,K ...] [--json]

On a CPU set TRITON_INTERPRET=1 (small shapes only). Two references per shape, both in float64 from the same
E4M3 weights and scales: `emulated` quantizes the activations exactly as the kernel does (the kernel must match
it to float32 rounding), `unquantized` keeps them exact (what FP8 activations cost).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..quantize import quantize_blocks
from .finegrained_fp8 import act_quant_reference, matmul_2d

SMALL_SHAPES = [(1, 64, 64), (5, 192, 256), (33, 128, 320)]
REAL_SHAPES = [(16, 8192, 5376), (16, 21504, 5376), (16, 5376, 21504), (128, 16384, 5376)]


def references(x: torch.Tensor, fp8: torch.Tensor, scale_inv: torch.Tensor, block: int):
    n, k = fp8.shape
    w = fp8.double().reshape(n // block, block, k // block, block) * scale_inv.double()[:, None, :, None]
    w = w.reshape(n, k)
    xq, xs = act_quant_reference(x, block)
    m = x.shape[0]
    xd = (xq.double().reshape(m, -1, block) * xs.double()[..., None]).reshape(m, k)
    return xd @ w.T, x.double() @ w.T


def check_shape(m: int, n: int, k: int, device: str, block: int = 64, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    fp8, scale_inv = quantize_blocks(weight, block)
    emulated, exact = references(x, fp8, scale_inv, block)
    x_d, fp8_d, s_d = x.to(device), fp8.to(device), scale_inv.to(device)
    out = matmul_2d(x_d, fp8_d, s_d, [block, block], torch.float32)
    if device == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            matmul_2d(x_d, fp8_d, s_d, [block, block], torch.bfloat16)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / 10
    else:
        seconds = None
    out = out.double().cpu()
    return {
        "shape": [m, n, k],
        "rel_err_vs_emulated_f64": float((out - emulated).norm() / emulated.norm()),
        "rel_err_vs_unquantized_f64": float((out - exact).norm() / exact.norm()),
        "max_abs_err_vs_emulated": float((out - emulated).abs().max()),
        "tflops": 2 * m * n * k / seconds / 1e12 if seconds else None,
    }


def check_fp8linear(device: str, m: int = 7, n: int = 192, k: int = 128) -> dict:
    """The kernel called by transformers' own FP8Linear.forward, against the emulated reference."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    from .loading import install_builtin_kernel

    import dataclasses

    from transformers.integrations import finegrained_fp8

    install_builtin_kernel()
    calls = []
    kernel = finegrained_fp8._FINEGRAINED_FP8
    counted = dataclasses.replace(kernel, matmul=lambda *a, **kw: calls.append(1) or kernel.matmul(*a, **kw))
    finegrained_fp8._FINEGRAINED_FP8 = counted
    gen = torch.Generator().manual_seed(1)
    fp8, scale_inv = quantize_blocks((torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16), 64)
    layer = FP8Linear(in_features=k, out_features=n, block_size=(64, 64), has_bias=False)
    with torch.no_grad():
        layer.weight.data = fp8.clone()
        layer.weight_scale_inv.data = scale_inv.clone()
    layer = layer.to(device)
    x = torch.randn(1, m, k, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x.to(device)).double().cpu().reshape(m, n)
    emulated, _ = references(x.reshape(m, k), fp8, scale_inv, 64)
    # FP8Linear asks for output in the input's dtype: compare with the reference rounded the same way
    rounded = emulated.to(torch.bfloat16).double()
    return {"module": type(layer).__name__, "weight_dtype": str(layer.weight.dtype), "kernel_calls": len(calls),
            "output_dtype": "bfloat16",
            "rel_err_vs_emulated_f64": float((out - emulated).norm() / emulated.norm()),
            "rel_err_vs_emulated_bf16": float((out - rounded).norm() / rounded.norm())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="*", default=None, help="M,N,K triples")
    parser.add_argument("--real", action="store_true", help="gemma-4-31B projection shapes (GPU)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes
              else REAL_SHAPES if args.real else SMALL_SHAPES)
    results = {"shapes": [check_shape(*s, device=args.device) for s in shapes],
               "fp8linear": check_fp8linear(args.device)}
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{'M,N,K':>20}  {'vs emulated':>12}  {'vs exact act':>12}  {'TFLOP/s':>8}")
        for r in results["shapes"]:
            tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
            print(f"{','.join(map(str, r['shape'])):>20}  {r['rel_err_vs_emulated_f64']:12.2e}  "
                  f"{r['rel_err_vs_unquantized_f64']:12.2e}  {tf:>8}")
        f = results["fp8linear"]
        print(f"transformers {f['module']} ({f['weight_dtype']}), {f['kernel_calls']} kernel call(s): "
              f"{f['rel_err_vs_emulated_f64']:.2e} vs float64, {f['rel_err_vs_emulated_bf16']:.2e} vs its bf16 rounding")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
