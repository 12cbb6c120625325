"""The conversion loop, driven by the plan: source -> quantize -> write, one tensor (or stripe) at a time."""

from __future__ import annotations

import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import arch, quantize_fast
from .card import model_card
from .configs import CARD_NAME, CONFIG_NAME, DTYPE_SIZES, INDEX_NAME, ConvertOptions
from .errors import QuantizeError, UsageError, WriteError
from .plan import COPY, QUANTIZE, SCALE, Plan, ShardPlan, make_plan
from .source import SourceIndex, TensorReader, open_source, read_header
from .write import OutputDir, ShardWriter, config_json, index_json

# Source bytes quantized per step. With the numba kernel the working set is this, the next stripe being read and
# half of it in FP8; the torch formula needs about 6x (float32 copies).
STRIPE_BYTES = 16 * 2**20
COPY_BUFFER_BYTES = 16 * 2**20  # copied tensors move in pieces of this, so progress and stops stay prompt

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


def prepare(options: ConvertOptions, check_arch_now: bool = True) -> tuple[SourceIndex, Plan, list[str]]:
    """Check paths, read headers and make the plan; nothing is written. With `check_arch_now` False the
    transformers cross-check is left to the caller.

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
    if options.arch_check and check_arch_now:
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
    source, plan, notes = prepare(options, check_arch_now=False)
    out = OutputDir(options.dst, options.overwrite)
    out.check()
    extra = sum((source.root / f).stat().st_size for f in plan.files_to_copy)
    out.check_space(plan.output_nbytes + extra + 2**20)
    progress = progress or (lambda n: None)
    if on_plan:
        on_plan(plan)
    quantizer = Quantizer(plan.scheme.block_size, options.quantizer, options.device)
    # The transformers cross-check mostly waits on importing transformers (about 2 s): it runs beside the
    # writing, into the staging folder, and a failure removes everything before any file is moved into place.
    arch_check = _Background(arch.cross_check, plan) if options.arch_check else None
    out.open()
    try:
        _write_shards(out, plan, source, quantizer, progress)
        out.write_text(INDEX_NAME, index_json(plan))
        for relative in plan.files_to_copy:
            out.copy_file(source.root / relative, relative)
        base = options.base_model or source.root.resolve().name
        out.write_text(CARD_NAME, model_card(plan, base_model=base, repo_name=f"{Path(base).name}-FP8"))
        out.write_text(CONFIG_NAME, config_json(plan))
        check_written_headers(out.staging, plan)
        _self_check(out.staging)
        if arch_check is not None:
            skipped = arch_check.result()
            if skipped:
                notes.append(skipped)
        out.commit()
    except BaseException:
        out.abort()
        if arch_check is not None:
            arch_check.wait()
        raise
    finally:
        quantizer.close()
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


def _write_shards(out: OutputDir, plan: Plan, source: SourceIndex, quantizer: "Quantizer",
                  progress: Progress) -> None:
    """Write every shard: all headers first, then two lanes at once, each writing at the offsets the headers fix.
    A thread copies the tensors that stay as they are (in the kernel where it can), while the main thread reads,
    quantizes and writes the others. The first error stops both."""
    writers = {shard.name: ShardWriter(out.path(shard.name), shard) for shard in plan.shards}
    copies, quantized = [], []
    for shard in plan.shards:
        tensors = list(shard.tensors)
        for i, t in enumerate(tensors):
            if t.action == COPY:
                copies.append((writers[shard.name], t))
            elif t.action == QUANTIZE:
                quantized.append((writers[shard.name], t, tensors[i + 1]))
    stop = threading.Event()
    lock = threading.Lock()

    def advance(nbytes: int) -> None:
        with lock:
            progress(nbytes)

    try:
        for writer in writers.values():
            writer.open()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-fp8-copy") as lane:
            copying = lane.submit(_copy_lane, copies, source, stop, advance)
            try:
                _quantize_lane(quantized, source, quantizer, stop, advance)
            except BaseException:
                stop.set()
                raise
            copying.result()
        for writer in writers.values():
            writer.close()
    finally:
        for writer in writers.values():
            writer.abort()


def _copy_lane(copies, source: SourceIndex, stop: threading.Event, advance: Progress) -> None:
    buffer = bytearray(COPY_BUFFER_BYTES)
    with TensorReader(source) as reader:
        for writer, t in copies:
            info = source.tensors[t.source]
            for start in range(0, info.nbytes, COPY_BUFFER_BYTES):
                if stop.is_set():
                    return
                n = min(COPY_BUFFER_BYTES, info.nbytes - start)
                writer.copy_at(t.name, start, reader.fd_for(info), info.offset + start, n, buffer)
                advance(n)


def _quantize_lane(quantized, source: SourceIndex, quantizer: "Quantizer", stop: threading.Event,
                   advance: Progress) -> None:
    """Read, quantize and write the FP8 weights; each stripe's write overlaps the next stripe's quantization
    (at most one write in flight, so the two output buffers of the quantizer are never overwritten early)."""
    with TensorReader(source) as reader, ThreadPoolExecutor(1, thread_name_prefix="convert-fp8-write") as io:
        for writer, weight, scale in quantized:
            info = source.tensors[weight.source]
            scale_stripes, position, writing = [], 0, None
            for fp8, scale_inv, nbytes in quantizer.stripes(info, reader):
                if stop.is_set():
                    return
                if writing is not None:
                    writing.result()
                writing = io.submit(writer.write_at, weight.name, position, fp8)
                position += fp8.nbytes
                scale_stripes.append(scale_inv)
                advance(nbytes)
            if writing is not None:
                writing.result()
            writer.write_at(scale.name, 0, np.concatenate(scale_stripes))


class Quantizer:
    """Quantizes a 2-D source weight stripe by stripe, reading the next stripe while the current one is quantized.

    `kind` is "numba" (the fused CPU kernel), "torch" (the reference formula, on `device`) or "auto" (numba when
    installed and the device is the CPU). Every kind writes the same bytes.
    """

    def __init__(self, block: int, kind: str = "auto", device: str = "cpu"):
        if kind == "auto":
            kind = "numba" if device == "cpu" and quantize_fast.available() else "torch"
        if kind == "numba" and not quantize_fast.available():
            raise UsageError("--quantizer numba: numba is not installed (pip install numba)")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda: torch sees no CUDA device")
        self.block, self.kind, self.device = block, kind, device
        self._buffers: dict[int, np.ndarray] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-fp8-read")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def stripes(self, info, reader: TensorReader):
        """Yield `(fp8 bytes, scale_inv, source bytes)` for successive stripes of whole tile rows.

        The FP8 bytes live in one of two buffers, used in turn: write them before asking for the stripe after next.
        """
        rows, cols = info.shape
        row_bytes = cols * DTYPE_SIZES[info.dtype]
        step = max(self.block, STRIPE_BYTES // (row_bytes * self.block) * self.block)
        starts = list(range(0, rows, step))
        reader.fd_for(info)  # open the shard here, not in the reading thread
        buffers = [self._buffer(i, step * row_bytes) for i in (0, 1)]
        outs = [self._buffer(i, step * cols) for i in (2, 3)]  # one being written while the other is filled

        def read(i):
            first = starts[i]
            view = memoryview(buffers[i % 2])[: (min(rows, first + step) - first) * row_bytes]
            reader.read_into(info, first * row_bytes, view)
            return view

        pending = self._pool.submit(read, 0)
        for i, first in enumerate(starts):
            raw = pending.result()
            if i + 1 < len(starts):
                pending = self._pool.submit(read, i + 1)
            n = min(rows, first + step) - first
            out = outs[i % 2][: n * cols].reshape(n, cols)
            fp8, scale_inv = self._quantize(raw, info, n, cols, first, out)
            yield fp8, scale_inv, n * row_bytes

    def _buffer(self, slot: int, nbytes: int) -> np.ndarray:
        """A byte buffer kept across stripes and tensors, grown when needed."""
        buf = self._buffers.get(slot)
        if buf is None or len(buf) < nbytes:
            buf = self._buffers[slot] = np.empty(max(nbytes, STRIPE_BYTES), np.uint8)
        return buf[:nbytes]

    def _quantize(self, raw: memoryview, info, rows: int, cols: int, first: int, out: np.ndarray):
        block = self.block
        if self.kind == "numba":
            scale_inv = np.empty((rows // block, cols // block), np.float32)
            status, row = quantize_fast.quantize_into(np.frombuffer(raw, np.uint8), info.dtype, out, scale_inv, block)
            if status != quantize_fast.OK:
                what = ("holds NaN or Inf" if status == quantize_fast.NON_FINITE else
                        "has a tile of float32-subnormal values whose scale overflows")
                raise _non_finite(info, what, first + row)
            return out, scale_inv
        import torch

        from .quantize import TORCH_DTYPES, NonFiniteError, quantize_blocks

        weight = torch.frombuffer(raw, dtype=TORCH_DTYPES[info.dtype]).reshape(rows, cols)
        try:
            fp8, scale_inv = quantize_blocks(weight.to(self.device), block)
        except NonFiniteError as exc:
            raise _non_finite(info, str(exc), first + exc.row) from None
        return fp8.view(torch.uint8).cpu().numpy(), scale_inv.cpu().numpy()


def _non_finite(info, what: str, row: int) -> QuantizeError:
    return QuantizeError(f"tensor {info.name} in shard {info.shard} {what} (near row {row}); "
                         "the source must be finite to be quantized")


class _Background:
    """Runs a function in a daemon thread; `result()` returns its value or raises its exception."""

    def __init__(self, func, *args):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(func, *args), daemon=True, name="convert-fp8-arch")
        self._thread.start()

    def _run(self, func, *args):
        try:
            self._value = func(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._error = exc

    def wait(self) -> None:
        self._thread.join()

    def result(self):
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value


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
