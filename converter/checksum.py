"""CRCs of written pieces: what the resume manifest records, and checks again before a rerun keeps a piece.

Each piece gets a CRC32 of all its bytes, and a rerun reads every byte of a piece it keeps: a piece is recorded
only once its bytes were confirmed on disk, but a power cut, a disk that lost a write, or anything else that
changed the staged file since shows anywhere in a piece, not only at its ends. zlib's CRC32 runs at several GB/s
and releases the GIL; the rerun's cost is reading back what it keeps.
"""

from __future__ import annotations

import os
import zlib

READ_CHUNK = 2**20  # a piece is read back in chunks of this, so checking it needs no piece-sized buffer


def buffer_crc(data) -> int:
    """CRC32 of every byte of a buffer."""
    return zlib.crc32(memoryview(data).cast("B"))


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
