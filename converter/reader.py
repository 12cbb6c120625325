"""Reading a source's tensor bytes: `TensorReader` (one tensor, a stripe of rows, or bytes straight from the disk
with O_DIRECT where the page cache does not hold them), from at most one open shard at a time, and the aligned
buffers those reads fill. A Hub source's shard is fetched on first read and its header checked against the plan's."""

from __future__ import annotations

import errno
import os

from pathlib import Path
from typing import Callable

import numpy as np

from .configs import DTYPE_SIZES
from .errors import SourceError, os_reason
from .source import SourceIndex, TensorInfo, read_header

def _check_same_header(path: Path, source: SourceIndex, shard: str) -> None:
    planned = {n: (t.dtype, t.shape, t.offset) for n, t in source.stored.tensors.items() if t.shard == shard}
    found = {n: (t.dtype, t.shape, t.offset) for n, t in read_header(path).tensors.items() if n in planned}
    if found != planned:
        raise SourceError(f"{path}: differs from the header the plan was made from (did the repository change?)")


DIRECT_ALIGN = 4096  # file offset, length and buffer alignment that O_DIRECT reads need on every file system


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc_cachestat():
    """The `cachestat` system call (Linux 6.5+, number 451 on every architecture), or None."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in
                    ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]

    def cachestat(fd: int, offset: int, length: int) -> int | None:
        stat = Stat()
        if libc.syscall(451, fd, ctypes.byref(Range(offset, length)), ctypes.byref(stat), 0) != 0:
            return None
        return stat.nr_cache

    return cachestat


_cachestat = _libc_cachestat()


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """Pages of a file range in the page cache, without reading anything; None where the kernel cannot say."""
    global _cachestat
    if _cachestat is None:
        return None
    pages = _cachestat(fd, offset, length)
    if pages is None:  # ENOSYS (a kernel before 6.5) or a file system without it: stop asking
        _cachestat = None
    return pages


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A byte buffer whose start is DIRECT_ALIGN-aligned, as `read_stripe` needs."""
    raw = np.empty(nbytes + DIRECT_ALIGN, np.uint8)
    shift = -raw.ctypes.data % DIRECT_ALIGN
    return raw[shift:shift + nbytes]


def adjacent_runs(items: list, place: Callable[[object], tuple[str, int, int]], max_gap: int, max_bytes: int,
                  joins: Callable[[object, object], bool] | None = None) -> list[list]:
    """`items`, in their order, in runs that one read can cover: `place(item)` is `(file, start, end)`; an item
    joins the run before it when it lies in the same file, starts at most `max_gap` bytes after the run's last
    item ends (never before), keeps the run within `max_bytes` from its start (a larger item stays alone) and,
    where given, `joins(last item, item)` agrees."""
    runs: list[list] = []
    run_file, run_start, run_end = None, 0, 0
    for item in items:
        file, start, end = place(item)
        if (runs and file == run_file and run_end <= start <= run_end + max_gap and end - run_start <= max_bytes
                and (joins is None or joins(runs[-1][-1], item))):
            runs[-1].append(item)
        else:
            runs.append([item])
            run_file, run_start = file, start
        run_end = end
    return runs


class AlignedBuffers:
    """Numbered byte buffers kept across stripes and tensors, each DIRECT_ALIGN-aligned and grown (never shrunk)
    when a larger one is asked for: reused, they spare a first touch of new pages per stripe."""

    def __init__(self, least: int = 0):
        self._least = least  # the smallest size a buffer is made with, so that small requests do not regrow it
        self._buffers: dict[int, np.ndarray] = {}

    def get(self, slot: int, nbytes: int) -> np.ndarray:
        """Buffer `slot`'s first `nbytes` bytes."""
        buf = self._buffers.get(slot)
        if buf is None or len(buf) < nbytes:
            buf = self._buffers[slot] = aligned_buffer(max(nbytes, self._least))
        return buf[:nbytes]


