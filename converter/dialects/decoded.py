"""An FP8 checkpoint read as the 16-bit checkpoint `dequantize` writes from it, without writing it.

`decoded_view` turns the `SourceIndex` of a checkpoint in a dialect this tool reads (its `reader_for`) into the
index of that checkpoint: the FP8 weights become BF16 (F16, F32) tensors of the same names and shapes, their
scales (and static activation scales) are gone, every other tensor is the source's own, and the config is the one
`dequantize` writes. `DecodingReader` serves the bytes of the BF16 weights, stripe by stripe, from the FP8 codes
and scales: each value `float32(q) * float32(scale)` rounded once to BF16, as `dequantize` computes it. A
conversion plans and quantizes this view as it would a BF16 source; `dequantize` is the conversion that writes
it as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import copy

from ..configs import CONFIG_NAME, DTYPE_SIZES
from ..errors import SourceError
from ..source import SourceIndex, TensorInfo
from ..reader import TensorReader

DECODED_DTYPE = "BF16"  # `dequantize`'s default --dtype, and what a conversion of an FP8 source quantizes from
CONFIG_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
DECODE_ELEMENTS = 2**20  # values decoded per step of a stripe


@dataclass(frozen=True)
class DecodedSource(SourceIndex):
    """The BF16 view of an FP8 checkpoint (see the module). `tensors` and `config` are the view's; `fp8` is the
    checkpoint as stored, `pairs` its FP8 weights with their scales (by name) and `reader` its dialect's reader."""

    fp8: SourceIndex | None = None
    pairs: dict = dataclasses.field(default_factory=dict)
    reader: object = None
    dtype: str = DECODED_DTYPE  # of the decoded weights

    @property
    def dialect(self) -> str:
        """What the stored checkpoint is, in words."""
        return self.reader.describe()

    @property
    def stored(self) -> SourceIndex:
        return self.fp8

    def stored_nbytes(self, name: str) -> int:
        """The bytes a tensor of the view is read from: a decoded weight's FP8 codes and its scales."""
        pair = self.pairs.get(name)
        return pair.weight.nbytes + pair.scale.nbytes if pair is not None else self.tensors[name].nbytes


def decoded_view(source: SourceIndex, dtype: str = DECODED_DTYPE) -> DecodedSource:
    """The 16-bit view of an FP8 `source` (whose config has a `quantization_config`), its weights in `dtype`.

    Raises:
        SourceError: no `quantization_config`, a dialect or config no reader reads, no FP8 weight, a weight
            without its scale, a scale grid that does not fit (the reader's refusals).
    """
    from . import reader_for

    name = source.name or source.root
    reader = reader_for(source.config, f"{name}/{CONFIG_NAME}")
    pairs = reader.pair(source.tensors, lambda info: f"{name}/{info.shard}")
    if not pairs:
        raise SourceError(f"{name}/{CONFIG_NAME}: says {reader.quant_method} but the checkpoint holds no FP8 weights")
    gone = {p.scale.name for p in pairs.values()} | reader.dropped(source.tensors)
    tensors = {}
    for info in source.tensors.values():
        if info.name in gone:
            continue
        if info.name in pairs:
            numel = info.numel
            info = dataclasses.replace(info, dtype=dtype, nbytes=numel * DTYPE_SIZES[dtype])
        tensors[info.name] = info
    fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(SourceIndex)}
    fields.update(tensors=tensors, config=decoded_config(source.config, dtype))
    return DecodedSource(**fields, fp8=source, pairs=pairs, reader=reader, dtype=dtype)


def decoded_config(config: dict, dtype: str = DECODED_DTYPE) -> dict:
    """The config `dequantize` writes: the source's without `quantization_config`, its top-level dtype `dtype`."""
    out = copy.deepcopy(config)
    out.pop("quantization_config", None)
    for key in ("dtype", "torch_dtype"):
        if key in out:
            out[key] = CONFIG_DTYPE_NAMES[dtype]
    return out


def requantized(source: SourceIndex) -> str | None:
    """What the source is when it is an FP8 checkpoint read through its 16-bit view; else None."""
    return source.dialect if isinstance(source, DecodedSource) else None


def read_scales(reader: TensorReader, pair, dialect, source: SourceIndex):
    """A weight's inverse scales as a float32 numpy matrix (experts' grids stacked), checked finite; `dialect` is
    the source's dialect reader (`scales_from_bytes`).

    Raises:
        SourceError: a scale is NaN or infinite, naming the tensor and the block.
    """
    import numpy as np

    info = pair.scale
    scales = dialect.scales_from_bytes(reader.read(info), info.dtype).reshape(-1, info.shape[-1])
    bad = np.argwhere(~np.isfinite(scales))
    if len(bad):
        row, col = (int(i) for i in bad[0])
        *lead, grid_rows, _ = info.shape
        at = f"expert {row // grid_rows}, block ({row % grid_rows}, {col})" if lead else f"block ({row}, {col})"
        raise SourceError(f"{source.name or source.root}/{info.shard}: scale {info.name} is "
                          f"{float(scales[row, col])} at {at}; the checkpoint is damaged")
    return scales


