"""`convert-fp8 dequantize`: a block-FP8 checkpoint back to BF16 (or F16, F32), streaming, resumable.

Every FP8 weight becomes exactly what transformers' `Fp8Dequantize` gives on the CPU when it loads the checkpoint:

    w = RN_dtype(RN_f32(float32(q) * float32(scale_inv)))

per element, with `scale_inv` the inverse scale of the element's block. The scales are dropped; every other tensor
and file is copied byte for byte; `quantization_config` leaves the config. The plan is a pure function of the
source headers and reuses the conversion's shard layout (`ShardPlan`, `TensorPlan`), so the writer, the staging
folder, the manifest and the resume work as for a conversion. Which tensors are weights and scales, and how
scales read, is the source dialect's business (`converter/dialects/`).
"""

from __future__ import annotations

import copy
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .configs import CARD_NAME, CONFIG_NAME, DEFAULT_MAX_SHARD_SIZE, DTYPE_SIZES, format_size
from .convert import load_source
from .dialects import ScaledWeight, reader_for
from .errors import PublishError, SourceError
from .finalize import check_written_headers, finished_output, write_last_files
from .lanes import MainLane, Progress, Stop, write_shards
from .manifest import run_identity, source_stamp
from .plan import COPY, ShardedOutput, ShardPlan, TensorPlan, assign_shards
from .resume import claim_part, source_name, verified_pieces
from .source import DIRECT_ALIGN, SINGLE_FILE_NAME, AlignedBuffers, SourceIndex, TensorReader, source_card
from .write import OutputDir, ShardWriter

DEQUANTIZE = "dequantize"
OUTPUT_DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
_CONFIG_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

# FP8 bytes dequantized per step; the output is 2x this in BF16 (4x in F32), and the torch formula's float32
# product another 4x.
STRIPE_BYTES = 4 * 2**20

@dataclass(frozen=True)
class DequantOptions:
    """Everything one dequantization run needs to know."""

    src: Path | str  # a folder, or a Hub repo id
    dst: Path
    dtype: str = "bf16"  # a key of OUTPUT_DTYPES
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    overwrite: bool = False
    base_model: str | None = None  # for the model card; defaults to the source's name
    revision: str | None = None  # Hub sources: branch, tag or commit
    low_disk: bool = False  # Hub sources: delete each downloaded shard once its tensors are written
    allow_external_links: bool = False  # copy files of --src that link outside it (refused by default)

    def __post_init__(self):
        if self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: expected one of {', '.join(OUTPUT_DTYPES)}")


@dataclass(frozen=True)
class DequantPlan(ShardedOutput):
    """A complete dequantization, decided from headers before anything is written."""

    dialect: str
    reader: object  # the source dialect's reader (converter/dialects), which decodes its scales
    dtype: str  # safetensors dtype of the dequantized weights
    shards: tuple[ShardPlan, ...]
    config: dict  # the output config.json
    pairs: dict[str, ScaledWeight]  # dequantized weight -> its FP8 source and scales
    files_to_copy: tuple[str, ...]
    files_skipped: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]
    source_nbytes: int


@dataclass
class DequantSummary:
    """What a finished run did."""

    dst: Path
    shards: int
    dequantized: int
    copied: int
    bytes_in: int
    bytes_out: int
    files_copied: int
    seconds: float
    peak_rss_bytes: int
    resumed_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    already_finished: str | None = None  # what showed that --dst already held this run's finished output


