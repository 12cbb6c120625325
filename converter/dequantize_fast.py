"""The dequantization of `dequantize.dequantize_rows` as table lookups, compiled with numba.

An output value depends only on an E4M3 code (256 of them) and its block's inverse scale. So, per block of a
stripe, torch computes the formula itself on all 256 codes (`table_of`), and the kernel only looks each code up
in its block's table, rows in parallel threads with the GIL released. The bytes are torch's by construction, NaN
and rounding included; building the tables costs 256 products per block (6% of a 64x64 block's 4096). Without
numba, `available()` is False and callers use the torch formula.
"""

from __future__ import annotations

import numpy as np

from .quantize_fast import available, numba

_kernels: dict = {}  # output element size -> compiled kernel


def table_of(scale_inv, dtype):
    """Per block of `scale_inv` (float32 `(sr, sc)`), the dequantized value of every E4M3 code in `dtype`:
    `(sr, sc, 256)`, by the formula of `dequantize.dequantize_rows`."""
    import torch

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    return (codes * scale_inv[:, :, None]).to(dtype)


def _make_kernel():
    def kernel(codes, tables, bm, bn, out):  # pragma: no cover - compiled
        rows, cols = codes.shape
        for r in numba.prange(rows):
            row_tables = tables[r // bm]
            for t in range(row_tables.shape[0]):
                table = row_tables[t]
                for c in range(t * bn, min(t * bn + bn, cols)):
                    out[r, c] = table[codes[r, c]]

    return kernel


def _kernel(itemsize: int):
    if itemsize not in _kernels:
        from .quantize_fast import _compile

        kernel = _make_kernel()
        # one name per variant gives each its own on-disk cache index
        kernel.__qualname__ = kernel.__name__ = f"dequantize_lookup_{itemsize * 8}"
        try:
            _kernels[itemsize] = _compile(kernel, cache=True)
        except RuntimeError:  # no writable cache folder: compiled for this process only
            _kernels[itemsize] = _compile(kernel, cache=False)
    return _kernels[itemsize]


def dequantize_into(codes: np.ndarray, scale_inv, block: tuple[int, int], dtype, out: np.ndarray) -> None:
    """Dequantize a stripe of E4M3 codes into `out`, the bytes of `dequantize_rows`.

    Args:
        codes (`np.ndarray`): uint8 `(rows, cols)`, the stripe's first row the first row of a block.
        scale_inv (`torch.Tensor`): float32 `(ceil(rows/bm), ceil(cols/bn))`.
        block (`tuple[int, int]`): `(bm, bn)`.
        dtype (`torch.dtype`): bfloat16, float16 or float32.
        out (`np.ndarray`): unsigned integers of `dtype`'s size, `(rows, cols)`, C-contiguous; receives the bits.
    """
    import torch

    bits = {2: torch.uint16, 4: torch.uint32}[out.itemsize]
    tables = table_of(scale_inv, dtype).view(bits).numpy()
    _kernel(out.itemsize)(codes, tables, block[0], block[1], out)


__all__ = ["available", "dequantize_into", "table_of"]
