"""The main lanes of an FP8 source (`dialects.decoded`): its FP8 weights decoded stripe by stripe, then either
written in 16 bits (`DecodeLane`: what `dequantize` writes, and the weights a conversion keeps unquantized) or
quantized again into the target dialect (`TranscodeLane`). `main_lane` picks the lane for a source.

A decoded weight is exactly what transformers' `Fp8Dequantize` gives on the CPU when it loads the checkpoint:

    w = RN_dtype(RN_f32(float32(q) * float32(scale_inv)))

per element, with `scale_inv` the inverse scale of the element's block.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .configs import DTYPE_SIZES
from .dialects.decoded import DecodedSource, DecodingReader, read_scales
from .lanes import INLINE_WRITE_BYTES, MainLane, Progress, QuantizeLane, Stop
from .plan import DECODE, QUANTIZE, TensorPlan
from .source import SourceIndex
from .reader import DIRECT_ALIGN, AlignedBuffers, TensorReader
from .stripes import Quantizer
from .write import ShardWriter

_TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

# FP8 bytes dequantized per step; the output is 2x this in BF16 (4x in F32), and the torch formula's float32
# product another 4x.
STRIPE_BYTES = 4 * 2**20


def main_lane(source: SourceIndex, quantizer: Quantizer | None) -> MainLane:
    """The main lane for this source: `QuantizeLane`; with FP8 weights decoded on the way, and those kept
    unquantized (every one, for `dequantize`) written in 16 bits, when the source is FP8."""
    if isinstance(source, DecodedSource):
        return TranscodeLane(source, quantizer) if quantizer is not None else DecodeLane(source)
    return QuantizeLane(source, quantizer)


class _DecodingQuantizeLane(QuantizeLane):
    def open_reader(self):
        return DecodingReader(self.source)

    def reads(self, tensor) -> tuple[str, ...]:
        pair = self.source.pairs.get(tensor.source)
        return (pair.weight.shard, pair.scale.shard) if pair is not None else super().reads(tensor)



def dequantize_rows(fp8, scale_inv, block: tuple[int, int], dtype):
    """Dequantize whole rows of an FP8 matrix, as transformers' `Fp8Dequantize` does: float32 product, then one
    rounding to `dtype`. Pure.

    Args:
        fp8 (`torch.Tensor`): `float8_e4m3fn`, `(rows, cols)`, its first row the first row of a block.
        scale_inv (`torch.Tensor`): float32 `(ceil(rows/bm), ceil(cols/bn))`, the scales of those rows.
        block (`tuple[int, int]`): `(bm, bn)`.
        dtype (`torch.dtype`): output dtype.
    """
    import torch

    rows, cols = fp8.shape
    bm, bn = block
    q = fp8.to(torch.float32)
    if rows % bm == 0 and cols % bn == 0:
        # the product of each element with its block's scale, as transformers' 5-D broadcast computes it
        tiles = q.view(rows // bm, bm, cols // bn, bn)
        return (tiles * scale_inv[:, None, :, None]).to(dtype).view(rows, cols)
    # a last block cut short (DeepSeek-V3's 576-row projections in 128-row blocks): the same product per element
    expanded = scale_inv.repeat_interleave(bm, dim=0)[:rows].repeat_interleave(bn, dim=1)[:, :cols]
    return (q * expanded).to(dtype)


def stripes(shape: tuple[int, ...], block: tuple[int, int], max_rows: int) -> list[tuple[int, int, int]]:
    """The stripes a weight is dequantized in: `(first row, rows, first scale row)` of its matrix view (experts'
    rows stacked), each of whole blocks and at most `max_rows` rows (at least one block). A stripe never spans
    two experts whose rows do not divide by the block."""
    *lead, rows, _ = shape
    bm = block[0]
    experts = 1
    for d in lead:
        experts *= d
    step = max(bm, max_rows // bm * bm)
    if rows % bm == 0:  # no block spans two experts: one matrix
        total = experts * rows
        return [(first, min(step, total - first), first // bm) for first in range(0, total, step)]
    scale_rows = -(-rows // bm)
    return [(e * rows + first, min(step, rows - first), e * scale_rows + first // bm)
            for e in range(experts) for first in range(0, rows, step)]


def stripe_rows(info) -> int:
    """Rows per stripe: about STRIPE_BYTES of FP8."""
    return max(1, STRIPE_BYTES // max(1, info.shape[-1]))


class DecodeLane(MainLane):
    """Writes the FP8 weights of a decoded source (`dialects.decoded`) in 16 bits: each read, dequantized and
    written stripe by stripe; its scales are read whole and dropped."""

    def __init__(self, source: DecodedSource):
        self.source = source

    def items(self, writer: ShardWriter, tensors: list[TensorPlan]) -> list[tuple]:
        return [(writer, t) for t in tensors if t.action == DECODE]

    def reads(self, tensor: TensorPlan) -> tuple[str, ...]:
        pair = self.source.pairs[tensor.name]
        return pair.weight.shard, pair.scale.shard

    def keep(self, done: dict, items: list[tuple]) -> dict:
        """Whole stripes."""
        usable = {}
        for writer, t in items:
            pair = self.source.pairs[t.name]
            for first, _, _ in stripes(pair.weight.shape, pair.block, stripe_rows(pair.weight)):
                key = (writer.shard.name, t.name, _stripe_start(t, first))
                if key in done:
                    usable[key] = done[key]
        return usable

    def run(self, items: list[tuple], stop: Stop, advance: Progress, done: dict, finished: Callable) -> int:
        """Read, dequantize and write every FP8 weight stripe by stripe: the next stripe is read and the previous
        one written while this one is dequantized (one read and one write in flight, each buffer used in turn, so
        none is overwritten early)."""
        source = self.source
        kept = 0
        engine = _Dequantizer(source.dtype)
        with TensorReader(source.fp8) as reader, ThreadPoolExecutor(1, thread_name_prefix="convert-fp8-write") as io, \
                ThreadPoolExecutor(1, thread_name_prefix="convert-fp8-read") as ahead:
            for writer, t in items:
                pair = source.pairs[t.name]
                info, cols = pair.weight, pair.weight.shape[-1]
                shard = writer.shard.name
                todo = []
                for first, rows, scale_first in stripes(info.shape, pair.block, stripe_rows(info)):
                    if (shard, t.name, _stripe_start(t, first)) in done:
                        kept += rows * cols
                        advance(rows * cols)
                    else:
                        todo.append((first, rows, scale_first))
                # a weight of one small stripe is read and written on this thread: handing it to another
                # costs more than the work (a per-expert MoE's tens of thousands of small weights)
                inline = len(todo) == 1 and todo[0][1] * cols < INLINE_WRITE_BYTES
                if todo:
                    scale_inv = read_scales(reader, pair, source.reader, source.fp8)
                    reader.fd_for(info)  # open the weight's shard here, not in the reading thread
                    if not inline:
                        reading = ahead.submit(engine.read, reader, info, todo[0][0], todo[0][1], 0)
                writing = None
                for k, (first, rows, scale_first) in enumerate(todo):
                    codes = engine.read(reader, info, first, rows, 0) if inline else reading.result()
                    if stop.is_set():
                        return kept
                    if k + 1 < len(todo):
                        reading = ahead.submit(engine.read, reader, info, todo[k + 1][0], todo[k + 1][1],
                                               (k + 1) % 2)
                    scale_rows = scale_inv[scale_first: scale_first + -(-rows // pair.block[0])]
                    out = engine.dequantize(codes, scale_rows, pair.block, slot=k % 2)
                    if writing is not None:
                        writing.result()
                    if inline:
                        writer.write_at(t.name, _stripe_start(t, first), out)
                    else:
                        writing = io.submit(writer.write_at, t.name, _stripe_start(t, first), out)
                    advance(rows * cols)
                if writing is not None:
                    writing.result()
                advance(pair.scale.nbytes)
                finished(t)
        return kept


def _stripe_start(tensor: TensorPlan, first_row: int) -> int:
    return first_row * tensor.shape[-1] * DTYPE_SIZES[tensor.dtype]


class _Dequantizer:
    """Reads stripes of E4M3 codes and dequantizes them, each into two buffers kept across stripes and used in
    turn: numba table lookups where numba is installed (no torch then), the torch formula otherwise (same
    bytes)."""

    def __init__(self, dtype: str):
        import numpy as np

        from . import dequantize_fast

        self.fast = dequantize_fast if dequantize_fast.available() else None
        self.dtype = dtype
        self.bits = {2: np.uint16, 4: np.uint32}[DTYPE_SIZES[dtype]]
        self._buffers = AlignedBuffers()  # 0, 1: FP8 codes read in turn; 2, 3: the output bits (O_DIRECT-ready)

    def read(self, reader: TensorReader, info, first: int, rows: int, slot: int):
        """Rows `[first, first + rows)` of an FP8 weight's matrix view, read into codes buffer `slot` (straight
        from the disk where the page cache does not hold them)."""
        import numpy as np

        cols = info.shape[-1]
        view = reader.read_stripe(info, first * cols, rows * cols,
                                  self._buffers.get(slot, rows * cols + 2 * DIRECT_ALIGN))
        return np.frombuffer(view, np.uint8).reshape(rows, cols)

    def dequantize(self, codes, scale_inv, block: tuple[int, int], slot: int):
        """The stripe's output bits, in output buffer `slot` (numba) or a new array (torch)."""
        import numpy as np

        rows, cols = codes.shape
        if self.fast is None:
            import torch

            fp8 = torch.from_numpy(codes).view(torch.float8_e4m3fn)
            dtype = getattr(torch, _TORCH_DTYPE_NAMES[self.dtype])
            return dequantize_rows(fp8, torch.from_numpy(scale_inv), block, dtype).view(torch.uint8).numpy()
        size = np.dtype(self.bits).itemsize
        out = self._buffers.get(2 + slot, rows * cols * size).view(self.bits).reshape(rows, cols)
        self.fast.dequantize_into(codes, scale_inv, block, self.dtype, out)
        return out


class TranscodeLane(MainLane):
    """Quantizes the weights the target quantizes (decoded on the way) and dequantizes those it keeps."""

    def __init__(self, source: DecodedSource, quantizer):
        self.quantize = _DecodingQuantizeLane(source, quantizer)
        self.decode = DecodeLane(source)

    def items(self, writer, tensors) -> list[tuple]:
        return self.quantize.items(writer, tensors) + self.decode.items(writer, tensors)

    def reads(self, tensor) -> tuple[str, ...]:
        return (self.quantize if tensor.action == QUANTIZE else self.decode).reads(tensor)

    def _split(self, items):
        return [i for i in items if i[1].action == QUANTIZE], [i for i in items if i[1].action != QUANTIZE]

    def keep(self, done: dict, items: list[tuple]) -> dict:
        quantized, decoded = self._split(items)
        return {**self.quantize.keep(done, quantized), **self.decode.keep(done, decoded)}

    def run(self, items: list[tuple], stop, *args) -> int:
        quantized, decoded = self._split(items)
        kept = self.quantize.run(quantized, stop, *args)
        if stop.is_set():
            return kept
        return kept + self.decode.run(decoded, stop, *args)