def make_dequant_plan(source: SourceIndex, dtype: str, max_shard_size: int) -> DequantPlan:
    """Decide every output tensor, the shards and the output config from the source's headers and config alone.

    Args:
        source (`SourceIndex`): the FP8 checkpoint.
        dtype (`str`): safetensors dtype of the dequantized weights, `BF16`, `F16` or `F32`.
        max_shard_size (`int`): largest output shard in bytes.

    Raises:
        SourceError: not a quantized checkpoint, a dialect or config this tool cannot read, a weight without its
            scale, a scale grid that does not fit its weight.
    """
    where = f"{source.name or source.root}/{CONFIG_NAME}"
    reader = reader_for(source.config, where)
    pairs = reader.pair(source.tensors, lambda info: f"{source.name or source.root}/{info.shard}")
    if not pairs:
        raise SourceError(f"{where}: says {reader.quant_method} but the checkpoint holds no FP8 weights")
    scales = {p.scale.name for p in pairs.values()} | reader.dropped(source.tensors)
    groups = []
    for info in source.tensors.values():
        if info.name in scales:
            continue
        if info.name in pairs:
            groups.append([TensorPlan(info.name, info.name, DEQUANTIZE, dtype, info.shape, "dequantized")])
        else:
            groups.append([TensorPlan(info.name, info.name, COPY, info.dtype, info.shape, "copied")])
    skipped = tuple((f, "replaced by the dequantized model card" if f == CARD_NAME else why)
                    for f, why in source.files_skipped)
    return DequantPlan(
        dialect=reader.describe(),
        reader=reader,
        dtype=dtype,
        shards=assign_shards(groups, max_shard_size, single_file=source.shards == (SINGLE_FILE_NAME,)),
        config=output_config(source.config, dtype),
        pairs=pairs,
        files_to_copy=source.files_to_copy,
        files_skipped=skipped,
        warnings=source.warnings,
        source_nbytes=source.nbytes,
    )


def output_config(config: dict, dtype: str) -> dict:
    """The source config without `quantization_config`, its top-level dtype set to that of the weights."""
    out = copy.deepcopy(config)
    out.pop("quantization_config", None)
    for key in ("dtype", "torch_dtype"):
        if key in out:
            out[key] = _CONFIG_DTYPE_NAMES[dtype]
    return out


def describe_dequant_plan(plan: DequantPlan) -> str:
    """A human summary of a plan: what is read, what is written."""
    n_deq = sum(1 for t in plan.tensors if t.action == DEQUANTIZE)
    lines = [
        f"source: {plan.dialect}",
        f"{n_deq} FP8 weights to {plan.dtype}, {len(plan.pairs)} scale tensors dropped, "
        f"{len(plan.tensors) - n_deq} tensors copied; {len(plan.shards)} shard(s)",
        f"source tensors {format_size(plan.source_nbytes)} -> output tensors {format_size(plan.output_nbytes)}",
        f"other files copied: {len(plan.files_to_copy)}",
    ]
    lines += [f"not copied: {path} ({why})" for path, why in plan.files_skipped]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


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


def prepare(options: DequantOptions) -> tuple[SourceIndex, DequantPlan]:
    """Read headers and make the plan; nothing is written."""
    source = load_source(options.src, options.dst, options.revision, options.low_disk, options.allow_external_links)
    return source, make_dequant_plan(source, OUTPUT_DTYPES[options.dtype], options.max_shard_size)


def _run_record(options: DequantOptions, identity: str, stamp: dict) -> dict:
    return {"identity": identity, "source_stamp": stamp, "parts": 1, "tool": __version__, "command": "dequantize",
            "src": source_name(options.src), "revision": options.revision,
            "options": {"dtype": options.dtype, "max_shard_size": options.max_shard_size,
                        "base_model": options.base_model}}


