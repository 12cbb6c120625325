"""The output folder: its checks before a run (paths, free space, what it already holds), the staging folder
`DST/.convert-fp8.partial` every run writes into, and the move of the finished output into place, which a crash
at any point leaves either to be completed or not begun."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .configs import CONFIG_NAME, INDEX_NAME, STAGING_NAME
from .errors import SourceError, UsageError, WriteError, os_error, os_reason

_MOVING_NAME = "moving.json"  # in the staging folder while its output is moved into place


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
        above = _existing_parent(self.dst)
        if not self.dst.exists() and not above.is_dir():
            raise UsageError(f"{self.dst}: --dst lies under {above}, which is a file, not a folder")
        if self.dst.is_dir() and not self.overwrite:
            moving = set(self._moving())  # moved into place by a run killed while it did so: its own files
            own = sorted(p.name for p in self.dst.iterdir() if p.name != STAGING_NAME and p.name not in moving)
            if own:
                raise UsageError(
                    f"{self.dst}: --dst already holds {len(own)} file(s) ({own[0]}, ...); pass --overwrite to replace them"
                )

    def staged_bytes(self, names: list[str]) -> int:
        """Bytes of the named staged files that are on disk already (an earlier run's work, which this one may
        keep): blocks allocated, not lengths, since a shard is sized in full before its data is written."""
        allocated = 0
        for name in names:
            try:
                allocated += os.stat(self.staging / name).st_blocks * 512
            except FileNotFoundError:
                pass
        return allocated

    def check_space(self, needed: int, already: int = 0) -> None:
        """Refuse when the file system of `--dst` has less free space than the output needs (less what an earlier
        run already wrote)."""
        probe = self.dst if self.dst.exists() else _existing_parent(self.dst)
        usage = shutil.disk_usage(probe)
        if usage.total == 0:  # /proc, /sys: no room was ever there to fill
            raise UsageError(f"{self.dst}: --dst lies on a file system that stores no files ({probe} reports a size of 0, "
                             "as /proc and /sys do); choose a folder on a disk")
        free = usage.free
        needed = max(0, needed - already)
        if free < needed:
            raise WriteError(
                f"{self.dst}: disk full: the output needs {needed:,} bytes, the file system has {free:,} free"
            )

    def open(self) -> None:
        """Create `<dst>` and the staging folder; one left by a killed run stays, to be resumed or refused."""
        try:
            if not self.dst.exists():
                self.dst.mkdir(parents=True)
                self._created_dst = True
            self.staging.mkdir(exist_ok=True)
        except OSError as exc:
            raise os_error(exc, self.dst, "creating the output folder") from None

    def path(self, relative: str) -> Path:
        """Staging path for an output file (parent folders created)."""
        path = self.staging / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, path.parent, "creating an output folder") from None
        return path

    def write_text(self, relative: str, text: str) -> None:
        """Write a staged file and flush it to disk."""
        path = self.path(relative)
        try:
            with open(path, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise os_error(exc, path, f"writing {relative}") from None

    def copy_file(self, src: Path, relative: str) -> None:
        """Copy a file of the source into the staged output and flush it to disk."""
        path = self.path(relative)
        try:
            with open(src, "rb") as f:
                os.fstat(f.fileno())
        except OSError as exc:
            raise SourceError(f"{src}: cannot read this file of the source: {os_reason(exc)}") from None
        try:
            shutil.copyfile(src, path)
            shutil.copymode(src, path)
            _fsync(path)
        except OSError as exc:
            raise os_error(exc, path, f"copying {relative}") from None

    def _moving(self) -> list[str]:
        """The entries an interrupted `commit` was moving into place (none when no commit began)."""
        try:
            names = json.loads((self.staging / _MOVING_NAME).read_text())
        except (OSError, ValueError):
            return []
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def commit(self, names: list[str]) -> None:
        """Move the staged output entries `names` into `<dst>` (shards first, `config.json` last), then remove
        the staging folder with its run records. Every staged folder is flushed to disk before the moves, and
        `<dst>` and its parent after them: once this returns, a power cut leaves the output as it is now."""
        try:
            # what is about to move: a run killed during the moves leaves these in <dst>, and a rerun of the same
            # command takes them for its own output, not the user's files
            marker = self.staging / _MOVING_NAME
            with open(marker, "w") as f:
                json.dump(sorted(names), f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.staging)
            for name in names:  # the entries of staged sub-folders (`1_Pooling/`), which move as a whole
                top = self.staging / name
                if top.is_dir() and not top.is_symlink():
                    for folder in [top, *(p for p in top.rglob("*") if p.is_dir() and not p.is_symlink())]:
                        _fsync_dir(folder)
            if self.overwrite:
                for entry in self.dst.iterdir():
                    if entry.name != STAGING_NAME:
                        _remove(entry)
            order = sorted(n for n in names if n.endswith(".safetensors"))
            order += sorted(n for n in names if n not in order and n not in (INDEX_NAME, CONFIG_NAME))
            order += [n for n in (INDEX_NAME, CONFIG_NAME) if n in names]
            for name in order:
                os.replace(self.staging / name, self.dst / name)
            _fsync_dir(self.dst)
            _fsync_dir(self.dst.absolute().parent)
            self._remove_staging(marker)
        except OSError as exc:
            raise os_error(exc, self.dst, "moving the finished output into place") from None

    def _remove_staging(self, marker: Path) -> None:
        """Remove the staging folder, its `moving` marker last: a run killed while removing it leaves the marker,
        so the same command still takes the moved files for its own and completes the output again."""
        for entry in self.staging.iterdir():
            if entry != marker:
                _remove(entry)
        marker.unlink()
        self.staging.rmdir()

    def abort(self) -> None:
        """Remove everything this run wrote."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._created_dst:
            try:
                self.dst.rmdir()
            except OSError:
                pass


def _remove(entry: Path) -> None:
    """Remove a file, a link or a folder with its contents."""
    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _existing_parent(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
