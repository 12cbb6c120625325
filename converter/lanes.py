"""The two writing lanes: a thread copies the tensors that stay as they are while the main thread reads,
quantizes (or, for `dequantize`, dequantizes) and writes the others, each at the offsets the shard headers fix."""

from __future__ import annotations

import functools
import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from .combine import WriteCombiner
from .configs import DTYPE_SIZES, matrix_shape
from .manifest import Manifest
from .plan import COPY, QUANTIZE, ShardPlan, TensorPlan
from .resume import (COPY_BUFFER_BYTES, scale_row_bytes, stripe_keys, stripe_offsets, usable_copy_pieces,
                     usable_stripe_pieces)
from .source import SourceIndex
from .reader import DIRECT_ALIGN, AlignedBuffers, TensorReader
from .stripes import Quantizer
from .write import ShardWriter
from .output_dir import OutputDir
from .watch import OutputWatcher

Progress = Callable[[int], None]
# A stripe's FP8 bytes below this are written by the quantizing thread itself: handing a write to the writing
# thread and back costs more than it overlaps (a per-expert MoE's weights are tens of thousands of small stripes)
INLINE_WRITE_BYTES = 1 << 20


class Stop:
    """The first failure of a lane or of a check running beside them, and the signal for every lane to stop.

    Lanes look at it between pieces (at most 16 MiB of work), so a failure anywhere ends the writing within a
    piece's time instead of after the whole output.
    """

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


class MainLane:
    """What the main thread writes beside the copy lane: `QuantizeLane`, an FP8 source's
    `DecodeLane` (`decode`). Its work items are tuples whose first two entries are the shard's writer and the planned
    tensor written; `run` calls `finished` with that tensor once it is written."""

    def items(self, writer: ShardWriter, tensors: list[TensorPlan]) -> list[tuple]:
        """The work items of one shard's planned tensors (in order) that this lane writes."""
        raise NotImplementedError

    def reads(self, tensor: TensorPlan) -> tuple[str, ...]:
        """The source shards a written tensor reads: the last of its tensors read releases a Hub download."""
        raise NotImplementedError

    def keep(self, done: dict, items: list[tuple]) -> dict:
        """The recorded pieces of `items` this lane skips."""
        raise NotImplementedError

    def run(self, items: list[tuple], stop: Stop, advance: Progress, done: dict, finished: Callable) -> int:
        """Write `items` through their writers (which record each piece once it is on disk), skipping the pieces
        in `done`; returns the source bytes kept."""
        raise NotImplementedError


