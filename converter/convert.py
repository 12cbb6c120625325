"""The conversion loop, driven by the plan: source -> quantize -> write, resumable and divisible into parts."""

from __future__ import annotations

import os
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, arch
from .card import model_card
from .configs import CARD_NAME, CONFIG_NAME, DTYPE_SIZES, INDEX_NAME, ConvertOptions, matrix_shape
from .errors import SourceError, UsageError, WriteError
from .manifest import Manifest, PartLock, Piece, buffer_crc, claim_run, file_crc, read_run, run_identity
from .plan import COPY, QUANTIZE, SCALE, Plan, ShardPlan, make_plan
from .source import SourceIndex, TensorReader, open_hub_source, open_source, read_header
from .stripes import Quantizer
from .write import OutputDir, ShardWriter, config_json, index_json

COPY_BUFFER_BYTES = 16 * 2**20  # copied tensors move in pieces of this: the unit of progress, stops and resume

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
    resumed_bytes: int = 0
    finalized: bool = True
    notes: list[str] = field(default_factory=list)


def prepare(options: ConvertOptions, check_arch_now: bool = True) -> tuple[SourceIndex, Plan, list[str]]:
    """Check paths, read headers and make the plan; nothing is written. With `check_arch_now` False the
    transformers cross-check is left to the caller.

    Returns:
        `(source, plan, notes)`; notes say what could not be checked.
    """
    source = load_source(options)
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


def load_source(options: ConvertOptions) -> SourceIndex:
    """The source of `options`: a local folder, or a Hub repository id (`org/name`)."""
    from .hub import HubRepo, looks_like_repo_id

    if looks_like_repo_id(options.src):
        return open_hub_source(HubRepo(str(options.src), options.revision, options.low_disk))
    if options.revision or options.low_disk:
        raise UsageError("--revision and --low-disk apply to Hub sources (--src org/name), not to a local folder")
    _check_paths(options.src, options.dst)
    return open_source(options.src)


def _check_paths(src: Path, dst: Path) -> None:
    src_abs, dst_abs = Path(src).resolve(), Path(dst).resolve()
    if dst_abs == src_abs or src_abs in dst_abs.parents:
        raise UsageError(f"--dst {dst} is inside --src {src}: the source is never written to; choose another folder")
    if dst_abs in src_abs.parents:
        raise UsageError(f"--src {src} is inside --dst {dst}: replacing --dst would destroy the source")


def part_shards(plan: Plan, part: tuple[int, int]) -> list[ShardPlan]:
    """The output shards of part `(i, n)`: every n-th shard from the i-th (1-based), a fixed split."""
    i, n = part
    return [shard for k, shard in enumerate(plan.shards) if k % n == i - 1]


def source_name(options: ConvertOptions) -> str:
    from .hub import looks_like_repo_id

    return str(options.src) if looks_like_repo_id(options.src) else str(Path(options.src).resolve())


def _run_record(options: ConvertOptions, identity: str) -> dict:
    return {
        "identity": identity,
        "parts": options.part[1],
        "tool": __version__,
        "src": source_name(options),
        "revision": options.revision,
        "options": {
            "preset": options.preset.origin or options.preset.name,
            "exclude": list(options.extra_excludes),
            "block_size": options.block_size,
            "max_shard_size": options.max_shard_size,
            "arch_check": options.arch_check,
            "base_model": options.base_model,
        },
    }


