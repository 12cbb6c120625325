"""Publishing the output to the Hub (`--push-to-hub ORG/NAME`), through huggingface_hub's own upload API.

Before anything is converted, the token, the write access and the target are checked, and the repository (and
`--hub-branch`) created. Each output shard is uploaded as soon as its last byte is written and its header checks
against the plan, in a background thread while the next shards are converted: `preupload_lfs_files` stores its
bytes on the Hub (LFS blobs by sha256, or Xet storage when `hf_xet` is installed) without making them visible.
Once the output is complete, checked and in place, one `create_commit` adds the shards (referenced by the sha256
and size the client took from the written files), the index, config, card and other files; the repository's
file list and LFS sizes and hashes are then read back and compared. A repository is never seen half-written.

Nothing local is deleted, and nothing is recorded as uploaded, until the Hub has answered that it holds that
object: a shard is recorded only when the client says its blob is uploaded (a path the Hub's ignore rules drop is
an error naming the rule, checked before converting), and before the commit one LFS batch request asks which
recorded blobs the Hub still holds. An upload failure stops the conversion at once and keeps what it wrote.

A rerun of the same command resumes the conversion as usual, uploads only the blobs the Hub does not hold yet (the
LFS batch endpoint, or Xet's deduplication, says which), and commits. From the first upload until the commit,
`.convert-fp8.publish.json` (in the staging folder, then moved into `--dst` with the output) records what the
commit and a resume need: each shard's blob (name, size, sha256, and whether it was removed). A rerun goes
straight to the commit once the output is in place, and does not hash again a shard whose recorded blob it can
trust (`Publisher._trusted`). When the branch already holds exactly the output (a commit made by a run whose
answer was lost, or a finished run), nothing is committed and the run says so (`publish_commit`).

With `keep_output=False` (`--no-keep-output`) each shard is removed from the staging folder as soon as the Hub
has confirmed its blob, and the lanes write a shard only once every shard but the one before it is removed
(`may_write`): at most two output shards hold data on disk. The commit names the removed shards by the sha256 and
size recorded; the conversion's resume takes a shard recorded as removed as written, when the Hub still holds it.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import hub_commit as hc
from .configs import CONFIG_NAME, INDEX_NAME
from .errors import ConvertError, PublishError, UsageError
from .plan import ShardPlan
from .publish_commit import PENDING_RECORD, CommitPhase, CommitResult, _read_json, _Stopped  # noqa: F401 - re-exported
from .publish_record import check_scales, check_shard, covers, entry_ok, write_json
from .configs import STAGING_NAME
from .watch import OutputWatcher

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_UPLOADERS = 2  # two shards at a time: one is hashed (LFS path) while the other's bytes go up


@dataclass(frozen=True)
class PublishOptions:
    repo_id: str
    private: bool = False
    branch: str | None = None
    commit_message: str | None = None
    overwrite: bool = False
    keep_output: bool = True  # False: each shard is removed once its blob is on the Hub (--no-keep-output)

    def __post_init__(self):
        if not _REPO_ID.match(self.repo_id):
            raise UsageError(f"--push-to-hub {self.repo_id!r}: expected a Hub model repository id ORG/NAME")

    @property
    def where(self) -> str:
        return self.repo_id + (f"@{self.branch}" if self.branch else "")


class Publisher(CommitPhase, OutputWatcher):
    """Uploads one conversion's (or dequantization's) output to `options.repo_id` and commits it at once.

    `identity` (the command's options) is kept in the resume records: a rerun with other options does not commit
    an output the records were not written for."""

    follows_shards = True  # each shard is uploaded as soon as it is complete
    ends_at_finished_output = False  # a finished output may still wait for its commit (`pending`)

    def __init__(self, options: PublishOptions, dst: Path, identity: dict):
        from huggingface_hub import HfApi

        self.options, self.dst, self.identity = options, Path(dst), identity
        self.keep = options.keep_output
        self.holds_back_writes = not self.keep  # at most two shards on disk (`may_write`)
        self.api = HfApi()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # the conversion's bar is the one shown
        # shard name -> {"sha256", "size", "mtime_ns"[, "removed": True]} once its blob is on the Hub
        self.uploaded: dict[str, dict] = {}
        self.in_git: dict[str, int] = {}  # small shards the Hub keeps in git (name -> size): sent with the commit
        self.shards_sent = 0
        self.run: str | None = None  # the conversion's run identity, once known (`resume`)
        self._recorded: dict[str, dict] = {}  # an earlier run's `uploaded`, each entry trusted only once checked
        self._recorded_run: str | None = None
        self._covered: set[str] = set()  # staged shards whose every byte the conversion's manifest CRCs vouch for
        self._in_place = False
        self._announced: set[str] = set()
        self._on_disk: set[str] = set()  # written shards whose upload (and removal) is not over yet
        self._outstanding = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._record_lock = threading.Lock()
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._workers: list[threading.Thread] = []
        self.error: PublishError | None = None
        self.head: str | None = None  # the branch's commit when the run began
        self.replace = options.overwrite  # the commit deletes the files of the branch the output does not hold
        self.waiting = False  # --dst holds this command's finished output and record: only the commit is left
        self.finished: PublishError | None = None  # --dst holds a finished output, the repository a model
        self._order: list[str] = []  # the shards in the order the lanes write them (`may_write`)
        self._settled: set[str] = set()  # shards whose upload is over (removed, or kept in git until the commit)
        self._cleared: set[str] = set()  # shards `may_write` let the lanes write into

    # --- before the conversion -------------------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether `--dst` holds a complete output of this same command, waiting for its commit (a run stopped
        after the output was moved into place). Another command's record is refused. The record of a run stopped
        while converting (in the staging folder) is read for `resume`, when it is this command's."""
        staging = self.dst / STAGING_NAME
        in_place = not staging.is_dir()  # the record moves into place with the output (`finalize`)
        data = {}
        for record in [self.dst / PENDING_RECORD] if in_place else [staging / PENDING_RECORD,
                                                                    self.dst / PENDING_RECORD]:
            if record.is_file():
                data = _read_json(record)
                break
        else:
            return False
        same = (data.get("repo") == self.options.repo_id and data.get("branch") == self.options.branch
                and data.get("identity") == self.identity)
        if in_place and not same:
            raise UsageError(f"{self.dst}: holds a finished output waiting to be published with other options "
                             f"({PENDING_RECORD}); rerun that command, or pass --overwrite to convert again")
        if not same:
            return False  # another command's uploads: this run's record replaces it
        uploaded = data.get("uploaded") if isinstance(data.get("uploaded"), dict) else {}
        self._recorded = {n: e for n, e in uploaded.items() if entry_ok(e)}
        self._recorded_run = data.get("run")
        in_git = data.get("in_git") if isinstance(data.get("in_git"), dict) else {}
        self.in_git = {n: v for n, v in in_git.items() if isinstance(v, int)}
        removed = sorted(n for n, e in self._recorded.items() if e.get("removed"))
        if removed and self.keep:
            raise UsageError(f"{self.dst}: {len(removed)} shard(s) of this output were removed once uploaded "
                             "(--no-keep-output): rerun with --no-keep-output, or pass --overwrite to convert again")
        if in_place:  # the output passed its checks and moved into place: the removed shards are part of it
            self._in_place = self.waiting = True
            self.uploaded.update({n: self._recorded[n] for n in removed})
        return in_place  # its other shards are pre-uploaded again by `commit`, unless `_trusted`

    def forget(self) -> None:
        """--overwrite: an earlier run's record says nothing about the output this run writes."""
        (self.dst / PENDING_RECORD).unlink(missing_ok=True)
        (self.dst / STAGING_NAME / PENDING_RECORD).unlink(missing_ok=True)

    def open(self) -> None:
        """Check the token and the write access, create the repository (and branch) when missing, and refuse one
        that already holds a model unless `overwrite`, or unless it may hold this very output: a rerun with this
        command's record (`commit` compares first), or a finished output in `--dst` (`finished`)."""
        from huggingface_hub import get_token

        where = self.options.where
        if not get_token():
            raise PublishError(f"--push-to-hub {self.options.repo_id}: no Hugging Face token: set HF_TOKEN to a "
                               "write token, or run `hf auth login`")
        try:
            who = self.api.whoami()
        except Exception as exc:  # noqa: BLE001 - each kind becomes one message
            raise self._error(exc, "checking the token") from None
        role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise PublishError(f"{where}: the token of {who.get('name', '?')} is read-only; --push-to-hub needs a "
                               "token with write access")
        from huggingface_hub.errors import RevisionNotFoundError

        def create():
            self.api.create_repo(self.options.repo_id, private=self.options.private, exist_ok=True)
            if self.options.branch:
                try:
                    self.api.model_info(self.options.repo_id, revision=self.options.branch)
                except RevisionNotFoundError:  # a new branch, from main, whose files this commit replaces
                    self.api.create_branch(self.options.repo_id, branch=self.options.branch, exist_ok=True)
                    self.replace = True
            info = self.api.model_info(self.options.repo_id, revision=self.options.branch, files_metadata=False)
            if self.options.branch and not self.replace:  # still at main's commit: created by a run stopped early
                self.replace = self.api.model_info(self.options.repo_id).sha == info.sha
            return info

        info = self._retrying(create, "creating the repository")
        self.head = info.sha
        model = [s.rfilename for s in (info.siblings or []) if s.rfilename not in hc.HOUSEKEEPING]
        if model and not self.replace:
            refusal = PublishError(f"{where}: the repository already holds {len(model)} file(s) ({sorted(model)[0]}, "
                                   "...); pass --overwrite to replace them in one commit, or --hub-branch to stage "
                                   "on a branch")
            if self.waiting:
                return  # this command's output waits for its commit: `commit` first compares the branch with it
            if self._finished_here():
                self.finished = refusal  # `published` compares the branch with it
                return
            raise refusal

    def _finished_here(self) -> bool:
        """Whether `--dst` holds a finished output (in place, no staging folder, no upload record)."""
        return (self.dst.is_dir() and not (self.dst / STAGING_NAME).exists()
                and (self.dst / "config.json").is_file() and not (self.dst / PENDING_RECORD).exists())

    def check_names(self, paths: list[str], gitignore: str | None) -> None:
        """Before anything is converted: the Hub would store every shard, the index and the config (the
        repository's ignore rules, or the output's own .gitignore, `gitignore`, do not drop them)."""
        self._check_ignored(paths, gitignore)

    def _check_ignored(self, paths: list[str], gitignore: str | None) -> list[str]:
        """Raise for a shard, the index or the config that the ignore rules drop; return the other paths they drop
        (left out of the commit)."""
        dropped = self._retrying(lambda: hc.ignored(self.api, self.options.repo_id, self.options.branch, paths,
                                                    gitignore), "asking the Hub what it ignores")
        essential = [p for p in dropped if p.endswith(".safetensors") or p in (INDEX_NAME, CONFIG_NAME)]
        if essential:
            raise self._ignored(essential[0], gitignore)
        return dropped

    def _ignored(self, path: str, gitignore: str | None) -> PublishError:
        """An ignored file, named with the rule that drops it, where it can be read."""
        rules = "the output's .gitignore (copied from the source)" if gitignore is not None else \
            "the repository's .gitignore"
        text = gitignore if gitignore is not None else hc.repo_text(self.api, self.options.repo_id,
                                                                     self.options.branch, ".gitignore")
        rule = hc.ignore_rule(path, text)
        return PublishError(f"{self.options.where}: the Hub would not store {path}: {rules} ignores it"
                            + (f" (rule `{rule}`)" if rule else "") + "; remove that rule, then rerun the same command")

    # --- while the conversion runs ----------------------------------------------------------------------------

    def disk_needed(self, shards: list[ShardPlan]) -> int:
        """Bytes of shards the staging folder holds at most: all of them, or, removing each once uploaded, the
        two largest (one uploading while the next is written: `may_write`)."""
        sizes = sorted((s.nbytes for s in shards), reverse=True)
        return sum(sizes) if self.keep else sum(sizes[:2])

    def resume(self, run: str, done: dict, shards: list[ShardPlan], staging: Path) -> set[str]:
        """The conversion knows its run identity and which recorded pieces still check out (`done`): returns the
        shards an earlier run of this same conversion uploaded and removed, which are not written again, as long
        as the Hub still holds their blobs (asked in one LFS batch request); the others are converted again."""
        self.run = run
        self._order = [s.name for s in shards]
        if self._recorded_run != run:  # another conversion's shards (other source, options or tool)
            self._recorded, self.in_git = {}, {}
        pieces: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for piece in done.values():
            pieces.setdefault((piece.shard, piece.tensor), []).append((piece.start, piece.length))
        self._covered = {s.name for s in shards if all(covers(pieces.get((s.name, t.name), []), t.nbytes)
                                                       for t in s.tensors)}
        removed = {n: e for n, e in self._recorded.items() if e.get("removed")}
        if removed:
            kept = self._held({n: (e["size"], e["sha256"]) for n, e in removed.items()})
            for name in sorted(set(removed) - kept):
                log.warning("the Hub no longer holds the blob of %s, removed from this disk: converted again", name)
                del self._recorded[name]
            removed = {n: e for n, e in removed.items() if n in kept}
        for name in removed:
            self.uploaded[name] = self._recorded[name]
            (staging / name).unlink(missing_ok=True)  # a run killed between its record and its removal
        self._announced |= set(removed)
        self._settled |= set(removed)
        self._save()
        return set(removed)

    def may_write(self, name: str, stop) -> None:
        """Removing shards once uploaded: a lane writes into the shard at position i only once the shards before
        i - 1 are uploaded and removed, so that at most two shards hold data on disk; an upload failure stops it."""
        if self.keep or name in self._cleared:
            return
        position = self._order.index(name) if name in self._order else 0
        earlier = self._order[:max(0, position - 1)]
        with self._changed:
            while not all(n in self._settled for n in earlier):
                if self.error is not None:
                    raise self.error
                if stop.is_set() or self._stop.is_set():
                    raise stop.error or ConvertError("stopped")
                self._changed.wait(0.5)
            if self.error is not None:
                raise self.error
        self._cleared.add(name)

    def shard_closed(self, path: Path, shard: ShardPlan) -> None:
        """Every byte of a shard is written: upload it in the background. Called from the writing lanes; returns
        at once, or, removing shards once uploaded, once no earlier shard is left on disk. An upload that failed
        is raised here: it stops the conversion, which keeps what it wrote."""
        if self.error is not None:
            raise self.error
        with self._lock:
            if shard.name in self._announced:
                return
            self._announced.add(shard.name)
            self._on_disk.add(shard.name)
            self._outstanding += 1
            if not self._workers:
                # daemon threads: Ctrl-C must not wait for an upload in flight (a ThreadPoolExecutor's threads
                # are joined when Python exits)
                self._workers = [threading.Thread(target=self._work, daemon=True, name=f"convert-fp8-upload-{k}")
                                 for k in range(_UPLOADERS)]
                for worker in self._workers:
                    worker.start()
        log.debug("%s written: queued for upload", shard.name)
        self._queue.put((Path(path), shard))
        if not self.keep:
            self._wait(lambda: not self._on_disk - {shard.name})
        if self.error is not None:
            raise self.error

    def all_written(self, staging: Path, shards: list[ShardPlan]) -> set[str]:
        """Every shard is written (some perhaps kept from an earlier run, never announced): upload the rest and
        wait for all, before the shards are moved into place; a failed upload is raised. Returns the shards
        removed once uploaded."""
        for shard in shards:
            self.shard_closed(staging / shard.name, shard)
        self._wait(lambda: self._outstanding == 0)
        if self.error is not None:
            raise self.error
        return {name for name, blob in self.uploaded.items() if blob.get("removed")}

    def holds_work_elsewhere(self) -> bool:
        """Blobs are uploaded (and perhaps removed here): their record stays with the staged work."""
        return bool(self.uploaded)

    def _wait(self, done) -> None:
        """Wait until `done()` (checked under the lock), an upload failed, or the run stops. Waits in short steps:
        Ctrl-C reaches the main thread at once."""
        with self._changed:
            while not done() and not self._stop.is_set() and self.error is None:
                self._changed.wait(0.5)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._upload(*job)
            finally:
                with self._changed:
                    self._outstanding -= 1
                    self._on_disk.discard(job[1].name)
                    self._changed.notify_all()

    def _upload(self, path: Path, shard: ShardPlan) -> None:
        if self.error is not None or self._stop.is_set():  # one failure stops the uploads and the conversion
            return
        try:
            started = time.monotonic()
            header = check_shard(path, shard)
            if not self.keep:  # the output's self-check cannot read a removed shard's scales: checked here
                check_scales(path, shard, header)
            entry = self._trusted(path, shard.name)
            if entry is None:
                self._send(path, shard.name)
            else:
                with self._lock:
                    self.uploaded[shard.name] = entry
            if not self.keep and shard.name in self.uploaded:
                self._remove(path, shard.name)
            with self._lock:
                self._settled.add(shard.name)
            log.debug("%s uploaded in %.1f s", shard.name, time.monotonic() - started)
        except _Stopped:
            return
        except PublishError as exc:
            self.error = exc
        except ConvertError as exc:
            self.error = PublishError(str(exc))
        except Exception as exc:  # noqa: BLE001
            if self._stop.is_set():  # an upload cut off by the interrupt: nothing to report
                return
            self.error = self._error(exc, f"uploading {shard.name}")

    def _trusted(self, path: Path, name: str) -> dict | None:
        """The blob an earlier run recorded for this shard, if it is still this file's: then the shard is neither
        hashed nor sent again. Trusted only when the file has the recorded size and modification time (taken
        after its upload; every write since, by this tool or anything else, changes it) and, while staged, when
        every byte of it lies in pieces whose CRC-32C the conversion's manifest recorded and this run read back
        (`verified_pieces`): those are the bytes the earlier run wrote and hashed, and a shard of the same run
        identity is the same bytes. Once in place (the manifest is gone with the staging folder) the output has
        passed its self-check, and size and modification time decide, as they decide for a local source's shards
        (`manifest.source_stamp`). A wrong trust could only commit a blob other than the file's: the commit's
        read-back compares the repository with the sha256 recorded, not with the file. That the Hub still holds
        the blob is asked before the commit (`commit`)."""
        entry = self._recorded.get(name)
        if entry is None or entry.get("removed"):
            return None
        if hc.file_stamp(path) != (entry["size"], entry.get("mtime_ns")):
            return None
        if path.parent != self.dst and name not in self._covered:
            return None
        return entry

    def _send(self, path: Path, name: str) -> None:
        """Pre-upload one shard; recorded only once the client says the Hub holds it (a blob uploaded, or one the
        Hub answered it holds), or keeps it in git (then it goes with the commit)."""
        from huggingface_hub import CommitOperationAdd

        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        self._retrying(lambda: self.api.preupload_lfs_files(self.options.repo_id, additions=[op],
                                                            revision=self.options.branch, num_threads=1),
                       f"uploading {name}")
        if op._should_ignore:  # the client skipped it: the Hub would leave it out of the commit
            raise self._ignored(name, None)
        if op._upload_mode != "lfs":  # a small file the Hub keeps in git: it goes with the commit itself
            with self._lock:
                self.in_git[name] = op.upload_info.size
            self._save()
            return
        if not op._is_uploaded:
            raise PublishError(f"{self.options.where}: the Hub did not confirm the upload of {name}; rerun the same "
                               "command")
        with self._lock:
            self.uploaded[name] = {"sha256": op.upload_info.sha256.hex(), "size": op.upload_info.size,
                                   "mtime_ns": os.stat(path).st_mtime_ns}
            self.shards_sent += 1
        self._save()

    def _held(self, blobs: dict[str, tuple[int, str]]) -> set[str]:
        if not blobs:
            return set()
        return self._retrying(lambda: hc.held(self.api, self.options.repo_id, self.options.branch, blobs),
                              "asking the Hub which blobs it holds")

    def _remove(self, path: Path, name: str) -> None:
        """Remove an uploaded shard: recorded first, so that a rerun never looks for it."""
        with self._lock:
            self.uploaded[name] = {**self.uploaded[name], "removed": True}
        self._save()
        path.unlink(missing_ok=True)

    def _record(self) -> dict:
        with self._lock:
            return {"repo": self.options.repo_id, "branch": self.options.branch, "identity": self.identity,
                    "run": self.run, "uploaded": dict(self.uploaded), "in_git": dict(self.in_git)}

    def _save(self) -> None:
        """Write the record: in the staging folder while converting (it goes with the conversion's run: a run of
        other options or another source discards the folder, and the record with it; `finalize` moves it into
        place with the output), in `--dst` once the output is there."""
        folder = self.dst if self._in_place else self.dst / STAGING_NAME
        with self._record_lock:
            if folder.is_dir():
                write_json(folder / PENDING_RECORD, self._record())

    def close(self) -> None:
        """Tell the upload threads to stop, without waiting: one in flight is cut off when the process exits (the
        blobs already on the Hub, and the record of them, make the same command resume)."""
        self._stop.set()
        quiet = _QuietUploads()  # an upload cut off as the process ends must not print after its last line
        for handler in logging.getLogger("huggingface_hub").handlers:
            handler.addFilter(quiet)
        for _ in self._workers:
            self._queue.put(None)
        with self._changed:
            self._changed.notify_all()


class _QuietUploads(logging.Filter):
    """Drops what the client logs from the upload threads (retries of a request cut off) once they are told to
    stop."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.threadName.startswith("convert-fp8-upload")


def run_and_publish(run, dst: Path, target: PublishOptions, identity: dict):
    """`run(publisher)` (the conversion or dequantization, uploading its shards as they are written), then the
    commit. A `--dst` whose output of this same command is in place and only waits for its commit goes straight
    to the commit (not with `overwrite`, which converts again).

    Returns:
        `(summary, CommitResult)`; the summary is None when nothing was converted.
    """
    publisher = Publisher(target, dst, identity)
    try:
        waiting = not target.overwrite and publisher.pending()
        publisher.open()
        if target.overwrite:
            publisher.forget()
        if publisher.finished is not None:  # a finished output, and a repository holding a model
            return None, publisher.published()
        summary = None
        if not waiting:
            summary = run(publisher)
            publisher.output_in_place()
        return summary, publisher.commit()
    finally:
        publisher.close()
