"""The one driver of every run, driven by the plan: read the source (`origin`), plan, then write this run's shards
in two lanes (`lanes`, `decode`), keeping what an interrupted run left (`resume`), and complete the checkpoint
when every part is done (`finalize`). A conversion (BF16 or FP8 source) and `dequantize` (an FP8 source to 16
bits, `ConvertOptions.dtype`) differ only in their plan."""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import arch, transcode
from .configs import CONFIG_NAME, INDEX_NAME, OUTPUT_DTYPES, ConvertOptions
from .decode import main_lane
from .dialects import writer_for
from .dialects.decoded import decoded_view, requantized
from .errors import PublishError, UsageError
from .finalize import finalize_if_complete, finished_output, output_card
from .lanes import Progress, Stop, write_shards
from .manifest import RUN_FILE, Manifest, read_run, run_identity, source_stamp
from .plan import DECODE, QUANTIZE, SCALE, Plan, ShardPlan, make_plan
from .resume import claim_part, run_record, verified_pieces
from .origin import load_source
from .source import SourceIndex
from .stripes import Quantizer
from .configs import STAGING_NAME
from .output_dir import OutputDir
from .watch import OutputWatcher

@dataclass
class Summary:
    """What a finished run did."""

    dst: Path
    shards: int
    fp8_tensors: int
    copied_tensors: int  # an FP8 source's weights written in 16 bits are counted here too
    bytes_in: int
    bytes_out: int
    files_copied: int
    seconds: float
    peak_rss_bytes: int
    check_peak_rss_bytes: int = 0  # the process that asked transformers, where one was started
    resumed_bytes: int = 0
    finalized: bool = True
    notes: list[str] = field(default_factory=list)
    already_finished: str | None = None  # what showed that --dst already held this run's finished output
    decoded_tensors: int = 0  # FP8 weights of the source written in 16 bits


def prepare(options: ConvertOptions, check_arch_now: bool = True) -> tuple[SourceIndex, Plan, list[str]]:
    """Check paths, read headers and make the plan; nothing is written. With `check_arch_now` False the
    transformers cross-check is left to the caller.

    Returns:
        `(source, plan, notes)`; notes say what could not be checked.
    """
    try:
        source, plan, notes, _ = _prepare(options, check_arch_now, provisional=False)
    finally:
        arch.release()
    return source, plan, notes


def _prepare(options: ConvertOptions, check_arch_now: bool,
             provisional: bool) -> tuple[SourceIndex, Plan, list[str], bool]:
    """`prepare`; with `provisional`, a plan made without transformers' answer on the source's tensors where that
    answer is not known yet (computing it imports transformers and torch: seconds and hundreds of MB on a model's
    first conversion), so that writing starts at once; the last value says whether the plan is such a one (see
    `_arch_check`)."""
    source = load_source(options.src, options.dst, options.revision, options.low_disk, options.allow_external_links)
    if options.dtype is not None:  # dequantize: the FP8 source as its 16-bit view, written as it is
        view = decoded_view(source, OUTPUT_DTYPES[options.dtype])
        return view, transcode.decode_plan(view, options.max_shard_size), [], False
    source = transcode.source_to_convert(source, options.scheme)  # an FP8 source: as dequantize would write it
    pending = provisional and options.arch_check and not _loader_known(source, options)
    loader, notes = _loader(source, options) if options.arch_check and not pending else (None, [])
    plan = _plan(source, options, loader)
    preset_archs = options.preset.architectures
    archs = source.config.get("architectures") or []
    if preset_archs and not set(archs) & set(preset_archs):
        notes.append(f"preset {options.preset.name!r} is meant for {', '.join(preset_archs)}, not {archs}")
    if options.arch_check and check_arch_now:
        _note_once(notes, arch.cross_check(plan))
    if requantized(source):
        notes.append(f"the source is FP8 ({requantized(source)}): its weights are decoded as dequantize "
                     "decodes them and quantized again, a lossy step")
    return source, plan, notes, pending


def _loader_args(source: SourceIndex, options: ConvertOptions) -> tuple:
    return source.config, list(source.tensors), writer_for(options.scheme), options.exclude_patterns


def _loader_known(source: SourceIndex, options: ConvertOptions) -> bool:
    return arch.loader_fp8_tensors_known(*_loader_args(source, options))


def _loader(source: SourceIndex, options: ConvertOptions) -> tuple[arch.Placement | None, list[str]]:
    """Where transformers' FP8 loader puts the source's tensors (None where it cannot say, with a note)."""
    loader = arch.loader_fp8_tensors(*_loader_args(source, options))
    if isinstance(loader, str):
        return None, [f"architecture check skipped: {loader}; tensors are chosen by their names, dtypes and shapes "
                      "alone"]
    return loader, []


