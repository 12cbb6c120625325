"""`verify`'s reading of tensor data: NaN/Inf, all-zero tiles, and, with the source, every FP8 weight and scale
re-derived with the dialect's torch formula (independent of the converter's numba kernel) and compared byte for
byte, every copied tensor compared byte for byte, and each FP8 weight's reconstruction error.

A torch call costs microseconds whatever its size, which a checkpoint of tens of thousands of small expert
weights would pay per tensor: small FP8 weights of the same shape are checked together, stacked along their rows
(every dialect's scales cover whole rows of one weight, so stacking changes no byte of any weight's result), and
each one's findings are taken apart again before they are reported, in the output's tensor order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .configs import DTYPE_SIZES, FP8_DTYPE_NAME, matrix_shape
from .reader import TensorReader
from .source import SourceIndex, TensorInfo
from .verify_report import Problem, TensorStats, VerifyReport

CHUNK_BYTES = 16 * 2**20
# FP8 elements checked per torch call: the re-derivation's float32 temporaries are 4x that
FP8_STRIPE_ELEMENTS = 2**18
# FP8 elements of small weights checked together: enough to pay a torch call's fixed cost many times over, few
# enough that the temporaries stay in the allocator's reused memory (larger ones are mapped and faulted in anew)
BATCH_ELEMENTS = 2**18


@dataclass
class _Fp8Weight:
    """One FP8 weight to check, with its scale and, when the source has it, its source tensor."""

    name: str
    info: TensorInfo
    scale: TensorInfo
    src: TensorInfo | None
    position: int  # where its findings go among the output's tensors


@dataclass
class _Findings:
    """What the stripes of one FP8 weight showed, added up."""

    nan_count: int = 0
    zero_groups: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    max_abs: float = 0.0
    first_byte_diff: tuple[int, int, int] | None = None  # (row, column, differing bytes in that stripe)
    first_scale_diff: tuple[int, int] | None = None  # (scale row, scale column)
    unquantizable: str | None = None


@dataclass
class _Ordered:
    """Findings by the position of their tensor in the output, reported in that order at the end."""

    problems: dict[int, list[Problem]] = field(default_factory=dict)
    stats: dict[int, TensorStats] = field(default_factory=dict)

    def add(self, position: int, problem: Problem) -> None:
        self.problems.setdefault(position, []).append(problem)

    def into(self, report: VerifyReport) -> None:
        for position in sorted(self.problems):
            report.problems += self.problems[position]
        report.stats += [self.stats[p] for p in sorted(self.stats)]


def check_data(output: SourceIndex, scale_of: dict[str, str], source: SourceIndex | None,
               fp8: dict[str, TensorInfo], writer, report: VerifyReport, progress) -> None:
    """Read every tensor of `output` (FP8 weights with their scales `scale_of`) and report what it holds."""
    tensors = output.tensors
    scales = set(scale_of.values())
    ordered = _Ordered()
    batches: dict[tuple, list[_Fp8Weight]] = {}  # small FP8 weights of one shape, waiting to be checked together
    with TensorReader(output) as reader, (_source_reader(source) if source else _Null()) as src_reader:
        def check(batch: list[_Fp8Weight]) -> None:
            _check_fp8(batch, reader, src_reader, writer, ordered)
            for weight in batch:
                progress(weight.info.nbytes)

        for position, (name, info) in enumerate(tensors.items()):
            report.tensors_checked += 1
            report.bytes_checked += info.nbytes
            if name in scales:
                progress(info.nbytes)  # checked with its weight
                continue
            if name not in fp8:
                _check_copied(info, reader, source, src_reader, ordered, position)
                progress(info.nbytes)
                continue
            scale = tensors.get(scale_of.get(name, ""))
            if scale is None or scale.shape != writer.scale_shape(info.shape) \
                    or not writer.accepts_scale_dtype(scale.dtype):
                progress(info.nbytes)  # its pairing is reported by the structural checks
                continue
            report.fp8_tensors += 1
            weight = _Fp8Weight(name, info, scale, _source_tensor(name, info, source, ordered, position), position)
            rows, cols = matrix_shape(info.shape)
            if rows % writer.rows_per_scale or rows * cols * 2 > BATCH_ELEMENTS:
                check([weight])
                continue
            key = (tuple(info.shape), scale.dtype, weight.src.dtype if weight.src else None)
            batch = batches.setdefault(key, [])
            batch.append(weight)
            if (len(batch) + 1) * rows * cols > BATCH_ELEMENTS:
                check(batches.pop(key))
        for batch in batches.values():
            check(batch)
    ordered.into(report)


def _source_tensor(name: str, info: TensorInfo, source: SourceIndex | None, ordered: _Ordered,
                   position: int) -> TensorInfo | None:
    """The source tensor an FP8 weight is re-derived from; None without one (or of another shape, reported)."""
    src_info = source.tensors.get(name) if source else None
    if src_info is not None and tuple(src_info.shape) != tuple(info.shape):
        ordered.add(position, Problem(f"shape {list(info.shape)} differs from the source's {list(src_info.shape)}",
                                      tensor=name, shard=info.shard))
        return None
    return src_info


def _source_reader(source: SourceIndex):
    from .dialects.decoded import DecodedSource, DecodingReader

    return DecodingReader(source) if isinstance(source, DecodedSource) else TensorReader(source)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _check_fp8(batch: list[_Fp8Weight], reader, src_reader, writer, ordered: _Ordered) -> None:
    """Check FP8 weights of one shape: one weight in stripes of rows, or several small ones whole, stacked."""
    import torch

    first = batch[0]
    rows, cols = matrix_shape(first.info.shape)
    unit = writer.rows_per_scale  # weight rows per row of scales
    scale_row_bytes = first.scale.shape[-1] * DTYPE_SIZES[first.scale.dtype]
    scale_rows = first.scale.numel // first.scale.shape[-1]
    with_source = first.src is not None  # the same for every weight of a batch (its key)
    stripe = rows if len(batch) > 1 else max(unit, FP8_STRIPE_ELEMENTS // (cols * unit) * unit)
    findings = [_Findings() for _ in batch]
    for start in range(0, rows, stripe):
        end = min(rows, start + stripe)
        s_start, s_end = start // unit, min(scale_rows, -(-end // unit))
        raw = torch.cat([torch.frombuffer(reader.read(w.info, start * cols, (end - start) * cols), dtype=torch.uint8)
                         for w in batch]).reshape(len(batch), end - start, cols)
        scale_bytes = torch.cat([torch.frombuffer(reader.read(w.scale, s_start * scale_row_bytes,
                                                              (s_end - s_start) * scale_row_bytes), dtype=torch.uint8)
                                 for w in batch]).reshape(len(batch), s_end - s_start, scale_row_bytes)
        weights = (torch.cat([src_reader.read_rows(w.src, start, end) for w in batch]) if with_source else None)
        try:
            _measure(findings, raw, scale_bytes, weights, writer, start, s_start, DTYPE_SIZES[first.scale.dtype])
        except ValueError as exc:
            if len(batch) > 1:  # name the weight that cannot be quantized: each on its own
                for weight in batch:
                    _check_fp8([weight], reader, src_reader, writer, ordered)
                return
            findings[0].unquantizable = str(exc)
            break
    for weight, found in zip(batch, findings):
        _report_fp8(weight, found, with_source, ordered)


def _measure(findings: list[_Findings], raw, scale_bytes, weights, writer, start: int, s_start: int,
             scale_itemsize: int) -> None:
    """Add one stripe's figures to each weight's findings: rows `start..` of `k` weights, `raw` `[k, rows, cols]`
    E4M3 bytes, `scale_bytes` `[k, scale rows, scale row bytes]`, `weights` the source rows stacked (or None).

    Raises:
        ValueError: the source rows cannot be quantized (NaN or Inf).
    """
    import torch

    k, rows, cols = raw.shape
    magnitude = raw & 0x7F  # E4M3FN has no Inf; S.1111.111 is NaN, S.0000.000 zero
    for found, count in zip(findings, (magnitude == 0x7F).reshape(k, -1).sum(dim=1).tolist()):
        found.nan_count += count
    for found, count in zip(findings, _zero_groups(magnitude, writer.rows_per_scale, writer.group_columns or cols)):
        found.zero_groups += count
    if weights is None:
        return
    want_fp8, want_scale = writer.quantize(weights)
    differs = want_fp8.view(torch.uint8).reshape(k, rows, cols) != raw
    want_bytes = want_scale.contiguous().view(torch.uint8).reshape(scale_bytes.shape)
    scale_differs = want_bytes != scale_bytes
    for j in (differs.reshape(k, -1).any(dim=1) | scale_differs.reshape(k, -1).any(dim=1)).nonzero()[:, 0].tolist():
        diff, sdiff = differs[j].nonzero(), scale_differs[j].nonzero()
        if len(diff) and findings[j].first_byte_diff is None:
            findings[j].first_byte_diff = (start + int(diff[0, 0]), int(diff[0, 1]), len(diff))
        if len(sdiff) and findings[j].first_scale_diff is None:
            findings[j].first_scale_diff = (s_start + int(sdiff[0, 0]), int(sdiff[0, 1]) // scale_itemsize)
    reference = weights.to(torch.float32)
    scales = scale_bytes.reshape(-1, scale_bytes.shape[-1]).view(want_scale.dtype).reshape(want_scale.shape)
    got = writer.dequantize(raw.reshape(k * rows, cols).view(torch.float8_e4m3fn), scales)
    delta = got.sub_(reference).nan_to_num_(nan=math.inf).reshape(k, -1)
    err = torch.sum(delta * delta, dim=1, dtype=torch.float64).tolist()
    ref = reference.reshape(k, -1)
    ref = torch.sum(ref * ref, dim=1, dtype=torch.float64).tolist()
    worst = delta.abs_().amax(dim=1).tolist() if delta.shape[1] else [0.0] * k
    for found, e, r, m in zip(findings, err, ref, worst):
        found.err_sq += e
        found.ref_sq += r
        found.max_abs = max(found.max_abs, m)


def _zero_groups(magnitude, unit: int, group_cols: int) -> list[int]:
    """All-zero scale groups (tiles, or rows) of each of `k` stripes of E4M3 magnitudes (bytes without their sign
    bit) `[k, rows, cols]`; a partial last group is padded with zeros, which do not change whether it is all zero."""
    import torch

    k, rows, cols = magnitude.shape
    pr, pc = -(-rows // unit) * unit, -(-cols // group_cols) * group_cols
    if (pr, pc) != (rows, cols):
        padded = torch.zeros((k, pr, pc), dtype=torch.uint8)
        padded[:, :rows, :cols] = magnitude
        magnitude = padded
    tiles = magnitude.reshape(k, pr // unit, unit, pc // group_cols, group_cols)
    return (tiles.amax(dim=(2, 4)) == 0).sum(dim=(1, 2)).tolist()


def _report_fp8(weight: _Fp8Weight, found: _Findings, with_source: bool, ordered: _Ordered) -> None:
    name, info, scale, position = weight.name, weight.info, weight.scale, weight.position
    if found.unquantizable is not None:
        ordered.add(position, Problem(f"source tensor cannot be quantized: {found.unquantizable}", tensor=name))
        return
    groups = scale.numel
    if found.nan_count:
        ordered.add(position, Problem(f"{found.nan_count} NaN value(s) in the FP8 weight", tensor=name,
                                      shard=info.shard))
    if found.zero_groups == groups:
        ordered.add(position, Problem("every tile of the FP8 weight is zero", tensor=name, shard=info.shard))
    if found.first_byte_diff:
        r, c, n = found.first_byte_diff
        ordered.add(position, Problem(f"FP8 bytes differ from the re-quantized source: {n}+ byte(s), first at row "
                                      f"{r}, column {c}", tensor=name, shard=info.shard))
    if found.first_scale_diff:
        ordered.add(position, Problem(f"{scale.name.rpartition('.')[2]} differs from the re-quantized source, "
                                      f"first at tile {found.first_scale_diff}", tensor=scale.name,
                                      shard=scale.shard))
    stats = TensorStats(tensor=name, shard=info.shard, shape=tuple(info.shape), tiles=groups,
                        zero_tiles=found.zero_groups)
    if with_source:
        err_sq, ref_sq = found.err_sq, found.ref_sq
        stats.relative_error = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else (0.0 if err_sq == 0 else math.inf)
        stats.max_abs_error = found.max_abs
    ordered.stats[position] = stats


def _check_copied(info, reader, source, src_reader, ordered: _Ordered, position: int) -> None:
    import torch

    from .quantize import TORCH_DTYPES

    src_info = source.tensors.get(info.name) if source else None
    if src_info is not None and (src_info.dtype, src_info.shape) != (info.dtype, info.shape):
        ordered.add(position, Problem(f"{info.dtype}{list(info.shape)} here, {src_info.dtype}{list(src_info.shape)} "
                                      "in the source", tensor=info.name, shard=info.shard))
        src_info = None
    dtype = TORCH_DTYPES.get(info.dtype) if info.dtype != FP8_DTYPE_NAME else None
    itemsize = DTYPE_SIZES[info.dtype]
    chunk = max(itemsize, CHUNK_BYTES // itemsize * itemsize)
    non_finite = 0
    differs_at = None
    for start in range(0, info.nbytes, chunk):
        length = min(chunk, info.nbytes - start)
        data = reader.read(info, start, length)
        if dtype is not None:
            non_finite += int((~torch.isfinite(torch.frombuffer(data, dtype=dtype))).sum())
        if src_info is not None and differs_at is None:
            if src_reader.read(src_info, start, length) != data:
                differs_at = start
    if non_finite:
        ordered.add(position, Problem(f"{non_finite} NaN/Inf value(s)", tensor=info.name, shard=info.shard))
    if differs_at is not None:
        ordered.add(position, Problem(f"bytes differ from the source (from byte {differs_at} of the tensor)",
                                      tensor=info.name, shard=info.shard))
