"""CRCs of written pieces: what the resume manifest records, and checks again before a rerun keeps a piece.

Each piece gets a CRC-32C of all its bytes, and a rerun reads every byte of a piece it keeps: a piece is recorded
only once its bytes were confirmed on disk, but a power cut, a disk that lost a write, or anything else that
changed the staged file since shows anywhere in a piece, not only at its ends. The CRC is CRC-32C, computed by the
CPU's own instruction (SSE 4.2, ARMv8 CRC) at about 11 GB/s: zlib's CRC32, at 2.8 GB/s on an AVX2 machine, was a
sixth of a per-expert MoE conversion's CPU. The rerun's cost is reading back what it keeps.
"""

from __future__ import annotations

import os

from crc32c import crc32c

READ_CHUNK = 2**20  # a piece is read back in chunks of this, so checking it needs no piece-sized buffer


def buffer_crc(data) -> int:
    """CRC-32C of every byte of a buffer."""
    return crc32c(memoryview(data).cast("B"))


def file_crc(fd: int, offset: int, length: int) -> int:
    """CRC-32C of `length` bytes of a file from `offset`; a file shorter than that gives a different CRC."""
    crc, done = 0, 0
    chunk = bytearray(min(READ_CHUNK, length))  # one buffer for the whole range: no fresh pages per chunk
    view = memoryview(chunk)
    while done < length:
        n = os.preadv(fd, [view[: min(READ_CHUNK, length - done)]], offset + done)
        if not n:
            break
        crc = crc32c(view[:n], crc)
        done += n
    return crc
