"""What a rerun keeps of an interrupted one: the run's record, the pieces whose bytes still check out, and the
keys under which the lanes record them."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .checksum import buffer_crc, file_crc
from .configs import DTYPE_SIZES, ConvertOptions, matrix_shape
from .errors import ConvertError, SourceError
from .hub import looks_like_repo_id
from .manifest import Manifest, PartLock, Piece, claim_run
from .reader import DIRECT_ALIGN, TensorReader, adjacent_runs, aligned_buffer
from .source import SourceIndex, TensorInfo, read_header
from .stripes import Quantizer
from .output_dir import OutputDir

COPY_BUFFER_BYTES = 16 * 2**20  # copied tensors move in pieces of this: the unit of progress, stops and resume


def source_name(src: Path | str) -> str:
    """`--src` as recorded: a Hub repo id as given, a folder as its absolute path."""
    return str(src) if looks_like_repo_id(src) else str(Path(src).resolve())


def run_record(options: ConvertOptions, identity: str, stamp: dict) -> dict:
    """What the staging folder records of a run: what `finalize` and a rerun read back."""
    if options.dtype is not None:
        return {"identity": identity, "source_stamp": stamp, "parts": 1, "tool": __version__, "command": "dequantize",
                "src": source_name(options.src), "revision": options.revision,
                "options": {"dtype": options.dtype, "max_shard_size": options.max_shard_size,
                            "base_model": options.base_model}}
    return {
        "identity": identity,
        "source_stamp": stamp,
        "parts": options.part[1],
        "tool": __version__,
        "src": source_name(options.src),
        "revision": options.revision,
        "options": {
            "preset": _preset_reference(options.preset),
            "exclude": list(options.extra_excludes),
            "block_size": options.block_size,
            "max_shard_size": options.max_shard_size,
            "arch_check": options.arch_check,
            "base_model": options.base_model,
            "allow_external_links": options.allow_external_links,
            "format": options.format,
            "scheme": options.quant_scheme,
            "scale_fmt": options.scale_fmt,
        },
    }


def _preset_reference(preset) -> str:
    """How `finalize` finds the preset again: its name, or a preset file's absolute path (a relative one would
    name another file, or none, from another folder); the run's identity shows whether it changed since."""
    origin = preset.origin or preset.name
    path = Path(origin)
    if path.suffix == ".json" and path.is_file():
        return str(path.resolve())
    return origin


@dataclass
class ClaimedPart:
    """This process's hold on its part of a run in the staging folder: the part's lock and manifest, and whether
    an earlier run left work to keep."""

    resumed: bool
    lock: PartLock
    manifest: Manifest
    taken_over: str | None  # a note when another host's lock on the part was taken over

    def release(self) -> None:
        """Close the manifest and give up the lock (either may be done already). Used on the way out of a run
        that failed or was interrupted: an error here (the disk that failed the run) must not hide the one that
        ended it; a manifest not flushed is still a valid prefix of the pieces on disk."""
        try:
            self.manifest.close()
        except (OSError, ConvertError):
            pass
        self.lock.release()


def claim_part(out: OutputDir, record: dict, overwrite: bool, part: tuple[int, int]) -> ClaimedPart:
    """Open the staging folder, claim it for the run `record` describes (`claim_run`), lock `part` and open its
    manifest.

    Raises:
        UsageError: the folder holds a different run, or another process on this host holds the part.
    """
    out.open()
    resumed = claim_run(out.staging, record, overwrite)
    lock = PartLock(out.staging, part)
    taken_over = lock.acquire()
    i, n = part
    return ClaimedPart(resumed, lock, Manifest(out.staging / f"manifest-part-{i}-of-{n}.jsonl"), taken_over)


CHECK_SPAN_BYTES = 32 * 2**20  # kept pieces are read back in spans of up to this, each one request to the disk
CHECK_GAP_BYTES = 2**20  # bytes between two kept pieces that a span reads through rather than around