def dequantize(options: DequantOptions, progress: Progress | None = None,
               on_start: Callable[[int], None] | None = None, publish=None) -> DequantSummary:
    """Dequantize `options.src` into `options.dst`.

    A run killed half-way leaves its work in `DST/.convert-fp8.partial/`; the same command keeps every piece of
    it that checks out and writes the rest.

    Args:
        options (`DequantOptions`): what to dequantize, where and to which dtype.
        progress (`Callable[[int], None]`, *optional*): called with the number of source bytes done, per step.
        on_start (`Callable[[int], None]`, *optional*): called once, before anything is written, with the
            number of source bytes the run goes through.
        publish (`publish.Publisher`, *optional*): uploads each shard once written, all before the output moves
            into place.

    Raises:
        ConvertError: any failure; by then what this run wrote has been removed (a kill or Ctrl-C leaves it to be
            resumed).
    """
    started = time.monotonic()
    source, plan = prepare(options)
    if publish is None and not options.overwrite:
        checked = finished_output(options.dst, plan, source, lambda: _card(plan, source, options))
        if checked is not None:
            return DequantSummary(
                dst=options.dst, shards=len(plan.shards), dequantized=len(plan.pairs),
                copied=len(plan.tensors) - len(plan.pairs), bytes_in=0, bytes_out=0, files_copied=0,
                seconds=time.monotonic() - started,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, already_finished=checked)
    out = OutputDir(options.dst, options.overwrite)
    out.check()
    extra = sum((source.root / f).stat().st_size for f in plan.files_to_copy if (source.root / f).is_file())
    out.check_space(plan.output_nbytes + extra + 2**20, already=out.staged_bytes([s.name for s in plan.shards]))
    progress = progress or (lambda n: None)
    if on_start:
        on_start(source.nbytes)
    stamp = source_stamp(source)
    identity = run_identity(source, plan, stamp)
    claimed = claim_part(out, _run_record(options, identity, stamp), options.overwrite, (1, 1))
    notes = [claimed.taken_over] if claimed.taken_over else []
    try:
        done = verified_pieces(claimed.manifest, out.staging) if claimed.resumed else {}
        resumed_bytes = write_shards(out, list(plan.shards), source, DequantizeLane(plan, source), progress,
                                     claimed.manifest, done, claimed.resumed, None,
                                     publish.shard_written if publish else None)
        if publish is not None:
            publish.shards_written(out.staging, list(plan.shards))
        claimed.release()
        _finalize(out, plan, source, options)
    except (KeyboardInterrupt, PublishError):  # the same command resumes: the uploads' record stays with the work
        claimed.release()
        raise
    except BaseException:
        claimed.release()
        if publish is None or not publish.uploaded:
            out.abort()
        raise
    n_deq = len(plan.pairs)
    return DequantSummary(
        dst=options.dst, shards=len(plan.shards), dequantized=n_deq, copied=len(plan.tensors) - n_deq,
        bytes_in=source.nbytes, bytes_out=plan.output_nbytes, files_copied=len(plan.files_to_copy),
        seconds=time.monotonic() - started,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        resumed_bytes=resumed_bytes, notes=notes,
    )


