"""Sampled CRCs of written pieces: what the resume manifest records and checks."""

from __future__ import annotations

import os
import zlib

SAMPLE = 64 * 2**10


def sample_crc(read, length: int) -> int:
    """CRC32 of a piece's first and last 64 KiB (the whole piece when shorter); `read(start, n)` gives bytes."""
    head = min(length, SAMPLE)
    crc = zlib.crc32(read(0, head))
    tail_start = max(head, length - SAMPLE)
    if tail_start < length:
        crc = zlib.crc32(read(tail_start, length - tail_start), crc)
    return crc


def buffer_crc(data) -> int:
    view = memoryview(data).cast("B")
    return sample_crc(lambda start, n: view[start:start + n], len(view))


def file_crc(fd: int, offset: int, length: int) -> int:
    return sample_crc(lambda start, n: os.pread(fd, n, offset + start), length)
