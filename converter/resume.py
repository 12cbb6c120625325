"""What a rerun keeps of an interrupted one: the run's record, the pieces whose bytes still check out, and the
keys under which the lanes record them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .checksum import file_crc
from .configs import DTYPE_SIZES, ConvertOptions, matrix_shape
from .errors import ConvertError, SourceError
from .hub import looks_like_repo_id
from .manifest import Manifest, PartLock, Piece, claim_run
from .source import SourceIndex, read_header
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


def verified_pieces(manifest: Manifest, staging: Path) -> dict[tuple[str, str, int], Piece]:
    """The recorded pieces whose bytes in the staged shards still match their CRC, every byte read back (see
    `checksum`)."""
    good, shards = {}, {}
    try:
        for key, piece in manifest.load().items():
            if piece.shard not in shards:  # (descriptor, tensors) of each staged shard, read once
                path = staging / piece.shard
                try:
                    shards[piece.shard] = (os.open(path, os.O_RDONLY), read_header(path).tensors)
                except (OSError, SourceError):
                    shards[piece.shard] = (None, {})
            fd, tensors = shards[piece.shard]
            info = tensors.get(piece.tensor)
            if fd is None or info is None or piece.start + piece.length > info.nbytes:
                continue
            if file_crc(fd, info.offset + piece.start, piece.length) == piece.crc:
                good[key] = piece
    finally:
        for fd, _ in shards.values():
            if fd is not None:
                os.close(fd)
    return good


def stripe_keys(shard: str, weight, scale, cols: int, block: int, first: int) -> tuple[tuple, tuple]:
    """Manifest keys of the stripe starting at row `first`: its FP8 bytes and its rows of scales (`block` weight
    rows per row of scales, of the scale tensor's dtype)."""
    row_bytes = scale.shape[-1] * DTYPE_SIZES[scale.dtype]
    return (shard, weight.name, first * cols), (shard, scale.name, first // block * row_bytes)


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
