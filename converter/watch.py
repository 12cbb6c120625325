"""What follows a run's output shard by shard while the lanes write it: `OutputWatcher`.

The driver (`convert`) asks its watcher the same questions at the same points of every run, so a run has one
shape whoever watches. This base watches nothing: a plain run. `publish.Publisher` is the other one; it uploads
each shard once written and may remove it from the disk (`--no-keep-output`), which is why the questions are
about disk room, shards already done elsewhere, and when a shard may be written.
"""

from __future__ import annotations

from pathlib import Path

from .plan import ShardPlan


class OutputWatcher:
    """A watcher that follows nothing: every shard stays where the lanes write it."""

    #: `shard_closed` is wanted as soon as each shard is complete: the lanes order their copies so that shards
    #: complete early, in turn, rather than all near the end
    follows_shards = False
    #: `may_write` may wait (for earlier shards to leave the disk); the lanes then take their work in shard order
    holds_back_writes = False
    #: a finished output already in `--dst` ends the run at once (a watcher with work of its own left, such as a
    #: commit, says False and finishes it)
    ends_at_finished_output = True

    def disk_needed(self, shards: list[ShardPlan]) -> int:
        """Bytes of these shards the staging folder holds at most at once."""
        return sum(s.nbytes for s in shards)

    def check_names(self, paths: list[str], gitignore: str | None) -> None:
        """Before anything is written: refuse an output whose file names the destination would not keep."""

    def resume(self, run: str, done: dict, shards: list[ShardPlan], staging: Path) -> set[str]:
        """The run's identity and the pieces an earlier run left that still check out (`done`) are known: returns
        the shards that need no writing because they are already done elsewhere."""
        return set()

    def may_write(self, name: str, stop) -> None:
        """Called before each write into shard `name`; may wait until there is room for it."""

    def shard_closed(self, path: Path, shard: ShardPlan) -> None:
        """Every byte of `shard` is written at `path` (called from either lane)."""

    def all_written(self, staging: Path, shards: list[ShardPlan]) -> set[str]:
        """Every shard is written (some kept from an earlier run, never announced): returns those no longer on the
        disk, once the watcher is done with all of them."""
        return set()

    def holds_work_elsewhere(self) -> bool:
        """Whether, after a failure, the staged work must stay because records of it live elsewhere too."""
        return False
