"""CRCs of written pieces: what the resume manifest records, and checks again before a rerun keeps a piece.

Each piece gets two: a CRC32 of all its bytes, and one of its first and last 64 KiB. A rerun on the same boot of
the machine checks the sampled one: every recorded piece was in the file (the page cache) before it was recorded,
and the kernel writes it out even if the process was killed, so only a piece changed since can differ, which a
cut-short or overwritten piece shows at its ends. After the machine restarted (a crash, a power cut), pages that
never reached the disk read back as zeros anywhere in a piece: then every byte is checked. zlib's CRC32 runs at
several GB/s and releases the GIL.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

SAMPLE = 64 * 2**10
READ_CHUNK = 2**20  # a piece is read back in chunks of this, so checking it needs no piece-sized buffer


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:  # not Linux: every rerun checks every byte
        return None


BOOT_ID = _boot_id()


def _sampled(read, length: int) -> int:
    """CRC32 of a piece's first and last 64 KiB (the whole piece when shorter); `read(start, n)` gives bytes."""
    head = min(length, SAMPLE)
    crc = zlib.crc32(read(0, head))
    tail_start = max(head, length - SAMPLE)
    if tail_start < length:
        crc = zlib.crc32(read(tail_start, length - tail_start), crc)
    return crc


def buffer_crcs(data) -> tuple[int, int]:
    """(CRC32 of every byte, sampled CRC32) of a buffer."""
    view = memoryview(data).cast("B")
    return zlib.crc32(view), _sampled(lambda start, n: view[start:start + n], len(view))


def file_crc(fd: int, offset: int, length: int) -> int:
    """CRC32 of `length` bytes of a file from `offset`; a file shorter than that gives a different CRC."""
    crc, done = 0, 0
    while done < length:
        chunk = os.pread(fd, min(READ_CHUNK, length - done), offset + done)
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        done += len(chunk)
    return crc


def file_sampled_crc(fd: int, offset: int, length: int) -> int:
    return _sampled(lambda start, n: os.pread(fd, n, offset + start), length)


def file_crcs(fd: int, offset: int, length: int) -> tuple[int, int]:
    """(CRC32 of every byte, sampled CRC32) of a range of a file."""
    return file_crc(fd, offset, length), file_sampled_crc(fd, offset, length)
