"""Reading a weight in stripes of whole tile rows and quantizing them: the quantize stage's driver.

`Quantizer` reads the next stripe in a background thread while the current one is quantized, into buffers kept
across stripes, and dispatches to the fused numba kernel of the output dialect's scale rule (its `fused_kernel`)
or to the dialect's own torch formula (`converter.dialects`): the kernel wherever it gives that dialect's bytes
(every dialect, for the source dtypes `quantize_fast.RULE_DTYPES` names), the formula everywhere else.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import quantize_fast
from .configs import DTYPE_SIZES, matrix_shape
from .errors import QuantizeError, UsageError
from .reader import DIRECT_ALIGN, AlignedBuffers, TensorReader

# Source bytes quantized per step. With the numba kernel the working set is this, the next stripe being read and
# half of it in FP8; the torch formula needs about 6x (float32 copies).
STRIPE_BYTES = 32 * 2**20


class Quantizer:
    """Quantizes a 2-D source weight stripe by stripe, reading the next stripe while the current one is quantized.

    `dialect` is the output dialect's writer (its `quantize` formula, `rows_per_scale`, `fused_kernel`). `kind`
    is "numba" (the fused CPU kernel, and the formula for source dtypes the kernel does not compute), "torch" (the
    dialect's formula, on `device`) or "auto" (numba when installed and the device is the CPU). Every kind writes
    the same bytes.
    """

    def __init__(self, dialect, kind: str = "auto", device: str = "cpu"):
        if dialect.unavailable():
            raise UsageError(dialect.unavailable())
        kernel = dialect.fused_kernel
        if kind == "auto":
            kind = "numba" if device == "cpu" and quantize_fast.available() and kernel is not None else "torch"
        if kind == "numba" and device != "cpu":
            raise UsageError(f"--quantizer numba runs on the CPU; --device {device} applies to --quantizer torch "
                             "(or auto)")
        if kind == "numba" and kernel is None:
            raise UsageError(f"--quantizer numba: this torch's formula for {dialect.label} has no fused kernel "
                             "that matches it; use --quantizer torch (or auto)")
        if kind == "numba" and not quantize_fast.available():
            raise UsageError("--quantizer numba: numba is not installed (pip install numba)")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda: torch sees no CUDA device")
        self.dialect, self.kind, self.device, self.kernel = dialect, kind, device, kernel
        self.block = dialect.rows_per_scale  # weight rows per row of scales; stripes start on multiples of it
        self._buffers = AlignedBuffers(least=STRIPE_BYTES)  # 0, 1: source stripes read in turn; 2, 3: FP8 out
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-fp8-read")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def stripe_rows(self, info) -> int:
        """Rows per stripe for a weight: whole tile rows, about STRIPE_BYTES of source."""
        row_bytes = info.shape[-1] * DTYPE_SIZES[info.dtype]
        return max(self.block, STRIPE_BYTES // (row_bytes * self.block) * self.block)

    def stripes(self, info, reader: TensorReader, skip=lambda first: False):
        """Yield `(first row, fp8 bytes, scale_inv, source bytes)` for successive stripes of whole tile rows of one
        weight, leaving out those whose first row `skip` accepts (already written by an earlier run).

        The FP8 bytes live in one of two buffers, used in turn: write them before asking for the stripe after next.
        """
        for _, first, fp8, scale_inv, nbytes in self.stripes_of([(info, skip)], reader):
            yield first, fp8, scale_inv, nbytes

    def stripes_of(self, weights: list, reader: TensorReader):
        """`stripes` over several weights `[(info, skip)]` in turn, as one stream: `(index in weights, first row,
        fp8 bytes, scale_inv, source bytes)`. The next stripe is read while this one is quantized across weight
        boundaries too, so a checkpoint of many small weights (3 MiB per-expert Linears: one stripe each) pays no
        read latency per weight."""
        work = []  # (weight index, info, first row, rows, row bytes, cols)
        for k, (info, skip) in enumerate(weights):
            rows, cols = matrix_shape(info.shape)
            step = self.stripe_rows(info)
            row_bytes = cols * DTYPE_SIZES[info.dtype]
            work += [(k, info, first, min(rows, first + step) - first, row_bytes, cols)
                     for first in range(0, rows, step) if not skip(first)]
        if not work:
            return
        read_bytes = max(n * row_bytes for _, _, _, n, row_bytes, _ in work)
        buffers = [self._buffers.get(i, read_bytes + 2 * DIRECT_ALIGN) for i in (0, 1)]
        outs = [self._buffers.get(i, max(n * cols for *_, n, _, cols in work)) for i in (2, 3)]

        def read(i):
            _, info, first, n, row_bytes, _ = work[i]
            return reader.read_stripe(info, first * row_bytes, n * row_bytes, buffers[i % 2])

        reader.fd_for(work[0][1])  # shards are opened here, not in the reading thread
        pending = self._pool.submit(read, 0)
        try:
            for i, (k, info, first, n, row_bytes, cols) in enumerate(work):
                raw = pending.result()
                if i + 1 < len(work):
                    reader.fd_for(work[i + 1][1])
                    pending = self._pool.submit(read, i + 1)
                out = outs[i % 2][: n * cols].reshape(n, cols)
                fp8, scale_inv = self._quantize(raw, info, n, cols, first, out)
                yield k, first, fp8, scale_inv, n * row_bytes
        finally:  # a lane that stops early: the read ahead must be over before its reader closes the files
            pending.cancel() or pending.exception()

    def _quantize(self, raw: memoryview, info, rows: int, cols: int, first: int, out: np.ndarray):
        kernel = self.kernel
        if self.kind == "numba" and quantize_fast.handles(kernel.rule, info.dtype):
            scales = np.empty((-(-rows // kernel.rows), cols // (kernel.cols or cols)),
                              quantize_fast.scale_dtype(kernel.rule, info.dtype))
            status, row = quantize_fast.quantize_rule_into(kernel.rule, np.frombuffer(raw, np.uint8), info.dtype, out,
                                                           scales, kernel.rows, kernel.cols, kernel.aux)
            if status != quantize_fast.OK:
                what = ("holds NaN or Inf" if status == quantize_fast.NON_FINITE else
                        "has a tile of float32-subnormal values whose scale overflows")
                raise _non_finite(info, what, first + row)
            return out, scales
        import torch

        from .quantize import TORCH_DTYPES, NonFiniteError

        weight = torch.frombuffer(raw, dtype=TORCH_DTYPES[info.dtype]).reshape(rows, cols)
        try:
            fp8, scales = self.dialect.quantize(weight.to(self.device))
        except NonFiniteError as exc:
            raise _non_finite(info, str(exc), first + exc.row) from None
        # scales of any dtype (float32, F8_E8M0, BF16) leave as their bytes
        return fp8.view(torch.uint8).cpu().numpy(), scales.contiguous().view(torch.uint8).cpu().numpy()


def _non_finite(info, what: str, row: int) -> QuantizeError:
    return QuantizeError(f"tensor {info.name} in shard {info.shard} {what} (near row {row}); "
                         "the source must be finite to be quantized")
