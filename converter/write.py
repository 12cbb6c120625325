"""Writing the output: shards header first then data in plan order, all under a staging folder that is moved
into place only when everything is complete (`config.json` last), and removed when anything fails.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

from .configs import CONFIG_NAME, INDEX_NAME
from .errors import UsageError, WriteError
from .plan import Plan, ShardPlan

STAGING_NAME = ".convert-fp8.partial"
_COPY_CHUNK = 64 * 2**20


def shard_header(shard: ShardPlan) -> bytes:
    """The complete safetensors header of a shard (length prefix included), from its plan alone.

    Tensors appear in plan order with consecutive offsets; the JSON is padded with spaces so that the data
    starts 8-byte aligned, as safetensors itself does.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard.tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def index_json(plan: Plan) -> str:
    """`model.safetensors.index.json`: `total_size` counts tensor data bytes only, as transformers writes it."""
    index = {"metadata": {"total_size": plan.output_nbytes}, "weight_map": dict(sorted(plan.weight_map().items()))}
    return json.dumps(index, indent=2) + "\n"


def config_json(plan: Plan) -> str:
    return json.dumps(plan.config, indent=2) + "\n"


def os_error(exc: OSError, path: Path | str, doing: str) -> WriteError:
    """One-line message for an OS error while writing, naming the file."""
    if exc.errno == errno.ENOSPC:
        return WriteError(f"{path}: disk full while {doing}; free space and run again")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return WriteError(f"{path}: permission denied while {doing}")
    if exc.errno == errno.EROFS:
        return WriteError(f"{path}: read-only file system while {doing}")
    return WriteError(f"{path}: {exc.strerror or exc} while {doing}")


