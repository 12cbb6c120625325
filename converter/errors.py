"""Errors of convert-fp8.

Every error a user can cause derives from `ConvertError`; its message names the file or tensor at fault and,
where there is one, the fix. The CLI prints it as one line and exits with `exit_code`.
"""

from __future__ import annotations

import errno
from pathlib import Path


class ConvertError(Exception):
    """Base class: a conversion cannot go on, for a reason the message states."""

    exit_code = 1


class UsageError(ConvertError):
    """Options that contradict each other or the file system (`--dst` inside `--src`, say)."""

    exit_code = 2


class SourceError(ConvertError):
    """The source checkpoint is missing, unreadable or malformed."""


class PlanError(ConvertError):
    """The plan cannot be made: a preset, a block size or a module set that does not work."""


class QuantizeError(ConvertError):
    """A tensor cannot be quantized faithfully (NaN, Inf, or a scale that overflows)."""


class WriteError(ConvertError):
    """The output cannot be written: disk full, permission denied, or a writer used out of order."""


class PublishError(ConvertError):
    """The output cannot be published: no token, no write access, the repository exists, the Hub failed. Raised
    while converting, it stops the conversion and keeps what was written, with the record of the uploads, so that
    the same command resumes."""


def os_error(exc: OSError, path: Path | str, doing: str) -> WriteError:
    """One-line message for an OS error while writing, naming the file."""
    if exc.errno == errno.ENOSPC:
        return WriteError(f"{path}: disk full while {doing}; free space and run again")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return WriteError(f"{path}: permission denied while {doing}")
    if exc.errno == errno.EROFS:
        return WriteError(f"{path}: read-only file system while {doing}")
    return WriteError(f"{path}: {os_reason(exc)} while {doing}")


def os_reason(exc: OSError) -> str:
    """An OS error's reason as a message goes on: `input/output error`, `no such file or directory`."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]
