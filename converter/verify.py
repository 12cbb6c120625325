"""Verification of a converted checkpoint, tensor by tensor, in bounded memory.

Without the source: structure (config, index, headers, scale pairs, the FP8 set against the exclusions and
against transformers' own module set), finite values in every tensor, zero tiles. With the source, in addition:
every FP8 weight and scale re-derived from its source tensor and compared byte for byte, every copied tensor
compared byte for byte, and the reconstruction error of each FP8 weight.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import numpy as np

from . import arch
from .configs import CONFIG_NAME, DTYPE_SIZES, FP8_DTYPE_NAME, INDEX_NAME
from .dialects import writer_from_config
from .dialects.transformers_fp8 import decode_scale_bytes
from .dialects.transformers_fp8_reader import renamed_scale
from .errors import ConvertError
from .plan import classify, experts_module, module_of
from .source import SINGLE_FILE_NAME, ShardHeader, SourceIndex, TensorInfo, open_source, read_header
from .reader import TensorReader, adjacent_runs
from .verify_data import check_data
from .verify_report import REPORT_NAME, Problem, TensorStats, VerifyReport, describe_report  # noqa: F401 - re-exported


class _Output:
    """The output folder as read for verification: config, index and every readable shard header."""

    def __init__(self, folder: Path, report: VerifyReport, absent: dict[str, ShardHeader] | None = None,
                 known: dict[str, ShardHeader] | None = None):
        self.folder = folder
        self.absent = absent or {}  # shard -> header, for shards not on disk (uploaded and removed)
        self.config: dict | None = None
        self.weight_map: dict[str, str] = {}
        self.headers: dict[str, ShardHeader] = {}
        self.total_size: int | None = None
        self.scale_of: dict[str, str] = {}  # FP8 weight -> its scale tensor, once paired
        self.scales: set[str] = set()  # the names of those scale tensors
        problems = report.problems
        try:
            self.config = json.loads((folder / CONFIG_NAME).read_text())
        except (OSError, ValueError) as exc:
            problems.append(Problem(f"{CONFIG_NAME} cannot be read: {exc}"))
        # a single model.safetensors needs no index (as save_pretrained writes it): its header is the map
        single_file = not (folder / INDEX_NAME).exists() and (folder / SINGLE_FILE_NAME).is_file()
        if not single_file:
            try:
                index = json.loads((folder / INDEX_NAME).read_text())
                self.weight_map = dict(index["weight_map"])
                self.total_size = index.get("metadata", {}).get("total_size")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                problems.append(Problem(f"{INDEX_NAME} cannot be read: {exc}"))
        for shard in [SINGLE_FILE_NAME] if single_file else sorted(set(self.weight_map.values())):
            if shard in self.absent or shard in (known or {}):
                self.headers[shard] = self.absent.get(shard) or known[shard]
                continue
            try:
                self.headers[shard] = read_header(folder / shard)
            except ConvertError as exc:
                problems.append(Problem(str(exc).replace(f"{folder / shard}: ", ""), shard=shard))
        if single_file and self.headers:
            tensors = self.headers[SINGLE_FILE_NAME].tensors
            self.weight_map = dict.fromkeys(tensors, SINGLE_FILE_NAME)
            self.total_size = sum(t.nbytes for t in tensors.values())

    @functools.cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        return {n: t for h in self.headers.values() for n, t in h.tensors.items()}

    def as_source(self) -> SourceIndex:
        """A `SourceIndex` over the readable shards, so the source reader serves the output too."""
        tensors = {n: t for n, t in self.tensors.items() if t.shard not in self.absent}
        return SourceIndex(root=self.folder, config=self.config or {}, tensors=tensors,
                           shards=tuple(s for s in self.headers if s not in self.absent), files_to_copy=())


def verify(dst: Path, src: Path | None = None, progress: Callable[[int], None] | None = None,
           arch_check: bool = True, data: bool = True, absent: dict[str, ShardHeader] | None = None,
           headers: dict[str, ShardHeader] | None = None) -> VerifyReport:
    """Check a converted checkpoint; with `src`, against its source too.

    Args:
        dst (`Path`): the converted checkpoint folder.
        src (`Path`, *optional*): the source it was converted from.
        progress (`Callable[[int], None]`, *optional*): called with output bytes checked.
        arch_check (`bool`, defaults to `True`): compare the FP8 set with transformers' own (when installed).
        data (`bool`, defaults to `True`): read tensor data; `False` checks structure and scales only.
        absent (`dict`, *optional*): headers of shards that are not on disk (the converter's self-check of an
            output whose shards were uploaded and removed); their data and scales are not read.
        headers (`dict`, *optional*): headers already known to be those on disk (the converter's self-check,
            after comparing each written header with its plan's byte for byte), not read again.

    Returns:
        `VerifyReport`; `report.ok` only when every check held.
    """
    dst = Path(dst)
    report = VerifyReport(dst=str(dst), src=str(src) if src else None)
    if not dst.is_dir():
        report.problems.append(Problem(f"{dst}: output folder not found"))
        return report
    out = _Output(dst, report, absent, headers)
    progress = progress or (lambda n: None)
    writer = _check_config(out, report)  # the output's dialect, from its quantization_config
    _check_index(out, report)
    fp8 = _check_pairs(out, report, writer)
    _check_fp8_set(out, report, fp8, arch_check, writer)
    if writer is None:
        return report
    source = None
    if src is not None:
        try:
            source = open_source(Path(src), allow_external_links=True)  # only its tensors are read
            if "quantization_config" in source.config:  # an FP8 source: as the conversion read it
                from .dialects.decoded import decoded_view

                source = decoded_view(source)
        except ConvertError as exc:
            report.problems.append(Problem(f"source: {exc}"))
        if source is not None:
            _check_against_source_structure(out, source, report, writer)
    _check_scales(out, fp8, report, writer)
    if data:
        check_data(out.as_source(), out.scale_of, source, fp8, writer, report, progress)
    return report


SCALE_CHECK_BYTES = 2**20  # scale bytes decoded at a time


def _check_scales(out: _Output, fp8: dict[str, TensorInfo], report: VerifyReport, writer) -> None:
    """Every scale finite and positive. Scales that lie one after another in a shard (an MoE's tens of thousands)
    are read and checked together, up to SCALE_CHECK_BYTES at a time; only a group holding a bad value is looked
    at scale by scale, for the report."""
    tensors = out.tensors
    scales = [info for info in (tensors.get(out.scale_of.get(name, "")) for name in fp8)
              if info is not None and writer.accepts_scale_dtype(info.dtype) and info.shard not in out.absent]
    with TensorReader(out.as_source()) as reader:
        for run in _adjacent(scales):
            if len(run) > 1:
                data = reader.read(run[0], 0, run[-1].offset + run[-1].nbytes - run[0].offset)
                values = decode_scale_bytes(data, run[0].dtype)
                if bool(((values > 0) & (values < np.inf)).all()):
                    continue
            for info in run:
                _check_scale(reader, info, report)


def _adjacent(scales: list[TensorInfo]) -> list[list[TensorInfo]]:
    """`scales` in runs of consecutive ones of one dtype that follow each other in one shard's file, each run up
    to SCALE_CHECK_BYTES."""
    return adjacent_runs(scales, lambda info: (info.shard, info.offset, info.offset + info.nbytes), 0,
                         SCALE_CHECK_BYTES, lambda last, info: last.dtype == info.dtype)


def _check_scale(reader: TensorReader, info: TensorInfo, report: VerifyReport) -> None:
    """One scale tensor, read whole and decoded a few rows at a time (MX scales, a thirty-second of their weight,
    take 4x as much in float32)."""
    # expert scales are [experts, rows, cols]: look at them as the 2-D grid of tiles they cut
    data, cols = reader.read(info), info.shape[-1]
    row_bytes = max(1, cols * DTYPE_SIZES[info.dtype])
    step = max(1, SCALE_CHECK_BYTES // row_bytes) * row_bytes
    count, first = 0, None
    for start in range(0, len(data), step):
        scale = decode_scale_bytes(data[start:start + step], info.dtype).reshape(-1, cols)
        bad = ~np.isfinite(scale) | (scale <= 0)
        if bad.any():
            count += int(bad.sum())
            if first is None:
                r, c = (int(i) for i in np.argwhere(bad)[0])
                first = (start // row_bytes + r, c, scale[r, c])
    if first is not None:
        r, c, value = first
        report.problems.append(Problem(f"{count} scale(s) not finite and positive, first at tile "
                                       f"({r}, {c}): {value}", tensor=info.name, shard=info.shard))


def _check_config(out: _Output, report: VerifyReport):
    """The writer of the output's dialect (`converter.dialects`), or None when the config names none."""
    if out.config is None:
        return None
    qc = out.config.get("quantization_config")
    if not isinstance(qc, dict):
        report.problems.append(Problem(f"{CONFIG_NAME} has no quantization_config: loaders would read FP8 bytes as BF16"))
        return None
    writer, problems = writer_from_config(qc)
    report.problems += [Problem(p) for p in problems]
    if writer is not None:
        report.block_size = writer.block_size if writer.rows_per_scale > 1 else None
        report.notes.append(f"dialect: {writer.label}")
    return writer


def _check_index(out: _Output, report: VerifyReport) -> None:
    total = 0
    for shard, header in out.headers.items():
        for name, info in header.tensors.items():
            total += info.nbytes
            if out.weight_map.get(name) != shard:
                report.problems.append(Problem(f"in the shard but the index maps it to {out.weight_map.get(name)}",
                                               tensor=name, shard=shard))
    for name, shard in out.weight_map.items():
        header = out.headers.get(shard)
        if header is not None and name not in header.tensors:
            report.problems.append(Problem("named in the index but not in its shard", tensor=name, shard=shard))
    if out.headers and len(out.headers) == len(set(out.weight_map.values())) and out.total_size != total:
        report.problems.append(Problem(f"index total_size is {out.total_size}, the shards hold {total} bytes of tensors"))


def _check_pairs(out: _Output, report: VerifyReport, writer) -> dict[str, TensorInfo]:
    """Every FP8 weight has a scale of the dialect's dtype and shape and every scale has its weight; returns the
    FP8 weights by name, and records each one's scale in `out.scale_of`."""
    tensors = out.tensors
    fp8 = {n: t for n, t in tensors.items() if t.dtype == FP8_DTYPE_NAME}
    suffix = writer.scale_name("") if writer is not None else "_scale_inv"
    for name, info in fp8.items():
        scale = tensors.get(name + suffix)
        fused = len(info.shape) == 3 and (writer is None or writer.experts)
        renamed = None
        if scale is None and fused and writer is not None:  # saved under the name it loads as (granitemoe)
            scale = renamed = renamed_scale(info, tensors, writer.scale_shape(info.shape))
        if scale is not None:
            out.scale_of[name] = scale.name
        is_linear = name.endswith(".weight") and len(info.shape) == 2
        is_experts = fused and (module_of(name).rpartition(".")[2] == "experts" or renamed is not None)
        if not (is_linear or is_experts):
            report.problems.append(Problem(f"FP8 tensor of shape {list(info.shape)} is neither a Linear weight "
                                           "nor an expert tensor", tensor=name, shard=info.shard))
        elif scale is None:
            report.problems.append(Problem(f"FP8 weight without its {name.rpartition('.')[2]}{suffix} tensor",
                                           tensor=name, shard=info.shard))
        elif writer is not None:
            want = writer.scale_shape(info.shape)
            if not writer.accepts_scale_dtype(scale.dtype) or scale.shape != want:
                report.problems.append(Problem(f"scale is {scale.dtype}{list(scale.shape)}, expected "
                                               f"{writer.scale_dtype_text}{list(want)}", tensor=scale.name,
                                               shard=scale.shard))
            if writer.unfit(info.shape):
                report.problems.append(Problem(f"{writer.unfit(info.shape)}, yet stored as FP8", tensor=name,
                                               shard=info.shard))
    # a dialect without expert tensors names only `<module>.weight_scale` (a model's own `std_scale` is no scale)
    orphan = suffix if writer is None or writer.experts else ".weight" + suffix
    out.scales = set(out.scale_of.values())
    for name, info in tensors.items():
        if name.endswith(orphan) and name not in out.scales:
            report.problems.append(Problem("scale without an FP8 weight", tensor=name, shard=info.shard))
    return fp8


def _check_fp8_set(out: _Output, report: VerifyReport, fp8: dict[str, TensorInfo], arch_check: bool,
                   writer) -> None:
    qc = (out.config or {}).get("quantization_config")
    if not isinstance(qc, dict) or writer is None:
        return
    patterns = writer.exclusions(qc)  # modules_to_not_convert (fp8) or ignore (compressed-tensors)
    key = writer.exclusion_key
    ignored = set(qc.get("ignored_layers") or [])
    fp8_modules = {module_of(n) for n in fp8}
    scales = out.scales
    for name in sorted(fp8):
        if not writer.converts(module_of(name), patterns):
            report.problems.append(Problem(f"stored as FP8 but excluded by {key}", tensor=name,
                                           shard=fp8[name].shard))
    for name, info in out.tensors.items():
        kind, _ = classify(info)
        module = module_of(name)
        if kind == "other" or module in fp8_modules or (kind == "experts" and not writer.experts) \
                or name in scales:
            continue
        if writer.converts(module, patterns):
            what = ("not excluded in the config: transformers would raw-cast it to FP8" if key != "ignore" else
                    "not in the config's ignore: the loader would read it as FP8 with no weight_scale")
            report.problems.append(Problem(f"{info.dtype} Linear {what}", tensor=name, shard=info.shard))
        if ignored and module not in ignored and experts_module(name, kind, writer) not in ignored:
            report.problems.append(Problem("unquantized Linear missing from ignored_layers (vLLM would quantize it)",
                                           tensor=name, shard=info.shard))
    if arch_check and out.config is not None:
        _check_against_transformers(out, report, fp8, patterns, writer)


def _check_against_transformers(out: _Output, report: VerifyReport, fp8: dict[str, TensorInfo], patterns,
                                writer) -> None:
    """transformers' own loader, built on the meta device: fp8 checkpoints tensor by tensor (where each lands,
    per-expert Linears in their fused experts), compressed-tensors by its Linear set."""
    fp8_modules = {module_of(n) for n in fp8}
    if writer.quant_method == "fp8":
        scales = out.scales
        roles = {n: arch.FP8 if n in fp8 else arch.SCALE if n in scales else arch.HIGH for n in out.tensors}
        found = arch.placement(out.config, list(roles))
        if isinstance(found, str):
            report.notes.append(f"architecture check skipped: {found}")
        else:
            report.problems += [Problem(p) for p in arch.disagreements(found, roles)]
        return
    expected = arch.linear_modules(out.config, tuple(patterns), writer, {module_of(n) for n in out.tensors})
    if expected is None:
        report.notes.append("architecture check skipped: transformers is not installed or does not know it")
        return
    for module in sorted(expected - fp8_modules):
        report.problems.append(Problem(f"transformers builds {module} as FP8 but the checkpoint has no FP8 "
                                       "weight for it"))
    for module in sorted(fp8_modules - expected):
        report.problems.append(Problem(f"{module} is FP8 here but transformers does not convert it"))


def _check_against_source_structure(out: _Output, source: SourceIndex, report: VerifyReport, writer) -> None:
    tensors = out.tensors
    expected = set(source.tensors)
    for name in sorted(expected - set(tensors)):
        if name in out.weight_map and out.weight_map[name] not in out.headers:
            continue  # its shard is already reported unreadable
        report.problems.append(Problem("in the source but missing from the output", tensor=name))
    for name in sorted(set(tensors) - expected):
        if name not in out.scales:
            report.problems.append(Problem("in the output but not in the source", tensor=name,
                                           shard=tensors[name].shard))
    if out.config is not None:
        rest = {k: v for k, v in out.config.items() if k != "quantization_config"}
        if rest != source.config:
            changed = sorted(k for k in set(rest) | set(source.config) if rest.get(k) != source.config.get(k))
            report.problems.append(Problem(f"config.json differs from the source config in {changed}"))