class ShardWriter:
    """Writes one shard: the header from the plan, then each tensor's bytes in plan order.

    A state machine: `new` -> `open` (header written) -> `closed`. Every write names the tensor it belongs to,
    and must be the next one in the plan; a tensor takes exactly its declared bytes, no more and no fewer.
    """

    def __init__(self, path: Path, shard: ShardPlan):
        self.path = path
        self.shard = shard
        self.state = "new"
        self._fd: int | None = None
        self._index = 0  # current tensor in shard.tensors
        self._written = 0  # bytes of the current tensor so far

    def _expect(self, state: str) -> None:
        if self.state != state:
            raise WriteError(f"{self.path}: writer is {self.state!r}, expected {state!r}")

    def open(self) -> None:
        self._expect("new")
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._write_all(shard_header(self.shard))
        except OSError as exc:
            raise os_error(exc, self.path, "writing the header") from None
        self.state = "open"
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self.shard.tensors) and self.shard.tensors[self._index].nbytes == 0:
            self._index += 1

    def _claim(self, name: str, nbytes: int) -> None:
        self._expect("open")
        if self._index >= len(self.shard.tensors):
            raise WriteError(f"{self.path}: {name} written after the last tensor of the shard")
        current = self.shard.tensors[self._index]
        if current.name != name:
            raise WriteError(f"{self.path}: got data for {name}, but the next tensor in the header is {current.name}")
        if self._written + nbytes > current.nbytes:
            raise WriteError(f"{self.path}: {name} would take {self._written + nbytes} bytes, declared {current.nbytes}")

    def _advance(self, nbytes: int) -> None:
        self._written += nbytes
        if self._written == self.shard.tensors[self._index].nbytes:
            self._index += 1
            self._written = 0
            self._skip_empty()

    def write(self, name: str, data) -> None:
        """Append bytes (any buffer) of tensor `name`."""
        view = memoryview(data).cast("B")
        self._claim(name, len(view))
        try:
            self._write_all(view)
        except OSError as exc:
            raise os_error(exc, self.path, f"writing {name}") from None
        self._advance(len(view))

    def copy_from(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Append `nbytes` of tensor `name` straight from another file, without passing through Python objects."""
        self._claim(name, nbytes)
        done = 0
        try:
            while done < nbytes:
                n = _copy_range(src_fd, src_offset + done, self._fd, min(_COPY_CHUNK, nbytes - done))
                if n == 0:
                    raise WriteError(f"{self.path}: source ended while copying {name}")
                done += n
        except OSError as exc:
            raise os_error(exc, self.path, f"copying {name}") from None
        self._advance(nbytes)

    def close(self) -> None:
        """Check that every declared byte was written, flush to disk and close."""
        self._expect("open")
        if self._index < len(self.shard.tensors):
            missing = self.shard.tensors[self._index]
            raise WriteError(f"{self.path}: closed before {missing.name} was complete")
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise os_error(exc, self.path, "flushing to disk") from None
        finally:
            self.abort()
        self.state = "closed"

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.state = "aborted" if self.state != "closed" else self.state

    def _write_all(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            view = view[n:]


def _copy_range(src_fd: int, src_offset: int, dst_fd: int, count: int) -> int:
    """Copy up to `count` bytes at `src_offset` to the current position of `dst_fd` (which advances)."""
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(src_fd, dst_fd, count, src_offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    data = os.pread(src_fd, count, src_offset)
    view = memoryview(data)
    while view:
        view = view[os.write(dst_fd, view):]
    return len(data)


class OutputDir:
    """The destination folder. Everything is written under `<dst>/.convert-fp8.partial/` and moved into
    `<dst>` by `commit` (shards, then index and other files, `config.json` last); `abort` removes the staging
    folder, and `<dst>` too when this run created it.
    """

    def __init__(self, dst: Path, overwrite: bool):
        self.dst = Path(dst)
        self.overwrite = overwrite
        self.staging = self.dst / STAGING_NAME
        self._created_dst = False

    def check(self) -> None:
        """Refuse a `--dst` that is a file, or holds files of its own without `--overwrite`."""
        if self.dst.exists() and not self.dst.is_dir():
            raise UsageError(f"{self.dst}: --dst exists and is not a folder")
        if self.dst.is_dir() and not self.overwrite:
            own = sorted(p.name for p in self.dst.iterdir() if p.name != STAGING_NAME)
            if own:
                raise UsageError(
                    f"{self.dst}: --dst already holds {len(own)} file(s) ({own[0]}, ...); pass --overwrite to replace them"
                )

    def check_space(self, needed: int) -> None:
        """Refuse when the file system of `--dst` has less free space than the output needs."""
        probe = self.dst if self.dst.exists() else _existing_parent(self.dst)
        free = shutil.disk_usage(probe).free
        if free < needed:
            raise WriteError(
                f"{self.dst}: disk full: the output needs {needed:,} bytes, the file system has {free:,} free"
            )

    def open(self) -> None:
        try:
            if not self.dst.exists():
                self.dst.mkdir(parents=True)
                self._created_dst = True
            if self.staging.exists():  # left by a run that was killed
                shutil.rmtree(self.staging)
            self.staging.mkdir()
        except OSError as exc:
            raise os_error(exc, self.dst, "creating the output folder") from None

    def path(self, relative: str) -> Path:
        """Staging path for an output file (parent folders created)."""
        path = self.staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_text(self, relative: str, text: str) -> None:
        path = self.path(relative)
        try:
            with open(path, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise os_error(exc, path, f"writing {relative}") from None

    def copy_file(self, src: Path, relative: str) -> None:
        path = self.path(relative)
        try:
            shutil.copyfile(src, path)
            shutil.copymode(src, path)
        except OSError as exc:
            raise os_error(exc, path, f"copying {relative}") from None

    def commit(self) -> None:
        """Move the staged output into `<dst>`: everything else first, `config.json` last."""
        try:
            if self.overwrite:
                for entry in self.dst.iterdir():
                    if entry.name != STAGING_NAME:
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            names = sorted(p.name for p in self.staging.iterdir())
            order = [n for n in names if n.endswith(".safetensors")]
            order += [n for n in names if n not in order and n not in (INDEX_NAME, CONFIG_NAME)]
            order += [n for n in (INDEX_NAME, CONFIG_NAME) if n in names]
            for name in order:
                os.replace(self.staging / name, self.dst / name)
            _fsync_dir(self.dst)
            self.staging.rmdir()
        except OSError as exc:
            raise os_error(exc, self.dst, "moving the finished output into place") from None

    def abort(self) -> None:
        """Remove everything this run wrote."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._created_dst:
            try:
                self.dst.rmdir()
            except OSError:
                pass


def _existing_parent(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