class TensorReader:
    """Reads tensor bytes from a source, holding at most one shard open.

    Use as a context manager; `read` returns raw bytes, `read_rows` a torch tensor of whole rows, `read_stripe`
    large ranges without the page cache.
    """

    reads_spans = True  # `read_stripe` may read past a tensor's end into the ones after it in the file

    def __init__(self, source: SourceIndex):
        self._source = source
        self._shard: str | None = None
        self._fd: int | None = None
        self._direct_fd: int | None = None  # the same shard opened with O_DIRECT; -1 where that is refused

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd, self._direct_fd, self._shard = None, None, None

    def fd_for(self, info: TensorInfo) -> int:
        """The open file descriptor of `info`'s shard (opening it, and closing the previous one). A Hub shard is
        downloaded first, and its header checked against the one the plan was made from."""
        if self._shard != info.shard:
            self.close()
            path = self._source.root / info.shard
            if self._source.provider is not None:
                path = self._source.provider.ensure(info.shard)
                _check_same_header(path, self._source, info.shard)
                self._source.provider.prefetch_after(info.shard)
            try:
                self._fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise SourceError(f"{path}: cannot open: {exc.strerror}") from None
            self._shard = info.shard
        return self._fd

    def read(self, info: TensorInfo, start: int = 0, length: int | None = None) -> bytearray:
        """Bytes `[start, start+length)` of the tensor's data."""
        length = info.nbytes - start if length is None else length
        buf = bytearray(length)
        self.read_into(info, start, memoryview(buf))
        return buf

    def read_into(self, info: TensorInfo, start: int, view: memoryview) -> None:
        """Fill `view` with the tensor's bytes from `start` (a reused buffer spares page faults per read)."""
        self._read_all(self.fd_for(info), view, info.offset + start, info)

    def read_stripe(self, info: TensorInfo, start: int, length: int, buffer: np.ndarray) -> memoryview:
        """Bytes `[start, start+length)` of the tensor, in `buffer` (from `aligned_buffer`, with room for
        `length + 2 * DIRECT_ALIGN` bytes); returns the view of `buffer` that holds them.

        What the page cache already holds is copied from it; the rest is read with O_DIRECT, straight from the
        disk into `buffer`. A source read once, as a conversion reads it, then costs no page-cache pages and no
        copy: on 2 cores the copy out of the page cache was the largest single cost of a conversion.
        """
        fd = self.fd_for(info)
        offset = info.offset + start
        window_start = offset - offset % DIRECT_ALIGN  # buffer[i] holds the file's byte window_start + i
        head = offset - window_start
        view = memoryview(buffer)[head:head + length]
        # Even a read that must not wait starts the kernel's readahead where it finds a page missing (up to
        # read_ahead_kb, 8 MiB on some disks): pages the direct read then reads again, and that the next stripe
        # copies out of the cache. So the cache is asked first, and used only when it holds the whole range.
        pages = cached_pages(fd, offset, length)
        whole = -(-(offset + length) // PAGE_SIZE) - offset // PAGE_SIZE
        done = self._read_cached(fd, view, offset) if pages is None or pages >= whole else 0
        direct = self._direct_for(info) if done < length else -1
        if direct < 0:  # O_DIRECT refused here (tmpfs, some FUSE file systems): the page cache it is
            self._read_all(fd, view[done:], offset + done, info)
            return view
        from_ = offset + done - (offset + done) % DIRECT_ALIGN
        end = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        target = memoryview(buffer)[from_ - window_start:end - window_start]
        got = 0
        while from_ + got < offset + length:
            try:
                n = os.preadv(direct, [target[got:]], from_ + got)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise self._read_error(exc, info) from None
                # opened with O_DIRECT, yet the read refused (some FUSE and network file systems): through the
                # page cache from here on
                os.close(direct)
                self._direct_fd = -1
                self._read_all(fd, view[done:], offset + done, info)
                return view
            if n == 0:
                raise SourceError(f"{self._source.root / info.shard}: truncated while reading {info.name}")
            got += n
        return view

    def _read_error(self, exc: OSError, info: TensorInfo) -> SourceError:
        return SourceError(f"{self._source.root / info.shard}: {os_reason(exc)} while reading {info.name}")

    @staticmethod
    def _read_cached(fd: int, view: memoryview, offset: int) -> int:
        """Copy what the page cache holds of the range, from its start, without waiting for the disk."""
        try:
            return os.preadv(fd, [view], offset, os.RWF_NOWAIT)
        except (BlockingIOError, OSError, AttributeError):  # nothing cached, or RWF_NOWAIT unsupported
            return 0

    def _read_all(self, fd: int, view: memoryview, offset: int, info: TensorInfo) -> None:
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as exc:
                raise self._read_error(exc, info) from None
            if n == 0:
                raise SourceError(f"{self._source.root / info.shard}: truncated while reading {info.name}")
            done += n

    def _direct_for(self, info: TensorInfo) -> int:
        if self._direct_fd is None:
            path = self._source.root / info.shard
            if self._source.provider is not None:
                path = self._source.provider.ensure(info.shard)
            try:
                self._direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except (OSError, AttributeError):  # AttributeError: a platform without O_DIRECT
                self._direct_fd = -1
        return self._direct_fd

    def read_rows(self, info: TensorInfo, first_row: int, end_row: int):
        """Rows `[first_row, end_row)` of a 2-D tensor, as a torch tensor of the source dtype."""
        import torch

        from .quantize import TORCH_DTYPES

        cols = info.shape[-1]
        itemsize = DTYPE_SIZES[info.dtype]
        raw = self.read(info, first_row * cols * itemsize, (end_row - first_row) * cols * itemsize)
        return torch.frombuffer(raw, dtype=TORCH_DTYPES[info.dtype]).reshape(end_row - first_row, cols)
