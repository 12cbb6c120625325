"""An FP8 checkpoint read as the BF16 checkpoint `dequantize` would write from it, without writing it.

`decoded_view` turns the `SourceIndex` of a checkpoint in a dialect this tool reads (its `reader_for`) into the
index of that BF16 checkpoint: the FP8 weights become BF16 tensors of the same names and shapes, their scales
(and static activation scales) are gone, every other tensor is the source's own, and the config is the one
`dequantize` writes. `DecodingReader` serves the bytes of those BF16 weights, stripe by stripe, from the FP8
codes and scales: each value `float32(q) * float32(scale)` rounded once to BF16, as `dequantize` computes it.
The conversion then plans and quantizes this view as it would a BF16 source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..configs import CONFIG_NAME, DTYPE_SIZES
from ..errors import SourceError
from ..source import SourceIndex, TensorInfo, TensorReader

DECODED_DTYPE = "BF16"  # `dequantize`'s default --dtype


@dataclass(frozen=True)
class DecodedSource(SourceIndex):
    """The BF16 view of an FP8 checkpoint (see the module). `tensors` and `config` are the view's; `fp8` is the
    checkpoint as stored, `pairs` its FP8 weights with their scales (by name) and `reader` its dialect's reader."""

    fp8: SourceIndex | None = None
    pairs: dict = dataclasses.field(default_factory=dict)
    reader: object = None

    @property
    def dialect(self) -> str:
        """What the stored checkpoint is, in words."""
        return self.reader.describe()


def decoded_view(source: SourceIndex) -> DecodedSource:
    """The BF16 view of an FP8 `source` (whose config has a `quantization_config`).

    Raises:
        SourceError: a dialect or config no reader reads, a weight without its scale, a scale grid that does not
            fit (the reader's refusals, as `dequantize` makes them).
    """
    from . import reader_for

    name = source.name or source.root
    reader = reader_for(source.config, f"{name}/{CONFIG_NAME}")
    pairs = reader.pair(source.tensors, lambda info: f"{name}/{info.shard}")
    gone = {p.scale.name for p in pairs.values()} | reader.dropped(source.tensors)
    tensors = {}
    for info in source.tensors.values():
        if info.name in gone:
            continue
        if info.name in pairs:
            numel = info.numel
            info = dataclasses.replace(info, dtype=DECODED_DTYPE, nbytes=numel * DTYPE_SIZES[DECODED_DTYPE])
        tensors[info.name] = info
    fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(SourceIndex)}
    fields.update(tensors=tensors, config=decoded_config(source.config))
    return DecodedSource(**fields, fp8=source, pairs=pairs, reader=reader)


def decoded_config(config: dict) -> dict:
    """The config `dequantize` writes: without `quantization_config`, its top-level dtype BF16."""
    from ..dequantize import output_config

    return output_config(config, DECODED_DTYPE)


