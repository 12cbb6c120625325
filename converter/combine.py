"""Small writes gathered into larger ones: a per-expert MoE writes tens of thousands of weights of a few KB each,
and their scales; one system call, one page-cache copy and one manifest line for each cost more than the bytes.

The lanes write each shard's bytes in the order `write.data_order` lays them out, so the small writes into a
shard mostly follow each other in the file (the FP8 weights one after another, their scales one after another).
`WriteCombiner` keeps a few such runs in page-aligned buffers and hands each to its shard's writer as one write
once it is full, once a write does not continue it and another run must make room, or when the shard closes. A
run of whole pages then goes to the disk with O_DIRECT. Every piece of a run is recorded in the resume manifest
only once the run's bytes are written (`ShardWriter.write_run`), as it would be written alone; a run not yet
written when the conversion stops is simply not recorded, and a rerun writes its pieces again.
"""

from __future__ import annotations

import threading

from .reader import aligned_buffer

RUN_BYTES = 4 * 2**20  # the largest write a run becomes
RUNS = 4  # runs kept at once, over all shards: the FP8 bytes and the scales of the shard being written, and the
# shards a lane moved on from before the other lane finished them


class _Run:
    __slots__ = ("writer", "offset", "size", "buffer", "view", "pieces", "name", "doing")

    def __init__(self, writer, offset: int, buffer, name: str, doing: str):
        self.writer, self.offset, self.size, self.buffer, self.view = writer, offset, 0, buffer, memoryview(buffer)
        self.pieces: list = []
        self.name, self.doing = name, doing  # the first tensor written into it, for an error's message


class WriteCombiner:
    """Gathers small writes into runs that follow each other in one shard's file, RUNS of them at a time across
    all shards (RUNS x RUN_BYTES of buffers), and hands each run to its writer as one write. Safe to use from
    several threads: a run is written under the combiner's lock."""

    def __init__(self, runs: int = RUNS, run_bytes: int = RUN_BYTES):
        self._lock = threading.Lock()
        self._runs: list[_Run] = []  # least recently grown first
        self._free: list = []
        self._limit, self._run_bytes = runs, run_bytes

    def takes(self, nbytes: int) -> bool:
        return nbytes < self._run_bytes

    def add(self, writer, offset: int, view: memoryview, piece, name: str, doing: str) -> None:
        """Bytes `view` for file offset `offset` of `writer`'s shard, with their manifest piece (or None)."""
        with self._lock:
            run = next((r for r in self._runs if r.writer is writer and r.offset + r.size == offset), None)
            if run is not None and run.size + len(view) > self._run_bytes:
                self._write(run)
                run = None
            if run is None:
                if len(self._runs) >= self._limit:
                    self._write(self._runs[0])
                buffer = self._free.pop() if self._free else aligned_buffer(self._run_bytes)
                run = _Run(writer, offset, buffer, name, doing)
            else:
                self._runs.remove(run)
            self._runs.append(run)
            run.view[run.size:run.size + len(view)] = view
            run.size += len(view)
            if piece is not None:
                run.pieces.append(piece)

    def flush(self, writer) -> None:
        """Write every run of `writer` (before its shard is closed)."""
        with self._lock:
            for run in [r for r in self._runs if r.writer is writer]:
                self._write_one(run)

    def drop(self, writer) -> None:
        """Forget `writer`'s runs unwritten (its shard is abandoned; their pieces were never recorded)."""
        with self._lock:
            for run in [r for r in self._runs if r.writer is writer]:
                self._runs.remove(run)
                self._free.append(run.buffer)

    def _write(self, run: _Run) -> None:
        # a writer's runs go together, the others first: the scales gathered beside a run of FP8 weights are then
        # recorded with them, not only when the shard closes (a rerun keeps a stripe only with its scales)
        for other in [r for r in self._runs if r.writer is run.writer and r is not run]:
            self._write_one(other)
        self._write_one(run)

    def _write_one(self, run: _Run) -> None:
        self._runs.remove(run)
        try:
            run.writer.write_run(run.offset, run.view[:run.size], run.pieces, run.name, run.doing)
        finally:
            self._free.append(run.buffer)