def decode_rows(codes, scales, block: tuple[int, int], first: int, rows_per_matrix: int):
    """BF16 bits of rows `[first, first + n)` of an FP8 weight's matrix view (experts' rows stacked), from any
    row: `float32(q) * float32(scale)` per element, rounded once to BF16 (`decode.dequantize_rows`' product,
    bit for bit, with `dequantize_fast`'s E4M3 values and BF16 rounding in numpy: no torch). Pure.

    Args:
        codes (`np.ndarray`): uint8 E4M3 codes, `(n, cols)`.
        scales (`np.ndarray`): float32 scales of the whole weight, `(matrices * ceil(rows/bm), ceil(cols/bn))`.
        block (`tuple[int, int]`): `(bm, bn)`, the rows and columns one scale covers.
        first (`int`): the first row's index in the matrix view.
        rows_per_matrix (`int`): rows of one matrix (an expert's; the weight's for a 2-D weight).

    Returns:
        `np.ndarray`: uint16 BF16 bits, `(n, cols)`.
    """
    import numpy as np

    from ..dequantize_fast import e4m3_float32, float32_to_bits

    n, cols = codes.shape
    bm, bn = block
    grid_rows = -(-rows_per_matrix // bm)
    rows = np.arange(first, first + n)
    index = (rows // rows_per_matrix) * grid_rows + (rows % rows_per_matrix) // bm
    expanded = np.repeat(scales[index], bn, axis=1)[:, :cols]
    with np.errstate(invalid="ignore", over="ignore"):
        values = e4m3_float32(codes) * expanded
    return float32_to_bits(values, DECODED_DTYPE)


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
        pair = self.source.pairs.get(info.name)
        if pair is None:
            return self._inner.read(info, start, length)
        length = info.nbytes - start if length is None else length
        row_bytes = info.shape[-1] * DTYPE_SIZES[DECODED_DTYPE]
        first, end = start // row_bytes, -(-(start + length) // row_bytes)
        data = self._decode(pair, info, first, end - first).tobytes()
        return bytearray(data[start - first * row_bytes: start - first * row_bytes + length])

    def read_rows(self, info: TensorInfo, first_row: int, end_row: int):
        """Rows `[first_row, end_row)` of a tensor of the view's matrix, as a torch tensor of its dtype."""
        import torch

        pair = self.source.pairs.get(info.name)
        if pair is None:
            return self._inner.read_rows(info, first_row, end_row)
        return torch.from_numpy(self._decode(pair, info, first_row, end_row - first_row)).view(torch.bfloat16)

    def _decode(self, pair, info: TensorInfo, first: int, n: int):
        """BF16 bits (uint16) of `n` rows of a decoded weight from row `first`."""
        import numpy as np

        cols = info.shape[-1]
        codes = np.frombuffer(self._inner.read(pair.weight, first * cols, n * cols), dtype=np.uint8)
        return decode_rows(codes.reshape(n, cols), self.scales(pair), pair.block, first, info.shape[-2])

    def read_stripe(self, info: TensorInfo, start: int, length: int, buffer):
        """Bytes `[start, start + length)` of a tensor of the view, whole rows for a decoded weight, in `buffer`."""
        import numpy as np

        pair = self.source.pairs.get(info.name)
        if pair is None:
            return self._inner.read_stripe(info, start, length, buffer)
        row_bytes = info.shape[-1] * DTYPE_SIZES[DECODED_DTYPE]
        first, rows = start // row_bytes, length // row_bytes
        view = memoryview(buffer)[:length]
        out = np.frombuffer(view, dtype=np.uint8).reshape(rows, row_bytes)
        step = max(1, DECODE_ELEMENTS // info.shape[-1])  # the float32 temporaries of a whole stripe held 400 MB
        for k in range(0, rows, step):
            n = min(step, rows - k)
            out[k:k + n] = self._decode(pair, info, first + k, n).view(np.uint8)
        return view

    def scales(self, pair):
        """A weight's scales as float32 `(matrices * grid rows, grid columns)`, checked finite as `dequantize`
        checks them (kept for the weight's next stripe)."""
        if self._scales is not None and self._scales[0] == pair.weight.name:
            return self._scales[1]
        scales = read_scales(self._inner, pair, self.source.reader, self.source.fp8)
        self._scales = (pair.weight.name, scales)
        return scales
