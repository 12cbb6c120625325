"""Writing the output: shards header first then data in plan order, all under a staging folder that is moved
into place only when everything is complete (`config.json` last), and removed when anything fails.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from collections import deque
from json.encoder import encode_basestring_ascii as _json_string
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .checksum import buffer_crc, file_crc
from .errors import WriteError, os_error
from .manifest import Piece
from .plan import Plan, ShardPlan
from .reader import DIRECT_ALIGN, PAGE_SIZE

if TYPE_CHECKING:
    import numpy as np

_COPY_CHUNK = 16 * 2**20


def data_order(shard: ShardPlan) -> list:
    """The shard's tensors in the order their bytes lie in the file: those whose size is a multiple of
    DIRECT_ALIGN first (every FP8 weight of 64x64 or 128x128 tiles, most copied matrices), each in plan order.

    After a header padded to DIRECT_ALIGN, each of those then starts DIRECT_ALIGN-aligned, and so does every
    stripe of whole tile rows written into it: the writer sends such stripes to the disk with O_DIRECT, sparing
    the copy into the page cache. A tensor's place in the file changes nothing a reader sees (safetensors finds
    tensors by name); the order is a function of the plan alone, so reruns and parts agree on every offset.
    """
    return ([t for t in shard.tensors if t.nbytes % DIRECT_ALIGN == 0]
            + [t for t in shard.tensors if t.nbytes % DIRECT_ALIGN])


def shard_header(shard: ShardPlan) -> bytes:
    """See `_shard_header`; made once per shard plan and kept in its `__dict__` (a frozen dataclass's cache): the
    writer, the read-back and the self-check each need it, and an MoE shard's JSON takes a while to make."""
    header = shard.__dict__.get("_header")
    if header is None:
        header = shard.__dict__["_header"] = _shard_header(shard)
    return header


def read_back_header(path: Path, shard: ShardPlan) -> tuple[bool, bool]:
    """A written shard read back against its plan: `(header byte for byte the plan's, size the planned one)`.

    Raises:
        OSError: the file cannot be read.
    """
    want = shard_header(shard)
    with open(path, "rb") as f:
        got, size = f.read(len(want)), os.fstat(f.fileno()).st_size
    return got == want, size == len(want) + shard.nbytes


def _shard_header(shard: ShardPlan) -> bytes:
    """The complete safetensors header of a shard (length prefix included), from its plan alone.

    The JSON lists the tensors in plan order (the order a reader of this checkpoint meets them in), their bytes
    lie in `data_order` with consecutive offsets (safetensors sorts entries by offset before it checks that they
    tile the data); the JSON is padded with spaces (which safetensors itself pads with, to 8 bytes) so that the
    data starts DIRECT_ALIGN-aligned.
    """
    offsets, offset = {}, 0
    for t in data_order(shard):
        offsets[t.name] = (offset, offset + t.nbytes)
        offset += t.nbytes
    # what json.dumps(header, separators=(",", ":")) writes, formatted directly: an MoE shard lists thousands
    entries = "".join(f',{_json_string(t.name)}:{{"dtype":{_json_string(t.dtype)},"shape":[{",".join(map(str, t.shape))}]'
                      f',"data_offsets":[{offsets[t.name][0]},{offsets[t.name][1]}]}}' for t in shard.tensors)
    raw = ('{"__metadata__":{"format":"pt"}' + entries + "}").encode()
    raw += b" " * (-(8 + len(raw)) % DIRECT_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def index_json(plan: Plan) -> str:
    """`model.safetensors.index.json`: `total_size` counts tensor data bytes only, as transformers writes it."""
    return _index_json(plan.output_nbytes, plan.weight_map())


def _index_json(total_size: int, weight_map: dict[str, str]) -> str:
    """What json.dumps({"metadata": ..., "weight_map": sorted}, indent=2) writes, formatted directly: json's
    indented output is made in Python, slowly for an MoE's tens of thousands of names."""
    entries = ",\n".join(f"    {_json_string(name)}: {_json_string(shard)}" for name, shard in sorted(weight_map.items()))
    body = f"{{\n{entries}\n  }}" if entries else "{}"
    return f'{{\n  "metadata": {{\n    "total_size": {int(total_size)}\n  }},\n  "weight_map": {body}\n}}\n'


def config_json(plan: Plan) -> str:
    return json.dumps(plan.config, indent=2) + "\n"


# O_DIRECT writes cover whole pages of the page cache, so that no page holds both direct and buffered bytes
# (on kernels of 16 or 64 KiB pages fewer writes qualify; the file layout, 4 KiB-aligned, is the same everywhere)
_DIRECT_UNIT = max(DIRECT_ALIGN, PAGE_SIZE)
WRITE_BEHIND_BYTES = 256 * 2**20  # written bytes of a shard left to the page cache before the oldest must be on disk
_WRITE_BEHIND_MIN = 2**20  # smaller writes (scales, norms) are not pushed to the disk as they come


def _libc_sync_file_range():
    try:
        import ctypes

        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return func


_sync_file_range = _libc_sync_file_range()
_SYNC_WRITE, _SYNC_WAIT = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER


def _sync_range(fd: int, offset: int, length: int, flags: int) -> None:
    """`sync_file_range`, its failure raised as an OSError. A write-back error is reported once per open file and
    then cleared: a failure ignored here would let the final `fsync` return 0 over bytes that never reached the
    disk."""
    if _sync_file_range(fd, offset, length, flags) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _WriteBehind:
    """Streams a shard's large writes to the disk as they come, drops them from the page cache once there, and
    hands each written piece to `confirmed` only once its bytes are known to be on disk.

    Left to itself the kernel keeps every written page cached until memory runs out; on a conversion that writes
    tens of GB, each write then lands in a page the machine has not touched for long, and filling such pages
    (on virtual machines above all) cost more CPU than the quantization. Here writeback of each large range starts
    at once, and once more than WRITE_BEHIND_BYTES are in flight the oldest ranges are waited for, in the order
    they were written (small ones too), and the large ones dropped, so a small set of pages is reused. A wait that
    reports an error raises it; a range whose wait returned 0 is confirmed. Ranges still in flight are confirmed
    by the shard's final `fsync` (`flush`). The data path is unchanged: the page cache only ever holds what is on
    disk.
    """

    def __init__(self, fd: int, confirmed=None):
        self._fd = fd
        self._confirmed = confirmed or (lambda what: None)
        self._ranges: deque[tuple[int, int, object]] = deque()  # (offset, length, what) in the order written
        self._in_flight = 0
        self._lock = threading.Lock()
        self._waiting = threading.Lock()  # one waiter at a time: an error is reported to the first wait only

    def written(self, offset: int, length: int, what=None) -> None:
        """`length` bytes at `offset` were written; `what` (a piece) is confirmed once they are on disk."""
        large = length >= _WRITE_BEHIND_MIN
        if _sync_file_range is not None and (large or what is not None):  # small pieces too: see `settle`
            _sync_range(self._fd, offset, length, _SYNC_WRITE)
        with self._lock:
            self._ranges.append((offset, length, what))
            self._in_flight += length if large else 0
            over = _sync_file_range is not None and self._in_flight > WRITE_BEHIND_BYTES
        if not over:
            return
        with self._waiting:  # the other lane keeps writing meanwhile
            while True:
                with self._lock:
                    if self._in_flight <= WRITE_BEHIND_BYTES or not self._ranges:
                        return
                    start, n, done = self._ranges.popleft()
                    self._in_flight -= n if n >= _WRITE_BEHIND_MIN else 0
                _sync_range(self._fd, start, n, _SYNC_WAIT)
                if n >= _WRITE_BEHIND_MIN:
                    try:
                        os.posix_fadvise(self._fd, start, n, os.POSIX_FADV_DONTNEED)
                    except OSError:  # advice only: a file system that does not take it changes nothing written
                        pass
                if done is not None:
                    self._confirmed(done)

    def settle(self) -> None:
        """Confirm the small ranges at the head of the queue (their write-back started when they were written,
        so they are on disk by the time the next large write returns): without this, small pieces written
        between O_DIRECT writes (the scales of each stripe), which never fill the queue, would be recorded only
        by the shard's final `fsync`, and a rerun would redo every stripe of an unfinished shard."""
        if _sync_file_range is None:
            return
        with self._waiting:
            while True:
                with self._lock:
                    if not self._ranges or self._ranges[0][1] >= _WRITE_BEHIND_MIN:
                        return
                    start, n, done = self._ranges.popleft()
                if done is not None:  # nothing to record: the final fsync makes it durable
                    _sync_range(self._fd, start, n, _SYNC_WAIT)
                    self._confirmed(done)

    def flush(self) -> None:
        """`fsync` the file, then confirm every range still in flight."""
        with self._waiting:
            os.fsync(self._fd)
        with self._lock:
            left, self._ranges, self._in_flight = list(self._ranges), deque(), 0
        for _, _, done in left:
            if done is not None:
                self._confirmed(done)


class ShardWriter:
    """Writes one shard: the header from the plan first, then tensor data at the offsets the header declares.

    A state machine: `new` -> `open` (header written, file sized) -> `closed`. Every write names its tensor and
    a position inside it; since the header fixes every offset, tensors may be written in any order and from
    several threads, but each takes exactly its declared bytes: one byte more is refused, one fewer fails `close`.

    With a `manifest`, every write is a piece of the resume manifest, recorded by the writer itself and only once
    its bytes are confirmed on disk: when the write-back of its range returned without error, or after the
    shard's final `fsync`. The writer closes itself (that `fsync`) as soon as its last declared byte is written.
    """

    def __init__(self, path: Path, shard: ShardPlan, manifest=None, combiner=None):
        self.path = path
        self.shard = shard
        self._manifest = manifest
        self._combiner = combiner  # a `combine.WriteCombiner` that gathers small writes, shared by the writers
        self.state = "new"
        self._fd: int | None = None
        self._copy_fd: int | None = None  # a second descriptor, whose file position in-kernel copies may move
        self.resumed = False
        self._header = shard_header(shard)
        self._offsets: dict[str, tuple[int, int]] = {}  # name -> (absolute offset, nbytes)
        position = len(self._header)
        for t in data_order(shard):
            self._offsets[t.name] = (position, t.nbytes)
            position += t.nbytes
        self.file_size = position
        self._written = dict.fromkeys(self._offsets, 0)
        self._finished = 0  # data bytes written (or credited), of file_size - len(header)
        self._lock = threading.Lock()
        self._behind: _WriteBehind | None = None
        self._direct_fd: int | None = None  # the shard opened with O_DIRECT, once open; None where refused
        self.writes_direct = False  # whether aligned writes go with O_DIRECT (False once the file system refused)
        self.gate: Callable[[], None] | None = None  # called before each write: may wait for room on the disk

    def _expect(self, state: str) -> None:
        if self.state != state:
            raise WriteError(f"{self.path}: writer is {self.state!r}, expected {state!r}")

    def open(self, resume: bool = False) -> None:
        """Write the header; with `resume`, first keep a file an earlier run left with this very header and size
        (`resumed` tells which happened)."""
        self._expect("new")
        self.resumed = False
        try:
            if resume and self.path.is_file() and self.path.stat().st_size == self.file_size:
                with open(self.path, "rb") as f:
                    self.resumed = f.read(len(self._header)) == self._header
            flags = os.O_RDWR | os.O_CREAT | (0 if self.resumed else os.O_TRUNC)
            self._fd = os.open(self.path, flags, 0o644)
            if not self.resumed:
                _pwrite_all(self._fd, self._header, 0)
                os.ftruncate(self._fd, self.file_size)
        except OSError as exc:
            raise os_error(exc, self.path, "writing the header") from None
        try:  # opened here, before the lanes' threads share the writer
            self._direct_fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
            self.writes_direct = True
        except (OSError, AttributeError):  # tmpfs before Linux 6.6, some FUSE file systems; no O_DIRECT anywhere
            self._direct_fd, self.writes_direct = None, False
        self._behind = _WriteBehind(self._fd, self._record)
        self.state = "open"

    def _record(self, pieces: list) -> None:
        self._manifest.record(pieces)

    def _piece(self, name: str, start: int, nbytes: int, crc: Callable[[], int]) -> Piece | None:
        """The manifest piece of bytes just written; their CRC is computed only where there is a manifest."""
        return None if self._manifest is None else Piece(self.shard.name, name, start, nbytes, crc())

    def credit(self, name: str, nbytes: int) -> None:
        """Count bytes of `name` that an earlier run wrote and that were checked, as written."""
        self._claim(name, 0, nbytes)
        self._done(nbytes)

    def _done(self, nbytes: int) -> None:
        """`nbytes` more data bytes are written; the write that completes the shard closes it."""
        with self._lock:
            self._finished += nbytes
            complete = self._finished == self.file_size - len(self._header) and self.state == "open"
        if complete and nbytes:
            self.close()

    def _claim(self, name: str, start: int, nbytes: int) -> int:
        """Check a write of `nbytes` at `start` inside tensor `name`; returns its absolute file offset."""
        self._expect("open")
        if name not in self._offsets:
            raise WriteError(f"{self.path}: {name} is not a tensor of this shard")
        offset, declared = self._offsets[name]
        if start < 0 or start + nbytes > declared:
            raise WriteError(f"{self.path}: {name} would take bytes up to {start + nbytes}, declared {declared}")
        with self._lock:
            if self._written[name] + nbytes > declared:
                raise WriteError(f"{self.path}: {name} written past its {declared} declared bytes")
            self._written[name] += nbytes
        return offset + start

    def write_at(self, name: str, start: int, data, doing: str = "writing", gather: bool = True) -> None:
        """Write bytes (any buffer) of tensor `name` from byte `start` of the tensor (`doing` names the action in
        an error: "copying" for a tensor kept as it is). A small write is gathered with others (see `combine`)
        unless `gather` is False (the scales of a large stripe: recorded with it, not when a run fills).

        A large write whose file offset, length and buffer are all page-aligned (a stripe of whole tile rows
        from the quantize lane, a piece of a copied matrix, see `data_order`) goes straight to the disk with
        O_DIRECT: no copy into the page cache, no write-back to start and wait for later, and its piece is
        recorded as soon as the write returns, since its bytes are then in the file (durable after the shard's
        final fsync, as every piece is; a rerun reads every piece back anyway). Any other write goes through the
        page cache; the two never share a page.
        """
        if self.gate is not None:
            self.gate()
        view = memoryview(data).cast("B")
        offset = self._claim(name, start, len(view))
        piece = self._piece(name, start, len(view), lambda: buffer_crc(view))
        if self._combiner is not None and gather and len(view) < _WRITE_BEHIND_MIN:
            self._combiner.add(self, offset, view, piece, name, doing)
        else:
            self.write_run(offset, view, [piece] if piece is not None else [], name, doing)
        self._done(len(view))

    def write_run(self, offset: int, view: memoryview, pieces: list, name: str, doing: str = "writing") -> None:
        """Write bytes at an absolute file offset, already claimed, and record `pieces` (those bytes, one or
        several written pieces, see `combine`) once they are on disk; `name` is the first tensor written."""
        try:
            if not self._write_direct(view, offset):
                _pwrite_all(self._fd, view, offset)
                self._behind.written(offset, len(view), pieces or None)
            else:
                self._behind.settle()
                if pieces:
                    self._record(pieces)
        except OSError as exc:
            raise os_error(exc, self.path, f"{doing} {name}") from None

    def takes_direct(self, name: str, start: int, nbytes: int) -> bool:
        """Whether a write of `nbytes` at `start` of tensor `name`, from a page-aligned buffer, would go to the
        disk with O_DIRECT (as far as is known before trying)."""
        return self._direct_range(self._offsets[name][0] + start, nbytes)

    def _direct_range(self, offset: int, nbytes: int) -> bool:
        return self.writes_direct and nbytes >= _WRITE_BEHIND_MIN and (offset | nbytes) % _DIRECT_UNIT == 0

    def _write_direct(self, view: memoryview, offset: int) -> bool:
        """Write `view` at `offset` with O_DIRECT when everything is aligned and the file system takes it;
        False otherwise (the caller then writes it all through the page cache)."""
        fd = self._direct_fd  # read once: another lane's write may turn direct writes off meanwhile
        if fd is None or not self._direct_range(offset, len(view)) or _address(view) % _DIRECT_UNIT:
            return False
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(fd, view[done:], offset + done)
            except OSError as exc:
                # opened with O_DIRECT, yet the write refused (some network file systems), or a short write left
                # the rest unaligned: this range and every later one go through the page cache (the descriptor
                # is closed with the others, never while another lane may be using it)
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                self.writes_direct = False
                return False
        return True

    def write(self, name: str, data) -> None:
        """Append bytes to tensor `name` (for a writer fed by one thread, tensor by tensor)."""
        self.write_at(name, self._written.get(name, 0), data)

    def copy_at(self, name: str, start: int, src_fd: int, src_offset: int, nbytes: int,
                scratch: Callable[[int], np.ndarray]) -> None:
        """Copy `nbytes` of tensor `name` from another file, in the kernel where possible, else through the
        buffer `scratch(size)` returns (asked for only then, so that it costs no memory where the kernel copies).
        Meant for one copying thread per writer: in-kernel copies across file systems use a file position."""
        if self.gate is not None:
            self.gate()
        offset = self._claim(name, start, nbytes)
        done = 0
        try:
            if self._copy_fd is None:
                self._copy_fd = os.open(self.path, os.O_WRONLY)
            while done < nbytes:
                n = _copy_range(src_fd, src_offset + done, self._copy_fd, offset + done, nbytes - done, scratch)
                if n == 0:
                    raise WriteError(f"{self.path}: source ended while copying {name}")
                done += n
            piece = self._piece(name, start, nbytes, lambda: file_crc(self._fd, offset, nbytes))
            self._behind.written(offset, nbytes, [piece] if piece is not None else None)
        except OSError as exc:
            raise os_error(exc, self.path, f"copying {name}") from None
        self._done(nbytes)

    def close(self) -> None:
        """Check that every declared byte was written, flush to disk (then record the pieces still in flight) and
        close. A writer that closed itself once complete is left as it is."""
        if self.state == "closed":
            return
        self._expect("open")
        for name, (_, declared) in self._offsets.items():
            if self._written[name] != declared:
                raise WriteError(f"{self.path}: closed before {name} was complete "
                                 f"({self._written[name]} of {declared} bytes)")
        try:
            if self._combiner is not None:
                self._combiner.flush(self)
            self._behind.flush()
        except OSError as exc:
            raise os_error(exc, self.path, "flushing to disk") from None
        finally:
            self.abort()
        self.state = "closed"

    def abort(self) -> None:
        if self._combiner is not None and self.state != "closed":
            self._combiner.drop(self)
        for fd in (self._fd, self._copy_fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._copy_fd = self._direct_fd = None
        self.state = "aborted" if self.state != "closed" else self.state


def _address(view: memoryview) -> int:
    """The memory address of a buffer's first byte."""
    import ctypes

    if view.readonly:  # ctypes maps only writable buffers; a read-only one is copied into the page cache
        return 1
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


_in_kernel_copy = {"copy_file_range": hasattr(os, "copy_file_range"), "sendfile": hasattr(os, "sendfile")}
_UNSUPPORTED = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


def _copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int,
                scratch: Callable[[int], np.ndarray]) -> int:
    """Copy up to `count` bytes between absolute offsets, moving `dst_fd`'s position: `copy_file_range` within a
    file system, `sendfile` across them (one copy, in the kernel), else through the buffer `scratch(count)`."""
    count = min(count, _COPY_CHUNK)
    if _in_kernel_copy["copy_file_range"]:
        try:
            return os.copy_file_range(src_fd, dst_fd, count, src_offset, dst_offset)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            if exc.errno != errno.EXDEV:  # EXDEV is about this pair of file systems only
                _in_kernel_copy["copy_file_range"] = False
    if _in_kernel_copy["sendfile"]:
        try:
            os.lseek(dst_fd, dst_offset, os.SEEK_SET)
            return os.sendfile(dst_fd, src_fd, src_offset, count)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            _in_kernel_copy["sendfile"] = False
    view = memoryview(scratch(count))
    n = os.preadv(src_fd, [view], src_offset)
    _pwrite_all(dst_fd, view[:n], dst_offset)
    return n