def write_shards(out: OutputDir, shards: list[ShardPlan], source: SourceIndex, main_lane: MainLane,
                 progress: Progress, manifest: Manifest, done: dict, resume: bool, stop: Stop | None = None,
                 watcher: OutputWatcher | None = None) -> int:
    """Write the given shards: all headers first, then two lanes at once, each writing at the offsets the headers
    fix. A thread copies the tensors that stay as they are (in the kernel where it can), while the main thread
    runs `main_lane` on the others. Pieces in `done` are kept. The first error anywhere, or Ctrl-C, or a failure
    handed to `stop` from outside, stops both lanes and is raised.

    `watcher.shard_closed(path, shard)` is called (from either lane) once every byte of a shard is written, kept
    pieces included. Where the watcher holds back writes, `watcher.may_write(shard name, stop)` is called before
    each write into a shard and may wait (for the upload and removal of earlier shards, `--no-keep-output`); both
    lanes then take their work in the order of the shards, so that waiting for an earlier shard never waits for
    the other lane's later work.

    Returns:
        Source bytes whose output was kept from an earlier run.
    """
    combiner = WriteCombiner()  # the small writes of all shards, gathered (a per-expert MoE's many small weights)
    writers = {shard.name: ShardWriter(out.path(shard.name), shard, manifest, combiner) for shard in shards}
    copies, others = [], []
    for shard in shards:
        tensors = list(shard.tensors)
        copies += [(writers[shard.name], t) for t in tensors if t.action == COPY]
        others += main_lane.items(writers[shard.name], tensors)
    stop = stop or Stop()
    watcher = watcher or OutputWatcher()
    if watcher.holds_back_writes:
        for name, writer in writers.items():
            writer.gate = functools.partial(watcher.may_write, name, stop)
    lock = threading.Lock()
    reads = {t.name: (source.tensors[t.source].shard,) for _, t in copies}
    reads.update({t.name: main_lane.reads(t) for _, t, *_rest in others})
    pending: dict[str, int] = {}  # source shard -> tensors read from it still to write (to release Hub downloads)
    for shards_read in reads.values():
        for shard in shards_read:
            pending[shard] = pending.get(shard, 0) + 1

    owner = {t.name: shard.name for shard in shards for t in shard.tensors}
    units: dict[str, int] = {}  # output shard -> its work items (copies, main-lane items) not finished yet
    for writer, *_ in copies + others:
        units[writer.shard.name] = units.get(writer.shard.name, 0) + 1
    if watcher.follows_shards:  # small copies first: a shard is then complete once the main lane is past it, not
        # only after a large copy of an earlier shard (an embedding); within each source shard, so the reader does
        # not hop between shards (a Hub source would download them all at once)
        copies.sort(key=lambda item: (source.tensors[item[1].source].shard, item[1].nbytes))
    if watcher.holds_back_writes:  # a shard's copies, smallest first, before any of the next shard's
        order = {shard.name: k for k, shard in enumerate(shards)}
        copies.sort(key=lambda item: (order[item[0].shard.name], item[1].nbytes))

    def advance(nbytes: int) -> None:
        with lock:
            progress(nbytes)

    def finished(tensor: TensorPlan) -> None:
        for shard in reads[tensor.name]:
            with lock:
                pending[shard] -= 1
                last = pending[shard] == 0
            if last and source.provider is not None:
                source.provider.release(shard)
        if watcher.follows_shards:
            name = owner[tensor.name]
            with lock:
                units[name] -= 1
                complete = units[name] == 0
            if complete:
                watcher.shard_closed(writers[name].path, writers[name].shard)

    # Everything built so far (numba's and torch's modules, the plan, these tables) lives to the end: frozen, it is
    # no longer walked by every collection the lanes' allocations set off (a tenth of a per-expert MoE's CPU).
    gc.freeze()
    kept = 0
    try:
        for writer in writers.values():
            writer.open(resume=resume)
        fresh = {w.shard.name for w in writers.values() if not w.resumed}  # a shard begun anew keeps nothing
        done = {k: p for k, p in done.items() if p.shard not in fresh}
        done = {**usable_copy_pieces(done, copies), **main_lane.keep(done, others)}
        for piece in done.values():
            writers[piece.shard].credit(piece.tensor, piece.length)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-fp8-copy") as lane:
            copying = lane.submit(_failing_to, stop, _copy_lane, copies, source, stop, advance, done, finished)
            try:
                kept += main_lane.run(others, stop, advance, done, finished)
            except BaseException as exc:
                stop.fail(exc)
                if stop.error is not exc and not isinstance(exc, KeyboardInterrupt):
                    raise stop.error from None  # the first failure (the copy lane's disk full), not its echo here
                raise
            kept += copying.result()
        stop.raise_if_failed()  # a lane that saw the signal returned early: its shards are incomplete
        for writer in writers.values():  # each closes itself once complete; these were all kept from a rerun
            if writer.state == "open":
                writer.close()
    finally:
        for writer in writers.values():
            writer.abort()
        gc.unfreeze()  # a process that goes on (tests, a library caller) collects them again
    return kept


def _failing_to(stop: Stop, lane, *args):
    """Run a lane in its thread; its error, if any, also stops the other lane at once."""
    try:
        return lane(*args)
    except BaseException as exc:
        stop.fail(exc)
        raise


def _copy_lane(copies, source: SourceIndex, stop: Stop, advance: Progress, done: dict, finished: Callable) -> int:
    """Copy the tensors kept as they are, in pieces of COPY_BUFFER_BYTES.

    A piece the writer can send with O_DIRECT (a tensor of whole pages, see `write.data_order`: an embedding, a
    copied matrix) is read straight from the disk into one buffer, moved to a page-aligned one and written from
    there: two transfers the CPU does not touch and one copy in memory, where the kernel's in-file copy
    (`copy_file_range`) goes through the page cache on both sides and is then read back for its checksum. Other
    pieces are copied in the kernel.
    """
    # 0: a piece read straight from the disk; 1: the same piece, page-aligned for writing; 2: a copy the kernel
    # cannot make (a file system without copy_file_range and sendfile)
    aligned = AlignedBuffers()
    kept = 0
    with TensorReader(source) as reader:
        for writer, t in copies:
            info = source.tensors[t.source]
            shard = writer.shard.name
            for start in range(0, info.nbytes, COPY_BUFFER_BYTES):
                if stop.is_set():
                    return kept
                n = min(COPY_BUFFER_BYTES, info.nbytes - start)
                if (shard, t.name, start) in done:
                    kept += n
                    advance(n)
                    continue
                if writer.takes_direct(t.name, start, n):
                    read_buffer = aligned.get(0, COPY_BUFFER_BYTES + 2 * DIRECT_ALIGN)
                    data = np.frombuffer(reader.read_stripe(info, start, n, read_buffer), np.uint8)
                    out = aligned.get(1, COPY_BUFFER_BYTES)[:n]
                    np.copyto(out, data)
                    writer.write_at(t.name, start, out, "copying")
                else:
                    writer.copy_at(t.name, start, reader.fd_for(info), info.offset + start, n,
                                   lambda size: aligned.get(2, size))
                advance(n)
            finished(t)
    return kept