def verified_pieces(manifest: Manifest, staging: Path,
                    recorded: dict[tuple[str, str, int], Piece] | None = None) -> dict[tuple[str, str, int], Piece]:
    """The recorded pieces (`recorded`, else those `manifest` holds) whose bytes in the staged shards still match
    their CRC, every byte read back (see `checksum`).

    The pieces are read in file order, in spans of up to CHECK_SPAN_BYTES (straight from the disk where the page
    cache does not hold them), the next span read while this one's pieces are checked: a rerun's cost is
    reading what it keeps, at the disk's speed, not one small read after another.
    """
    headers: dict[str, dict] = {}  # each staged shard's tensors, read once ({} where unreadable)
    located = []  # (shard, absolute offset, key, piece)
    for key, piece in (manifest.load() if recorded is None else recorded).items():
        if piece.shard not in headers:
            try:
                headers[piece.shard] = read_header(staging / piece.shard).tensors
            except (OSError, SourceError):
                headers[piece.shard] = {}
        info = headers[piece.shard].get(piece.tensor)
        if info is not None and piece.start + piece.length <= info.nbytes:
            located.append((piece.shard, info.offset + piece.start, key, piece))
    located.sort(key=lambda item: item[:2])
    spans = adjacent_runs(located, lambda item: (item[0], item[1], item[1] + item[3].length), CHECK_GAP_BYTES,
                          CHECK_SPAN_BYTES)
    if not spans:
        return {}
    folder = SourceIndex(root=staging, config={}, tensors={}, shards=tuple(headers), files_to_copy=())
    size = max(_span(span).nbytes for span in spans) + 2 * DIRECT_ALIGN
    buffers = [aligned_buffer(size), aligned_buffer(size)]
    good = {}
    with TensorReader(folder) as reader, ThreadPoolExecutor(1, thread_name_prefix="convert-fp8-check") as pool:
        def read(k: int):
            try:
                return reader.read_stripe(_span(spans[k]), 0, _span(spans[k]).nbytes, buffers[k % 2])
            except (OSError, SourceError):  # cut short, unreadable: what can be read is checked piece by piece
                return None

        reader.fd_for(_span(spans[0]))  # shards are opened here, not in the reading thread
        pending = pool.submit(read, 0)
        for k, span in enumerate(spans):
            data = pending.result()
            if k + 1 < len(spans):
                reader.fd_for(_span(spans[k + 1]))
                pending = pool.submit(read, k + 1)
            start = span[0][1]
            for shard, offset, key, piece in span:
                if data is not None:
                    crc = buffer_crc(data[offset - start:offset - start + piece.length])
                else:
                    crc = _file_crc(staging / shard, offset, piece.length)
                if crc == piece.crc:
                    good[key] = piece
    return good


def _span(span: list[tuple]) -> TensorInfo:
    """A span of kept pieces `[(shard, absolute offset, key, piece)]` as the reader's unit: a range of a file."""
    shard, start = span[0][0], span[0][1]
    length = span[-1][1] + span[-1][3].length - start
    return TensorInfo(name="kept pieces", dtype="U8", shape=(length,), shard=shard, offset=start, nbytes=length)


def _file_crc(path: Path, offset: int, length: int) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return file_crc(fd, offset, length)
    except OSError:
        return None
    finally:
        os.close(fd)


def stripe_keys(shard: str, weight, scale, cols: int, block: int, first: int) -> tuple[tuple, tuple]:
    """Manifest keys of the stripe starting at row `first`: its FP8 bytes and its rows of scales."""
    start, scale_start = stripe_offsets(cols, scale_row_bytes(scale), block, first)
    return (shard, weight.name, start), (shard, scale.name, scale_start)


def stripe_offsets(cols: int, scale_row_bytes: int, block: int, first: int) -> tuple[int, int]:
    """Where the stripe starting at row `first` lies in its tensors: the byte of its FP8 weight (one byte per
    value) and of its rows of scales (`block` weight rows per row of scales)."""
    return first * cols, first // block * scale_row_bytes


def scale_row_bytes(scale) -> int:
    """Bytes of one row of a scale tensor (planned or stored)."""
    return scale.shape[-1] * DTYPE_SIZES[scale.dtype]


def usable_copy_pieces(done: dict, copies) -> dict:
    """The recorded pieces the copy lane will skip: chunks on the chunk grid."""
    usable = {}
    for writer, t in copies:
        for start in range(0, t.nbytes, COPY_BUFFER_BYTES):
            key = (writer.shard.name, t.name, start)
            if key in done:
                usable[key] = done[key]
    return usable


def usable_stripe_pieces(done: dict, quantized, source: SourceIndex, quantizer: Quantizer) -> dict:
    """The recorded pieces the quantize lane will skip: stripes whose FP8 bytes and scale rows were both recorded
    (a run killed between the two redoes the stripe)."""
    usable = {}
    for writer, weight, scale in quantized:
        info = source.tensors[weight.source]
        rows, cols = matrix_shape(info.shape)
        for first in range(0, rows, quantizer.stripe_rows(info)):
            fp8_key, scale_key = stripe_keys(writer.shard.name, weight, scale, cols, quantizer.block, first)
            if fp8_key in done and scale_key in done:
                usable[fp8_key], usable[scale_key] = done[fp8_key], done[scale_key]
    return usable