def _plan(source: SourceIndex, options: ConvertOptions, loader) -> Plan:
    return transcode.plan_for(make_plan(source, options.scheme, options.exclude_patterns, options.max_shard_size,
                                        loader), source)


class _PlanChanged(Exception):
    """Transformers' answer on the source's tensors gives another plan than the provisional one being written."""


def _arch_check(source: SourceIndex, options: ConvertOptions, plan: Plan,
                provisional: bool) -> tuple[list[str], int]:
    """The transformers cross-check, beside the writing. For a `provisional` plan, first transformers' answer on
    the source's tensors (then cached) and the plan it gives: another plan than the one being written raises
    `_PlanChanged` (the run starts again with it). Returns notes on what could not be checked, and the peak
    memory of the process that asked transformers (0 where none was needed)."""
    try:
        notes = []
        if provisional:
            loader, notes = _loader(source, options)
            if _plan(source, options, loader) != plan:
                raise _PlanChanged()
        _note_once(notes, arch.cross_check(plan))
    finally:
        asked_peak = arch.release()
    return notes, asked_peak


def _abandon(arch_check: _Background | None) -> None:
    """A failed run: the cross-check's question is dropped (its process killed) and its thread waited for."""
    if arch_check is not None:
        arch.release(now=True)
        arch_check.wait()


def _note_once(notes: list[str], note: str | None) -> None:
    """Add the cross-check's note unless choosing the tensors already said why transformers could not answer."""
    if note and not any(n.startswith(note) for n in notes):
        notes.append(note)


def _output_names(plan: Plan, source) -> list[str]:
    """The names the output will hold, as far as the plan knows them before writing."""
    return sorted({s.name for s in plan.shards} | set(plan.files_to_copy) | {INDEX_NAME, CONFIG_NAME, "README.md"})


def _copied_gitignore(plan: Plan, source) -> str | None:
    """The source's .gitignore, which the output will hold (and the commit bring), if it has one."""
    if ".gitignore" not in plan.files_to_copy:
        return None
    try:
        return (Path(source.root) / ".gitignore").read_text(errors="replace")
    except OSError:
        return None


def part_shards(plan: Plan, part: tuple[int, int]) -> list[ShardPlan]:
    """The output shards of part `(i, n)`: every n-th shard from the i-th (1-based), a fixed split."""
    i, n = part
    return [shard for k, shard in enumerate(plan.shards) if k % n == i - 1]


def convert(options: ConvertOptions, progress: Progress | None = None,
            on_start: Callable[[int], None] | None = None, watcher: OutputWatcher | None = None) -> Summary:
    """Convert `options.src` into `options.dst` (or, with `options.part`, one part of it).

    An earlier run of the same conversion killed half-way leaves its work in `DST/.convert-fp8.partial/`; this
    run keeps every piece of it that checks out and writes the rest.

    Args:
        options (`ConvertOptions`): what to convert, where and how.
        progress (`Callable[[int], None]`, *optional*): called with the number of source bytes done, per step.
        on_start (`Callable[[int], None]`, *optional*): called once, before anything is written, with the
            number of source bytes this run (or part) will go through.
        watcher (`watch.OutputWatcher`, *optional*): follows the shards as they are written; publishing's
            `Publisher` uploads each one, all before the output moves into place (the commit is the caller's,
            once the output is in place).

    Raises:
        ConvertError: any failure; by then what this run wrote has been removed (a part removes its own files).
    """
    try:  # a plan written before transformers' answer was known turned out not to be its plan: again, with it
        return _convert(options, progress, on_start, watcher, provisional=True)
    except _PlanChanged:
        return _convert(options, progress, on_start, watcher, provisional=False)


