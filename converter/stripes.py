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
READ_GROUP_BYTES = 4 * 2**20  # small stripes read ahead together, up to this many bytes (`_read_groups`)


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
        groups, group_bytes = _read_groups(work, getattr(reader, "reads_spans", False))
        buffers = [self._buffers.get(i, group_bytes) for i in (0, 1)]
        outs = [self._buffers.get(i, max(n * cols for *_, n, _, cols in work)) for i in (2, 3)]

        def read(g):
            # one read per run of stripes that follow each other in the file; each stripe a view of its run's
            views, offset = [], 0
            for run in groups[g]:
                _, info, first, _, row_bytes, _ = work[run[0]]
                start = info.offset + first * row_bytes
                length = _end(work[run[-1]]) - start
                span = reader.read_stripe(info, first * row_bytes, length, buffers[g % 2][offset:])
                offset += _room(length)
                for i in run:
                    _, member, first, n, row_bytes, _ = work[i]
                    at = member.offset + first * row_bytes - start
                    views.append(span[at:at + n * row_bytes])
            return views

        reader.fd_for(work[0][1])  # shards are opened here, not in the reading thread
        pending = self._pool.submit(read, 0)
        try:
            for g, runs in enumerate(groups):
                views = pending.result()
                if g + 1 < len(groups):
                    reader.fd_for(work[groups[g + 1][0][0]][1])
                    pending = self._pool.submit(read, g + 1)
                for i, raw in zip((i for run in runs for i in run), views):
                    k, info, first, n, row_bytes, cols = work[i]
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


def _room(nbytes: int) -> int:
    """Buffer bytes a read of `nbytes` takes (`TensorReader.read_stripe`: aligned at both ends)."""
    return -(-(nbytes + 2 * DIRECT_ALIGN) // DIRECT_ALIGN) * DIRECT_ALIGN


def _end(item) -> int:
    """Where a stripe of `work` ends in its source file."""
    _, info, first, n, row_bytes, _ = item
    return info.offset + (first + n) * row_bytes


READ_GAP_BYTES = 64 * 2**10  # bytes of other tensors (norms, biases) a run's read goes through, not around


def _read_groups(work: list, spans: bool) -> tuple[list[list[list[int]]], int]:
    """The stripes of `work` in groups handed to the reading thread at once: consecutive stripes of one shard,
    whose reads take up to READ_GROUP_BYTES of buffer together (a larger stripe alone). Within a group, stripes
    that follow each other in the file (at most READ_GAP_BYTES of other bytes between two) form runs, each read
    with one request where the reader `spans` tensors (a decoding reader reads each weight on its own). Handing
    over and reading each small stripe alone cost more than its bytes (a per-expert MoE's tens of thousands of
    weights), and on a cold disk each small read waits for the disk. Returns the groups, as lists of runs of
    indices into `work`, and the buffer bytes the largest group needs."""
    groups: list[list[list[int]]] = []
    size = largest = start = end = 0
    for i, item in enumerate(work):
        _, info, first, _, row_bytes, _ = item
        at = info.offset + first * row_bytes
        same_shard = bool(groups) and work[groups[-1][0][0]][1].shard == info.shard
        if spans and same_shard and end <= at <= end + READ_GAP_BYTES:
            grown = size - _room(end - start) + _room(_end(item) - start)
            if grown <= READ_GROUP_BYTES:
                groups[-1][-1].append(i)
                size, end = grown, _end(item)
                largest = max(largest, size)
                continue
        room = _room(_end(item) - at)
        if same_shard and size + room <= READ_GROUP_BYTES:
            groups[-1].append([i])
            size += room
        else:
            groups.append([[i]])
            size = room
        start, end = at, _end(item)
        largest = max(largest, size)
    return groups, largest


def _non_finite(info, what: str, row: int) -> QuantizeError:
    return QuantizeError(f"tensor {info.name} in shard {info.shard} {what} (near row {row}); "
                         "the source must be finite to be quantized")
