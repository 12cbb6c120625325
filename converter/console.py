"""What the commands print: a progress bar of source bytes, the summary of a run, the line of a finished output,
and every error as one line on stderr with its exit code (`run`); the library's warnings as `note:` lines."""

from __future__ import annotations

import logging
import os
import sys

import click

from .configs import format_size
from .errors import ConvertError

def with_progress_bar(run, options, desc: str, quiet: bool):
    """`run(options, progress=..., on_start=...)` with a bar of source bytes, opened once the run knows its total."""
    bars = []

    def start_bar(total: int):
        from tqdm import tqdm

        if bars:  # a run started again (its plan changed once transformers answered): the same bar, from zero
            bars[0].reset(total=total)
            return
        bars.append(tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                         disable=quiet or os.environ.get("CONVERT_FP8_NO_PROGRESS") == "1"))

    try:
        return run(options, progress=lambda n: bars[0].update(n), on_start=start_bar)
    finally:
        for bar in bars:
            bar.close()


def say_finished(summary) -> None:
    """The same command, run again after it finished: nothing to do, and how that was established."""
    click.echo(f"{summary.dst} already holds this command's finished output: nothing written (checked in "
               f"{summary.seconds:.1f} s: {summary.already_finished}; `convert-fp8 verify` checks every byte, "
               "--overwrite writes it again)")


def asked_memory(summary) -> str:
    """The peak memory of the process that asked transformers, beside the conversion's own."""
    if not summary.check_peak_rss_bytes:
        return ""
    return f" (and {format_size(summary.check_peak_rss_bytes)} in the process asking transformers)"


def print_summary(summary) -> None:
    for note in summary.notes:
        click.echo(f"note: {note}")
    if summary.resumed_bytes:
        click.echo(f"resumed: kept {format_size(summary.resumed_bytes)} of source already converted by an earlier run")
    click.echo(
        f"{summary.fp8_tensors} tensors to FP8, {summary.copied_tensors} copied, {summary.files_copied} other files; "
        f"{format_size(summary.bytes_in)} in, {format_size(summary.bytes_out)} out in {summary.shards} shard(s); "
        f"{summary.seconds:.1f} s ({format_size(int(summary.bytes_in / max(summary.seconds, 1e-9)))}/s); "
        f"peak memory {format_size(summary.peak_rss_bytes)}{asked_memory(summary)}"
    )


class _LibraryNotes(logging.Handler):
    """Warnings the library logs (on the `converter.*` loggers) as one `note:` line on stderr, above any bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(f"note: {record.getMessage()}", file=sys.stderr)


def run_command(debug: bool, func, **kwargs):
    """Call `func`; map every error to one line on stderr and a non-zero exit (traceback only with --debug)."""
    library = logging.getLogger("converter")
    if not any(isinstance(h, _LibraryNotes) for h in library.handlers):
        library.addHandler(_LibraryNotes(logging.WARNING))
    try:
        return func(**kwargs)
    except ConvertError as exc:
        if debug:
            raise
        click.echo(f"convert-fp8: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("convert-fp8: interrupted; the same command resumes the conversion (--overwrite with other "
                   "options discards it)", err=True)
        sys.exit(130)
    except BrokenPipeError:  # the reader of stdout went away (`| head -1`): stop quietly, as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + 13)
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"convert-fp8: error: {where}{(exc.strerror or str(exc)).lower()} (run with --debug for the "
                   "traceback)", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the one place unknown errors become one line
        if debug:
            raise
        click.echo(f"convert-fp8: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        sys.exit(1)