class QuantizeLane(MainLane):
    """The conversion's main lane: each FP8 weight is read, quantized and written with its scales, which the plan
    puts right after it."""

    def __init__(self, source: SourceIndex, quantizer: Quantizer):
        self.source, self.quantizer = source, quantizer

    def items(self, writer: ShardWriter, tensors: list[TensorPlan]) -> list[tuple]:
        return [(writer, t, tensors[k + 1]) for k, t in enumerate(tensors) if t.action == QUANTIZE]

    def reads(self, tensor: TensorPlan) -> tuple[str, ...]:
        return (self.source.tensors[tensor.source].shard,)

    def keep(self, done: dict, items: list[tuple]) -> dict:
        return usable_stripe_pieces(done, items, self.source, self.quantizer)

    def open_reader(self):
        """The reader of the source's weights (`transcode` decodes FP8 ones on the way)."""
        return TensorReader(self.source)

    def run(self, items: list[tuple], stop: Stop, advance: Progress, done: dict, finished: Callable) -> int:
        """Read, quantize and write the FP8 weights, each stripe with its scale rows, as one stream of stripes
        across weights; each stripe's write overlaps the next stripe's quantization (at most one write in flight,
        so the quantizer's two output buffers are never overwritten early)."""
        source, quantizer = self.source, self.quantizer
        kept = 0
        weights, places, left = [], [], []  # per item: (info, skip), (cols, bytes per row of scales), stripes to write
        for writer, weight, scale in items:
            info = source.tensors[weight.source]
            rows, cols = matrix_shape(info.shape)
            row_bytes, step = cols * DTYPE_SIZES[info.dtype], quantizer.stripe_rows(info)
            kept_rows = set()
            if done:  # `done` holds only whole stripes (see usable_stripe_pieces)
                kept_rows = {first for first in range(0, rows, step)
                             if stripe_keys(writer.shard.name, weight, scale, cols, quantizer.block, first)[0] in done}
            for first in kept_rows:
                n = (min(rows, first + step) - first) * row_bytes
                kept += n
                advance(n)
            weights.append((info, kept_rows.__contains__))
            places.append((cols, scale_row_bytes(scale)))
            left.append(-(-rows // step) - len(kept_rows))
        for k in (k for k, n in enumerate(left) if n == 0):
            finished(items[k][1])

        def written(k: int) -> None:
            left[k] -= 1
            if left[k] == 0:
                finished(items[k][1])

        with self.open_reader() as reader, ThreadPoolExecutor(1, thread_name_prefix="convert-fp8-write") as io:
            writing = None  # (future, item index) of the write in flight
            for k, first, fp8, scale_inv, nbytes in quantizer.stripes_of(weights, reader):
                if writing is not None:
                    writing[0].result()
                    written(writing[1])
                if stop.is_set():  # looked at after the wait, which a failure elsewhere may have outlasted
                    return kept
                writer, weight, scale = items[k]
                start, scale_start = stripe_offsets(*places[k], quantizer.block, first)
                if fp8.nbytes < INLINE_WRITE_BYTES:  # handing it over would cost more than writing it
                    _write_stripe(writer, weight.name, scale.name, start, fp8, scale_start, scale_inv)
                    writing = None
                    written(k)
                else:
                    writing = (io.submit(_write_stripe, writer, weight.name, scale.name, start, fp8, scale_start,
                                         scale_inv), k)
                advance(nbytes)
            if writing is not None:
                writing[0].result()
                written(writing[1])
        return kept


def _write_stripe(writer: ShardWriter, weight: str, scale: str, start: int, fp8: np.ndarray, scale_start: int,
                  scale_inv: np.ndarray) -> None:
    """Write one stripe's FP8 bytes and its rows of inverse scales (the writer records both once on disk). The
    scales of a small stripe are gathered with the next ones, as its FP8 bytes are; those of a large one are not:
    a rerun keeps a stripe only with its scales, and a run of them would fill only as the shard ends."""
    writer.write_at(weight, start, fp8)
    writer.write_at(scale, scale_start, scale_inv, gather=fp8.nbytes < INLINE_WRITE_BYTES)