def _convert(options: ConvertOptions, progress: Progress | None, on_start: Callable[[int], None] | None,
             watcher: OutputWatcher | None, provisional: bool) -> Summary:
    started = time.monotonic()
    watcher = watcher or OutputWatcher()
    # a watcher that publishes each shard as it is written gets only final plans
    source, plan, notes, pending = _prepare(options, check_arch_now=False,
                                            provisional=provisional and not watcher.follows_shards)
    if watcher.ends_at_finished_output and not options.overwrite:
        checked = finished_output(options.dst, plan, source, lambda: output_card(plan, source, options))
        if checked is not None:
            return _finished_summary(options.dst, plan, source, started, notes, checked)
    out = OutputDir(options.dst, options.overwrite)
    out.check()
    mine = part_shards(plan, options.part)
    extra = sum((source.root / f).stat().st_size for f in plan.files_to_copy if (source.root / f).is_file())
    out.check_space(watcher.disk_needed(mine) + extra + 2**20, already=out.staged_bytes([s.name for s in mine]))
    progress = progress or (lambda n: None)
    part_source_bytes = sum(source.stored_nbytes(t.source) for s in mine for t in s.tensors if t.action != SCALE)
    if on_start:
        on_start(part_source_bytes)
    quantizer = Quantizer(plan.dialect, options.quantizer, options.device) if plan.scheme is not None else None
    # The cross-check builds the model on the meta device and places every output tensor (seconds on a large
    # model the first time; cached after), and on a model's first conversion checks the provisional plan: it runs
    # beside the writing; its failure stops the lanes at once and removes what this run wrote before anything is
    # moved.
    stop = Stop()
    check_peak = 0
    arch_check = (_Background(_arch_check, source, options, plan, pending, on_error=stop.fail)
                  if options.arch_check and plan.scheme is not None else None)
    stamp = source_stamp(source)
    identity = run_identity(source, plan, stamp)
    i, n = options.part
    claimed = claim_part(out, run_record(options, identity, stamp), options.overwrite, options.part)
    if claimed.taken_over:
        notes.append(claimed.taken_over)
    manifest = claimed.manifest
    finalized = False
    try:
        lane = main_lane(source, quantizer)
        gone: set[str] = set()  # shards done elsewhere (uploaded, removed)
        watcher.check_names(_output_names(plan, source), _copied_gitignore(plan, source))
        if claimed.resumed and not watcher.follows_shards:
            resumed_bytes = _write_resumed(out, mine, source, lane, progress, manifest, stop, watcher)
        else:
            done = verified_pieces(manifest, out.staging) if claimed.resumed else {}
            gone = watcher.resume(identity, done, mine, out.staging)
            gone_bytes = sum(source.stored_nbytes(t.source) for s in mine if s.name in gone for t in s.tensors
                             if t.action != SCALE)
            progress(gone_bytes)
            resumed_bytes = gone_bytes + write_shards(out, [s for s in mine if s.name not in gone], source, lane,
                                                      progress, manifest, done, claimed.resumed, stop, watcher)
        manifest.close()
        gone = watcher.all_written(out.staging, [s for s in mine if s.name not in gone])
        if arch_check is not None:
            check_notes, check_peak = arch_check.result()
            for note in check_notes:
                _note_once(notes, note)
        out.write_text(f"part-{i}-of-{n}.done", identity + "\n")
        claimed.lock.release()
        finalized = finalize_if_complete(out, plan, source, options, notes, removed=gone)
    except (KeyboardInterrupt, PublishError):  # the same command resumes: the uploads' record stays with the work
        claimed.release()
        _abandon(arch_check)
        raise
    except BaseException:
        claimed.release()
        if watcher.holds_work_elsewhere():  # blobs uploaded, perhaps removed here: keep their record
            raise
        if n == 1:
            out.abort()
        else:
            _remove_part(out, mine, manifest, i, n)
        _abandon(arch_check)
        raise
    finally:
        if quantizer is not None:
            quantizer.close()
    n_fp8 = sum(1 for s in mine for t in s.tensors if t.action == QUANTIZE)
    n_all = sum(len(s.tensors) for s in mine)
    return Summary(
        dst=options.dst,
        shards=len(mine),
        fp8_tensors=n_fp8,
        decoded_tensors=sum(1 for s in mine for t in s.tensors if t.action == DECODE),
        copied_tensors=n_all - 2 * n_fp8,
        bytes_in=part_source_bytes,
        bytes_out=sum(s.nbytes for s in mine),
        files_copied=len(plan.files_to_copy) if finalized else 0,
        seconds=time.monotonic() - started,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        check_peak_rss_bytes=check_peak,
        resumed_bytes=resumed_bytes,
        finalized=finalized,
        notes=notes,
    )


def _write_resumed(out: OutputDir, mine: list[ShardPlan], source: SourceIndex, lane, progress: Progress,
                   manifest: Manifest, stop: Stop, watcher: OutputWatcher) -> int:
    """A rerun: the shards the earlier run recorded nothing of are written while the recorded pieces of the
    others are read back and checked (a rerun's own cost, now beside the writing, not before it); then those
    shards, keeping the pieces that check out. Returns the source bytes kept."""
    recorded = manifest.load()  # before this run appends its own
    touched = {piece.shard for piece in recorded.values()}
    checking = _Background(verified_pieces, manifest, out.staging, recorded, on_error=stop.fail, name="check")
    try:
        kept = write_shards(out, [s for s in mine if s.name not in touched], source, lane, progress, manifest, {},
                            True, stop, watcher)
    finally:
        checking.wait()  # its reads are over before a failure removes the staged files
    done = checking.result()
    return kept + write_shards(out, [s for s in mine if s.name in touched], source, lane, progress, manifest, done,
                               True, stop, watcher)