def decode_rows(codes, scales, block: tuple[int, int], first: int, rows_per_matrix: int):
    """BF16 values of rows `[first, first + n)` of an FP8 weight's matrix view (experts' rows stacked), from any
    row: `float32(q) * float32(scale)` per element, rounded once to BF16 (`dequantize.dequantize_rows`' product).
    Pure.

    Args:
        codes (`torch.Tensor`): uint8 E4M3 codes, `(n, cols)`.
        scales (`torch.Tensor`): float32 scales of the whole weight, `(matrices * ceil(rows/bm), ceil(cols/bn))`.
        block (`tuple[int, int]`): `(bm, bn)`, the rows and columns one scale covers.
        first (`int`): the first row's index in the matrix view.
        rows_per_matrix (`int`): rows of one matrix (an expert's; the weight's for a 2-D weight).
    """
    import torch

    n, cols = codes.shape
    bm, bn = block
    grid_rows = -(-rows_per_matrix // bm)
    rows = torch.arange(first, first + n)
    index = (rows // rows_per_matrix) * grid_rows + (rows % rows_per_matrix) // bm
    expanded = scales[index].repeat_interleave(bn, dim=1)[:, :cols]
    return (codes.view(torch.float8_e4m3fn).to(torch.float32) * expanded).to(torch.bfloat16)


class DecodingReader:
    """A `TensorReader` of a `DecodedSource`: the view's BF16 weights decoded from the FP8 checkpoint
    (`read_stripe`, whole rows), every other tensor read as stored."""

    def __init__(self, source: DecodedSource):
        self.source = source
        self._inner = TensorReader(source.fp8)
        self._scales: tuple[str, object] | None = None  # (weight, its float32 scales), the last weight read

    def __enter__(self) -> DecodingReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._inner.close()

    def _stored(self, info: TensorInfo) -> TensorInfo:
        pair = self.source.pairs.get(info.name)
        return pair.weight if pair is not None and info.dtype == DECODED_DTYPE else info

    def fd_for(self, info: TensorInfo) -> int:
        return self._inner.fd_for(self._stored(info))

    def read(self, info: TensorInfo, start: int = 0, length: int | None = None):
        """Bytes `[start, start + length)` of a tensor of the view (a decoded weight's from the rows that hold
        them)."""
        import torch

        pair = self.source.pairs.get(info.name)
        if pair is None:
            return self._inner.read(info, start, length)
        length = info.nbytes - start if length is None else length
        row_bytes = info.shape[-1] * DTYPE_SIZES[DECODED_DTYPE]
        first, end = start // row_bytes, -(-(start + length) // row_bytes)
        data = self._decode(pair, info, first, end - first).view(torch.uint8).numpy().tobytes()
        return bytearray(data[start - first * row_bytes: start - first * row_bytes + length])

    def read_rows(self, info: TensorInfo, first_row: int, end_row: int):
        """Rows `[first_row, end_row)` of a tensor of the view's matrix, as a torch tensor of its dtype."""
        pair = self.source.pairs.get(info.name)
        if pair is None:
            return self._inner.read_rows(info, first_row, end_row)
        return self._decode(pair, info, first_row, end_row - first_row)

    def _decode(self, pair, info: TensorInfo, first: int, n: int):
        import numpy as np
        import torch

        cols = info.shape[-1]
        codes = np.frombuffer(self._inner.read(pair.weight, first * cols, n * cols), dtype=np.uint8)
        return decode_rows(torch.from_numpy(codes.reshape(n, cols)), self.scales(pair), pair.block, first,
                           info.shape[-2])

    def read_stripe(self, info: TensorInfo, start: int, length: int, buffer):
        """Bytes `[start, start + length)` of a tensor of the view, whole rows for a decoded weight, in `buffer`."""
        import numpy as np
        import torch

        pair = self.source.pairs.get(info.name)
        if pair is None:
            return self._inner.read_stripe(info, start, length, buffer)
        row_bytes = info.shape[-1] * DTYPE_SIZES[DECODED_DTYPE]
        values = self._decode(pair, info, start // row_bytes, length // row_bytes)
        view = memoryview(buffer)[:length]
        np.frombuffer(view, dtype=np.uint8)[:] = values.view(torch.uint8).numpy().reshape(-1)
        return view

    def scales(self, pair):
        """A weight's scales as float32 `(matrices * grid rows, grid columns)`, checked finite (kept for the
        weight's next stripe)."""
        import torch

        if self._scales is not None and self._scales[0] == pair.weight.name:
            return self._scales[1]
        info = pair.scale
        width = info.shape[-1] if info.shape else 1
        values = self.source.reader.scales_from_bytes(self._inner.read(info), info.dtype)
        scales = torch.from_numpy(values).view(-1, width)
        bad = ~torch.isfinite(scales)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise SourceError(f"{self.source.fp8.name or self.source.fp8.root}/{info.shard}: scale {info.name} is "
                              f"{scales[row, col].item()} at row {row}, column {col} of its grid; the checkpoint is "
                              "damaged")
        self._scales = (pair.weight.name, scales)
        return scales
