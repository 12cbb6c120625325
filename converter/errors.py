"""Errors of convert-fp8.

Every error a user can cause derives from `ConvertError`; its message names the file or tensor at fault and,
where there is one, the fix. The CLI prints it as one line and exits with `exit_code`.
"""


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
