"""The conversion loop, driven by the plan: source -> quantize -> write, one tensor (or stripe) at a time."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import arch
from .card import model_card
from .configs import CARD_NAME, CONFIG_NAME, DTYPE_SIZES, INDEX_NAME, ConvertOptions
from .errors import QuantizeError, UsageError, WriteError
from .plan import COPY, QUANTIZE, SCALE, Plan, ShardPlan, make_plan
from .quantize import NonFiniteError, quantize_blocks
from .source import SourceIndex, TensorReader, open_source, read_header
from .write import OutputDir, ShardWriter, config_json, index_json

# Source bytes quantized per step: the working set is about 6x this (float32 copy, products, FP8 result).
STRIPE_BYTES = 16 * 2**20

Progress = Callable[[int], None]


@dataclass
class Summary:
    """What a finished run did."""

    dst: Path
    shards: int
    fp8_tensors: int
    copied_tensors: int
    bytes_in: int
    bytes_out: int
    files_copied: int
    seconds: float
    peak_rss_bytes: int
    notes: list[str] = field(default_factory=list)


def prepare(options: ConvertOptions) -> tuple[SourceIndex, Plan, list[str]]:
    """Check paths, read headers and make the plan; nothing is written.

    Returns:
        `(source, plan, notes)`; notes say what could not be checked.
    """
    _check_paths(options.src, options.dst)
    source = open_source(options.src)
    plan = make_plan(source, options.scheme, options.exclude_patterns, options.max_shard_size)
    notes = []
    preset_archs = options.preset.architectures
    archs = source.config.get("architectures") or []
    if preset_archs and not set(archs) & set(preset_archs):
        notes.append(f"preset {options.preset.name!r} is meant for {', '.join(preset_archs)}, not {archs}")
    if options.arch_check:
        skipped = arch.cross_check(plan)
        if skipped:
            notes.append(skipped)
    return source, plan, notes


def _check_paths(src: Path, dst: Path) -> None:
    src_abs, dst_abs = Path(src).resolve(), Path(dst).resolve()
    if dst_abs == src_abs or src_abs in dst_abs.parents:
        raise UsageError(f"--dst {dst} is inside --src {src}: the source is never written to; choose another folder")
    if dst_abs in src_abs.parents:
        raise UsageError(f"--src {src} is inside --dst {dst}: replacing --dst would destroy the source")


def convert(options: ConvertOptions, progress: Progress | None = None,
            on_plan: Callable[[Plan], None] | None = None) -> Summary:
    """Convert `options.src` into `options.dst`.

    Args:
        options (`ConvertOptions`): what to convert, where and how.
        progress (`Callable[[int], None]`, *optional*): called with the number of source bytes done, per step.
        on_plan (`Callable[[Plan], None]`, *optional*): called once with the plan, before anything is written.

    Raises:
        ConvertError: any failure; by then everything this run wrote has been removed.
    """
    started = time.monotonic()
    source, plan, notes = prepare(options)
    out = OutputDir(options.dst, options.overwrite)
    out.check()
    extra = sum((source.root / f).stat().st_size for f in plan.files_to_copy)
    out.check_space(plan.output_nbytes + extra + 2**20)
    progress = progress or (lambda n: None)
    if on_plan:
        on_plan(plan)
    out.open()
    try:
        with TensorReader(source) as reader:
            for shard in plan.shards:
                _write_shard(out.path(shard.name), shard, source, reader, plan.scheme.block_size, progress)
        out.write_text(INDEX_NAME, index_json(plan))
        for relative in plan.files_to_copy:
            out.copy_file(source.root / relative, relative)
        base = options.base_model or source.root.resolve().name
        out.write_text(CARD_NAME, model_card(plan, base_model=base, repo_name=f"{Path(base).name}-FP8"))
        out.write_text(CONFIG_NAME, config_json(plan))
        check_written_headers(out.staging, plan)
        _self_check(out.staging)
        out.commit()
    except BaseException:
        out.abort()
        raise
    n_fp8 = len(plan.fp8_modules)
    return Summary(
        dst=options.dst,
        shards=len(plan.shards),
        fp8_tensors=n_fp8,
        copied_tensors=len(plan.tensors) - 2 * n_fp8,
        bytes_in=source.nbytes,
        bytes_out=plan.output_nbytes,
        files_copied=len(plan.files_to_copy),
        seconds=time.monotonic() - started,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        notes=notes,
    )


def _write_shard(path: Path, shard: ShardPlan, source: SourceIndex, reader: TensorReader, block: int,
                 progress: Progress) -> None:
    writer = ShardWriter(path, shard)
    writer.open()
    try:
        scale_stripes = []
        for t in shard.tensors:
            info = source.tensors[t.source]
            if t.action == COPY:
                writer.copy_from(t.name, reader.fd_for(info), info.offset, info.nbytes)
                progress(info.nbytes)
            elif t.action == QUANTIZE:
                scale_stripes = []
                for fp8, scale_inv, nbytes in _quantize_stripes(info, reader, block):
                    writer.write(t.name, fp8.view(torch.uint8).numpy())
                    scale_stripes.append(scale_inv)
                    progress(nbytes)
            elif t.action == SCALE:
                writer.write(t.name, torch.cat(scale_stripes).numpy())
        writer.close()
    finally:
        writer.abort()


def _quantize_stripes(info, reader: TensorReader, block: int):
    """Yield `(fp8, scale_inv, source_bytes)` for successive stripes of whole tile rows of a 2-D weight."""
    rows, cols = info.shape
    row_bytes = cols * DTYPE_SIZES[info.dtype]
    stripe_rows = max(block, STRIPE_BYTES // (row_bytes * block) * block)
    for first in range(0, rows, stripe_rows):
        end = min(rows, first + stripe_rows)
        weight = reader.read_rows(info, first, end)
        try:
            fp8, scale_inv = quantize_blocks(weight, block)
        except NonFiniteError as exc:
            raise QuantizeError(
                f"tensor {info.name} in shard {info.shard} {exc} (near row {first + exc.row}); "
                "the source must be finite to be quantized"
            ) from None
        yield fp8, scale_inv, (end - first) * row_bytes


def _self_check(folder: Path) -> None:
    """The cheap structural checks of `verify` (config, index, headers, scale pairs and values, the FP8 set
    against the exclusions) on the staged output, before it is moved into place."""
    from .verify import verify

    report = verify(folder, arch_check=False, data=False)
    if not report.ok:
        raise WriteError(f"{folder}: the written output fails its own check: {report.problems[0]}")


def check_written_headers(folder: Path, plan: Plan) -> None:
    """Re-read every written shard's header and compare it with the plan: names, dtypes, shapes, file sizes."""
    for shard in plan.shards:
        header = read_header(folder / shard.name)
        got = [(t.name, t.dtype, t.shape) for t in header.tensors.values()]
        want = [(t.name, t.dtype, tuple(t.shape)) for t in shard.tensors]
        if got != want:
            raise WriteError(f"{folder / shard.name}: written header does not match the plan")
        if header.file_size != header.data_start + shard.nbytes:
            raise WriteError(f"{folder / shard.name}: {header.file_size} bytes, expected {header.data_start + shard.nbytes}")