def convert(options: ConvertOptions, progress: Progress | None = None,
            on_start: Callable[[int], None] | None = None) -> Summary:
    """Convert `options.src` into `options.dst` (or, with `options.part`, one part of it).

    An earlier run of the same conversion killed half-way leaves its work in `DST/.convert-fp8.partial/`; this
    run keeps every piece of it that checks out and writes the rest.

    Args:
        options (`ConvertOptions`): what to convert, where and how.
        progress (`Callable[[int], None]`, *optional*): called with the number of source bytes done, per step.
        on_start (`Callable[[int], None]`, *optional*): called once, before anything is written, with the
            number of source bytes this run (or part) will go through.

    Raises:
        ConvertError: any failure; by then what this run wrote has been removed (a part removes its own files).
    """
    started = time.monotonic()
    source, plan, notes = prepare(options, check_arch_now=False)
    out = OutputDir(options.dst, options.overwrite)
    out.check()
    mine = part_shards(plan, options.part)
    extra = sum((source.root / f).stat().st_size for f in plan.files_to_copy if (source.root / f).is_file())
    out.check_space(sum(s.nbytes for s in mine) + extra + 2**20, already=out.staged_bytes())
    progress = progress or (lambda n: None)
    part_source_bytes = sum(source.tensors[t.source].nbytes for s in mine for t in s.tensors if t.action != SCALE)
    if on_start:
        on_start(part_source_bytes)
    quantizer = Quantizer(plan.scheme.block_size, options.quantizer, options.device)
    # The transformers cross-check mostly waits on importing transformers (about 2 s): it runs beside the
    # writing, into the staging folder, and a failure removes what this run wrote before anything is moved.
    arch_check = _Background(arch.cross_check, plan) if options.arch_check else None
    identity = run_identity(source, plan)
    i, n = options.part
    out.open()
    resumed = claim_run(out.staging, _run_record(options, identity), options.overwrite)
    lock = PartLock(out.staging, options.part)
    taken_over = lock.acquire()
    if taken_over:
        notes.append(taken_over)
    manifest = Manifest(out.staging / f"manifest-part-{i}-of-{n}.jsonl")
    finalized = False
    try:
        done = _verified_pieces(manifest, out.staging) if resumed else {}
        resumed_bytes = _write_shards(out, mine, source, quantizer, progress, manifest, done, resumed)
        manifest.close()
        if arch_check is not None:
            skipped = arch_check.result()
            if skipped:
                notes.append(skipped)
        (out.staging / f"part-{i}-of-{n}.done").write_text(identity + "\n")
        lock.release()
        finalized = finalize_if_complete(out, plan, source, options, notes)
    except KeyboardInterrupt:
        manifest.close()
        lock.release()
        raise
    except BaseException:
        manifest.close()
        lock.release()
        if n == 1:
            out.abort()
        else:
            _remove_part(out, mine, manifest, i, n)
        if arch_check is not None:
            arch_check.wait()
        raise
    finally:
        quantizer.close()
    n_fp8 = sum(1 for s in mine for t in s.tensors if t.action == QUANTIZE)
    n_all = sum(len(s.tensors) for s in mine)
    return Summary(
        dst=options.dst,
        shards=len(mine),
        fp8_tensors=n_fp8,
        copied_tensors=n_all - 2 * n_fp8,
        bytes_in=part_source_bytes,
        bytes_out=sum(s.nbytes for s in mine),
        files_copied=len(plan.files_to_copy) if finalized else 0,
        seconds=time.monotonic() - started,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        resumed_bytes=resumed_bytes,
        finalized=finalized,
        notes=notes,
    )


def _remove_part(out: OutputDir, mine: list[ShardPlan], manifest: Manifest, i: int, n: int) -> None:
    """A failed part removes its own shards and records, and leaves the other parts' work alone."""
    for path in [out.staging / s.name for s in mine] + [manifest.path, out.staging / f"part-{i}-of-{n}.done"]:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _verified_pieces(manifest: Manifest, staging: Path) -> dict[tuple[str, str, int], Piece]:
    """The recorded pieces whose bytes in the staged shards still match their sampled CRC."""
    good, shards = {}, {}
    try:
        for key, piece in manifest.load().items():
            if piece.shard not in shards:  # (descriptor, tensors) of each staged shard, read once
                path = staging / piece.shard
                try:
                    shards[piece.shard] = (os.open(path, os.O_RDONLY), read_header(path).tensors)
                except (OSError, SourceError):
                    shards[piece.shard] = (None, {})
            fd, tensors = shards[piece.shard]
            info = tensors.get(piece.tensor)
            if fd is None or info is None or piece.start + piece.length > info.nbytes:
                continue
            if file_crc(fd, info.offset + piece.start, piece.length) == piece.crc:
                good[key] = piece
    finally:
        for fd, _ in shards.values():
            if fd is not None:
                os.close(fd)
    return good