class DequantizeLane(MainLane):
    """Dequantize's main lane: every FP8 weight read, dequantized and written stripe by stripe; its scales are
    read whole and dropped."""

    def __init__(self, plan: DequantPlan, source: SourceIndex):
        self.plan, self.source = plan, source

    def items(self, writer: ShardWriter, tensors: list[TensorPlan]) -> list[tuple]:
        return [(writer, t) for t in tensors if t.action == DEQUANTIZE]

    def reads(self, tensor: TensorPlan) -> tuple[str, ...]:
        pair = self.plan.pairs[tensor.name]
        return pair.weight.shard, pair.scale.shard

    def keep(self, done: dict, items: list[tuple]) -> dict:
        """Whole stripes."""
        usable = {}
        for writer, t in items:
            pair = self.plan.pairs[t.name]
            for first, _, _ in stripes(pair.weight.shape, pair.block, stripe_rows(pair.weight)):
                key = (writer.shard.name, t.name, _stripe_start(t, first))
                if key in done:
                    usable[key] = done[key]
        return usable

    def run(self, items: list[tuple], stop: Stop, advance: Progress, done: dict, finished: Callable) -> int:
        """Read, dequantize and write every FP8 weight stripe by stripe: the next stripe is read and the previous
        one written while this one is dequantized (one read and one write in flight, each buffer used in turn, so
        none is overwritten early)."""
        plan, source = self.plan, self.source
        kept = 0
        engine = _Dequantizer(plan.dtype)
        with TensorReader(source) as reader, ThreadPoolExecutor(1, thread_name_prefix="convert-fp8-write") as io, \
                ThreadPoolExecutor(1, thread_name_prefix="convert-fp8-read") as ahead:
            for writer, t in items:
                pair = plan.pairs[t.name]
                info, cols = pair.weight, pair.weight.shape[-1]
                shard = writer.shard.name
                todo = []
                for first, rows, scale_first in stripes(info.shape, pair.block, stripe_rows(info)):
                    if (shard, t.name, _stripe_start(t, first)) in done:
                        kept += rows * cols
                        advance(rows * cols)
                    else:
                        todo.append((first, rows, scale_first))
                if todo:
                    scale_inv = read_scales(reader, pair, plan.reader, source)
                    reader.fd_for(info)  # open the weight's shard here, not in the reading thread
                    reading = ahead.submit(engine.read, reader, info, todo[0][0], todo[0][1], 0)
                writing = None
                for k, (first, rows, scale_first) in enumerate(todo):
                    codes = reading.result()
                    if stop.is_set():
                        return kept
                    if k + 1 < len(todo):
                        reading = ahead.submit(engine.read, reader, info, todo[k + 1][0], todo[k + 1][1],
                                               (k + 1) % 2)
                    scale_rows = scale_inv[scale_first: scale_first + -(-rows // pair.block[0])]
                    out = engine.dequantize(codes, scale_rows, pair.block, slot=k % 2)
                    if writing is not None:
                        writing.result()
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


def read_scales(reader: TensorReader, pair: ScaledWeight, dialect, source: SourceIndex):
    """A weight's inverse scales as a float32 numpy matrix (experts' grids stacked), checked finite; `dialect` is
    the source's dialect reader (`scales_from_bytes`). Also what a conversion from an FP8 source decodes with.

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


def _finalize(out: OutputDir, plan: DequantPlan, source: SourceIndex, options: DequantOptions) -> None:
    """Index, other files, model card and config (last); check the headers; move everything into place. The
    conversion's self-check (`verify`) is not run: it checks FP8 weights and their scales, which this output has
    none of."""
    names = write_last_files(out, plan, source, lambda: _card(plan, source, options))
    check_written_headers(out.staging, plan)
    out.commit(names)


def _card(plan: DequantPlan, source: SourceIndex, options: DequantOptions) -> str:
    from .publish import source_origin

    hub_id, commit = source_origin(source)
    base = options.base_model or hub_id or source.root.resolve().name
    return model_card(plan, base_model=base, source_card=source_card(source), base_model_id=options.base_model or hub_id,
                      commit=commit)


def model_card(plan: DequantPlan, base_model: str, source_card: str | None = None, base_model_id: str | None = None,
               commit: str | None = None) -> str:
    """The model card of a dequantized checkpoint: where it comes from and how it was made. The front matter of
    the source's card that still holds (licence, language, task, library, tags, gating prompts) is kept, as the
    conversion keeps it; `base_model` is written only when the source's Hub id is known."""
    import yaml

    from .card import GATED_PREFIX, KEPT_KEYS, UnreadableFrontMatter, source_front_matter

    try:
        meta, unreadable = source_front_matter(source_card), None
    except UnreadableFrontMatter as exc:
        meta, unreadable = {}, str(exc)
    dtype = _CONFIG_DTYPE_NAMES[plan.dtype]
    front = {key: meta[key] for key in KEPT_KEYS if key in meta}
    if base_model_id:
        front["base_model"] = base_model_id
    tags = meta.get("tags")
    tags = [tags] if isinstance(tags, str) else list(tags) if isinstance(tags, list) else []
    front["tags"] = list(dict.fromkeys([*(t for t in tags if t != "fp8"), dtype, "convert-fp8"]))
    front.update({key: value for key, value in meta.items() if str(key).startswith(GATED_PREFIX)})
    front_text = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    archs = plan.config.get("architectures") or ["(unknown architecture)"]
    origin = f"`{base_model}`" + (f" at commit `{commit}`" if commit else "")
    warning = (f"\n> The source card's metadata could not be read ({unreadable}): copy its licence into the front "
               "matter above before publishing.\n" if unreadable else "")
    return f"""---
{front_text}---
# {Path(base_model).name}, dequantized to {dtype}

{origin} ({archs[0]}) with its FP8 weights dequantized to {dtype} by `convert-fp8 dequantize` {__version__},
streaming, without loading the model.
{warning}
- Source: {plan.dialect}.
- {len(plan.pairs)} FP8 weights dequantized: each E4M3 value times its block's scale in float32,
  rounded once to {dtype}, {plan.reader.values_text}.
  The scale tensors are dropped and `quantization_config` is removed from the config.
- Every other tensor and file is copied unchanged.
- Tensor data: {format_size(plan.source_nbytes)} in the source, {format_size(plan.output_nbytes)} here.

The values are those of the FP8 checkpoint: dequantizing does not restore what quantization lost.
"""