def _finished_summary(dst: Path, plan: Plan, source: SourceIndex, started: float, notes: list[str],
                      checked: str) -> Summary:
    """A run whose output was already finished: nothing written."""
    n_fp8 = plan.count(QUANTIZE)
    return Summary(dst=Path(dst), shards=len(plan.shards), fp8_tensors=n_fp8, decoded_tensors=plan.count(DECODE),
                   copied_tensors=len(plan.tensors) - 2 * n_fp8, bytes_in=0, bytes_out=0, files_copied=0,
                   seconds=time.monotonic() - started,
                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, notes=notes,
                   already_finished=checked)


def _remove_part(out: OutputDir, mine: list[ShardPlan], manifest: Manifest, i: int, n: int) -> None:
    """A failed part removes its own shards and records, and leaves the other parts' work alone."""
    for path in [out.staging / s.name for s in mine] + [manifest.path, out.staging / f"part-{i}-of-{n}.done"]:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# What `finalize` reads of a conversion's run record and of its options (older records lack the other options).
_RUN_KEYS = {"src", "parts", "identity"}
_OPTION_KEYS = {"preset", "exclude", "block_size", "max_shard_size", "base_model"}


def finalize(dst: Path) -> Summary:
    """`convert-fp8 finalize`: complete a partitioned conversion whose parts have all finished."""
    from .presets import load_preset

    started = time.monotonic()
    staging = OutputDir(dst, overwrite=False).staging
    record = read_run(staging)
    if record.get("command") == "dequantize":
        raise UsageError(f"{dst}: holds an unfinished `convert-fp8 dequantize` run, not a conversion; rerun the "
                         "same `convert-fp8 dequantize` command to resume it")
    opts = record.get("options")
    if not isinstance(opts, dict) or _RUN_KEYS - set(record) or _OPTION_KEYS - set(opts):
        raise UsageError(f"{dst}: {STAGING_NAME}/{RUN_FILE} does not record a conversion's options, so finalize "
                         "cannot complete it; rerun the command that began it to resume it")
    n = record["parts"]
    options = ConvertOptions(
        src=record["src"], dst=Path(dst), preset=load_preset(opts["preset"]), revision=record.get("revision"),
        extra_excludes=tuple(opts["exclude"]), block_size=opts["block_size"],
        max_shard_size=opts["max_shard_size"], arch_check=opts.get("arch_check", True), base_model=opts["base_model"],
        allow_external_links=opts.get("allow_external_links", False), overwrite=True, part=(n, n),
        format=opts.get("format", "fp8"), quant_scheme=opts.get("scheme", "fp8-block"),
        scale_fmt=opts.get("scale_fmt", "float"),
    )
    source, plan, notes = prepare(options, check_arch_now=False)
    if run_identity(source, plan) != record["identity"]:
        raise UsageError(f"{record['src']}: the source or this tool changed since the parts ran; convert again")
    out = OutputDir(dst, overwrite=True)
    if not finalize_if_complete(out, plan, source, options, notes):
        raise UsageError(f"{dst}: cannot finalize: {notes[-1]}")
    n_fp8 = sum(1 for t in plan.tensors if t.action == QUANTIZE)
    return Summary(dst=Path(dst), shards=len(plan.shards), fp8_tensors=n_fp8,
                   copied_tensors=len(plan.tensors) - 2 * n_fp8, bytes_in=source.nbytes,
                   bytes_out=plan.output_nbytes, files_copied=len(plan.files_to_copy),
                   seconds=time.monotonic() - started,
                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, notes=notes)


class _Background:
    """Runs a function in a daemon thread; `result()` returns its value or raises its exception, which is also
    handed to `on_error` as soon as it happens."""

    def __init__(self, func, *args, on_error: Callable[[BaseException], None] | None = None, name: str = "arch"):
        self._value = self._error = None
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, args=(func, *args), daemon=True, name=f"convert-fp8-{name}")
        self._thread.start()

    def _run(self, func, *args):
        try:
            self._value = func(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._error = exc
            if self._on_error is not None:
                self._on_error(exc)

    def wait(self) -> None:
        self._thread.join()

    def result(self):
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value