def finalize_if_complete(out: OutputDir, plan: Plan, source: SourceIndex, options: ConvertOptions,
                         notes: list[str]) -> bool:
    """When every part has finished, write the index, other files, model card and config (last), check the
    staged output and move it into place. Exactly one process does it (a lock file decides)."""
    n = options.part[1]
    missing = [k for k in range(1, n + 1) if not (out.staging / f"part-{k}-of-{n}.done").exists()]
    if missing and not out.staging.exists():  # another part finalized (and removed the staging folder) meanwhile
        notes.append("another part completed the checkpoint")
        return False
    if missing:
        notes.append(f"waiting for part(s) {', '.join(f'{k}/{n}' for k in missing)}; the last part to finish, or "
                     f"`convert-fp8 finalize --dst {options.dst}`, completes the checkpoint")
        return False
    try:
        lock = os.open(out.staging / "finalize.lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except (FileExistsError, FileNotFoundError):  # FileNotFoundError: it finished and removed the staging folder
        notes.append("another part is completing the checkpoint")
        return False
    os.close(lock)
    try:
        out.write_text(INDEX_NAME, index_json(plan))
        for relative in plan.files_to_copy:
            origin = source.provider.fetch(relative) if source.provider is not None else source.root / relative
            out.copy_file(origin, relative)
        base = options.base_model or source.name or source.root.resolve().name
        out.write_text(CARD_NAME, model_card(plan, base_model=base, repo_name=f"{Path(base).name}-FP8"))
        out.write_text(CONFIG_NAME, config_json(plan))
        check_written_headers(out.staging, plan)
        _self_check(out.staging)
        names = [s.name for s in plan.shards] + [INDEX_NAME, CARD_NAME, CONFIG_NAME]
        names += sorted({Path(f).parts[0] for f in plan.files_to_copy})
        out.commit(names)
    except BaseException:
        (out.staging / "finalize.lock").unlink(missing_ok=True)
        raise
    return True


def finalize(dst: Path) -> Summary:
    """`convert-fp8 finalize`: complete a partitioned conversion whose parts have all finished."""
    from .presets import load_preset

    started = time.monotonic()
    staging = OutputDir(dst, overwrite=False).staging
    record = read_run(staging)
    opts = record["options"]
    n = record["parts"]
    options = ConvertOptions(
        src=record["src"], dst=Path(dst), preset=load_preset(opts["preset"]), revision=record.get("revision"),
        extra_excludes=tuple(opts["exclude"]), block_size=opts["block_size"],
        max_shard_size=opts["max_shard_size"], arch_check=False, base_model=opts["base_model"],
        overwrite=True, part=(n, n),
    )
    source, plan, notes = prepare(options, check_arch_now=False)
    if run_identity(source, plan) != record["identity"]:
        raise UsageError(f"{record['src']}: the source or this tool changed since the parts ran; convert again")
    out = OutputDir(dst, overwrite=True)
    if not finalize_if_complete(out, plan, source, options, notes):
        raise UsageError(f"{dst}: cannot finalize: {notes[-1]}")
    return Summary(dst=Path(dst), shards=len(plan.shards), fp8_tensors=len(plan.fp8_modules),
                   copied_tensors=len(plan.tensors) - 2 * len(plan.fp8_modules), bytes_in=source.nbytes,
                   bytes_out=plan.output_nbytes, files_copied=len(plan.files_to_copy),
                   seconds=time.monotonic() - started,
                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, notes=notes)


def _write_shards(out: OutputDir, shards: list[ShardPlan], source: SourceIndex, quantizer: Quantizer,
                  progress: Progress, manifest: Manifest, done: dict, resume: bool) -> int:
    """Write the given shards: all headers first, then two lanes at once, each writing at the offsets the headers
    fix. A thread copies the tensors that stay as they are (in the kernel where it can), while the main thread
    reads, quantizes and writes the others. Pieces in `done` are kept. The first error stops both lanes.

    Returns:
        Source bytes whose output was kept from an earlier run.
    """
    writers = {shard.name: ShardWriter(out.path(shard.name), shard) for shard in shards}
    copies, quantized = [], []
    for shard in shards:
        tensors = list(shard.tensors)
        for k, t in enumerate(tensors):
            if t.action == COPY:
                copies.append((writers[shard.name], t))
            elif t.action == QUANTIZE:
                quantized.append((writers[shard.name], t, tensors[k + 1]))
    stop = threading.Event()
    lock = threading.Lock()
    pending: dict[str, int] = {}  # source shard -> tensors of it still to write (to release Hub downloads)
    for _, t, *_scale in copies + quantized:
        shard = source.tensors[t.source].shard
        pending[shard] = pending.get(shard, 0) + 1

    def advance(nbytes: int) -> None:
        with lock:
            progress(nbytes)

    def finished(tensor) -> None:
        shard = source.tensors[tensor.source].shard
        with lock:
            pending[shard] -= 1
            last = pending[shard] == 0
        if last and source.provider is not None:
            source.provider.release(shard)

    kept = 0
    try:
        for writer in writers.values():
            writer.open(resume=resume)
        fresh = {w.shard.name for w in writers.values() if not w.resumed}  # a shard begun anew keeps nothing
        done = _usable_pieces({k: p for k, p in done.items() if p.shard not in fresh}, copies, quantized, source,
                              quantizer)
        for piece in done.values():
            writers[piece.shard].credit(piece.tensor, piece.length)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-fp8-copy") as lane:
            copying = lane.submit(_copy_lane, copies, source, stop, advance, manifest, done, finished)
            try:
                kept += _quantize_lane(quantized, source, quantizer, stop, advance, manifest, done, finished)
            except BaseException:
                stop.set()
                raise
            kept += copying.result()
        for writer in writers.values():
            writer.close()
    finally:
        for writer in writers.values():
            writer.abort()
    return kept


def _stripe_keys(shard: str, weight, scale, cols: int, block: int, first: int) -> tuple[tuple, tuple]:
    """Manifest keys of the stripe starting at row `first`: its FP8 bytes and its rows of scales."""
    return (shard, weight.name, first * cols), (shard, scale.name, first // block * scale.shape[-1] * 4)


def _usable_pieces(done: dict, copies, quantized, source: SourceIndex, quantizer: Quantizer) -> dict:
    """The recorded pieces the lanes will skip: copy chunks on the chunk grid, and stripes whose FP8 bytes and
    scale rows were both recorded (a run killed between the two redoes the stripe)."""
    usable = {}
    for writer, t in copies:
        for start in range(0, source.tensors[t.source].nbytes, COPY_BUFFER_BYTES):
            key = (writer.shard.name, t.name, start)
            if key in done:
                usable[key] = done[key]
    for writer, weight, scale in quantized:
        info = source.tensors[weight.source]
        rows, cols = matrix_shape(info.shape)
        for first in range(0, rows, quantizer.stripe_rows(info)):
            fp8_key, scale_key = _stripe_keys(writer.shard.name, weight, scale, cols, quantizer.block, first)
            if fp8_key in done and scale_key in done:
                usable[fp8_key], usable[scale_key] = done[fp8_key], done[scale_key]
    return usable


def _copy_lane(copies, source: SourceIndex, stop: threading.Event, advance: Progress, manifest: Manifest,
               done: dict, finished: Callable) -> int:
    buffer = bytearray(COPY_BUFFER_BYTES)
    kept = 0
    with TensorReader(source) as reader:
        for writer, t in copies:
            info = source.tensors[t.source]
            shard = writer.shard.name
            for start in range(0, info.nbytes, COPY_BUFFER_BYTES):
                if stop.is_set():
                    return kept
                n = min(COPY_BUFFER_BYTES, info.nbytes - start)
                if (shard, t.name, start) in done:
                    kept += n
                    advance(n)
                    continue
                writer.copy_at(t.name, start, reader.fd_for(info), info.offset + start, n, buffer)
                manifest.record(Piece(shard, t.name, start, n, writer.crc_at(t.name, start, n)))
                advance(n)
            finished(t)
    return kept


def _quantize_lane(quantized, source: SourceIndex, quantizer: Quantizer, stop: threading.Event,
                   advance: Progress, manifest: Manifest, done: dict, finished: Callable) -> int:
    """Read, quantize and write the FP8 weights, each stripe with its scale rows; each stripe's write overlaps
    the next stripe's quantization (at most one write in flight, so the quantizer's two output buffers are
    never overwritten early)."""
    kept = 0
    with TensorReader(source) as reader, ThreadPoolExecutor(1, thread_name_prefix="convert-fp8-write") as io:
        for writer, weight, scale in quantized:
            info = source.tensors[weight.source]
            rows, cols = matrix_shape(info.shape)
            row_bytes, step = cols * DTYPE_SIZES[info.dtype], quantizer.stripe_rows(info)
            keys = {first: _stripe_keys(writer.shard.name, weight, scale, cols, quantizer.block, first)
                    for first in range(0, rows, step)}
            kept_rows = [first for first, (fp8_key, scale_key) in keys.items() if fp8_key in done]
            for first in kept_rows:  # `done` holds only whole stripes (see _usable_pieces)
                n = (min(rows, first + step) - first) * row_bytes
                kept += n
                advance(n)
            writing = None
            for first, fp8, scale_inv, nbytes in quantizer.stripes(info, reader, skip=set(kept_rows).__contains__):
                if stop.is_set():
                    return kept
                if writing is not None:
                    writing.result()
                (_, _, start), (_, _, scale_start) = keys[first]
                writing = io.submit(_write_stripe, writer, manifest, weight.name, scale.name, start, fp8,
                                    scale_start, scale_inv)
                advance(nbytes)
            if writing is not None:
                writing.result()
            finished(weight)
    return kept


def _write_stripe(writer: ShardWriter, manifest: Manifest, weight: str, scale: str, start: int, fp8: np.ndarray,
                  scale_start: int, scale_inv: np.ndarray) -> None:
    """Write one stripe's FP8 bytes and its rows of inverse scales, then record both as done."""
    writer.write_at(weight, start, fp8)
    writer.write_at(scale, scale_start, scale_inv)
    shard = writer.shard.name
    manifest.record(Piece(shard, weight, start, fp8.nbytes, buffer_crc(fp8)))
    manifest.record(Piece(shard, scale, scale_start, scale_inv.nbytes, buffer_crc(scale_inv)))


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
