"""CRCs of written pieces: what the resume manifest records, and checks again before a rerun keeps a piece.

Every byte of a piece is covered: a page that never reached the disk (a crash before writeback can leave holes
anywhere in a piece, not only at its ends) reads back as zeros and changes the CRC. zlib's CRC32 runs at several
GB/s and releases the GIL, so it costs a small fraction of the quantization.
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
