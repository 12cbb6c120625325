"""Publishing the output to the Hub (`--push-to-hub ORG/NAME`), through huggingface_hub's own upload API.

Before anything is converted, the token, the write access and the target are checked, and the repository (and
`--hub-branch`) created. Each output shard is uploaded as soon as its last byte is written and its header checks
against the plan, in a background thread while the next shards are converted: `preupload_lfs_files` stores its
bytes on the Hub (LFS blobs by sha256, or Xet storage when `hf_xet` is installed) without making them visible.
Once the output is complete, checked and in place, one `create_commit` adds the shards (referenced by the sha256
and size the client took from the written files), the index, config, card and other files; the repository's
file list and LFS sizes and hashes are then read back and compared. A repository is never seen half-written.

A rerun of the same command after a kill resumes the conversion as usual, uploads only the blobs the Hub does not
hold yet (the LFS batch endpoint, or Xet's deduplication, says which), and commits. From the first upload until
the commit, `.convert-fp8.publish.json` (in the staging folder, then moved into `--dst` with the output) records
what the commit and a resume need: each shard's blob (name, size, sha256, and whether it was removed). A rerun
goes straight to the commit once the output is in place, and does not hash again a shard whose recorded blob it
can trust (`Publisher._trusted`).

With `keep_output=False` (`--no-keep-output`) each shard is removed from the staging folder as soon as the Hub
has confirmed its blob, and the conversion waits before going past a completed shard while the one before it is
still on disk: about two output shards are on disk at a time. The commit names the removed shards by the sha256
and size recorded; the conversion's resume takes a shard recorded as removed as written.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConvertError, UsageError
from .plan import SCALE, ShardPlan
from .source import read_header
from .write import STAGING_NAME

log = logging.getLogger(__name__)

PENDING_RECORD = ".convert-fp8.publish.json"  # in the staging folder from the first upload, then in --dst until the commit
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SNAPSHOT = re.compile(r"^models--([^/]+?)--([^/]+)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Files of a repository that do not make it hold a model (created with the repository, or by the Hub).
_REPO_HOUSEKEEPING = {".gitattributes"}
_UPLOADERS = 2  # two shards at a time: one is hashed (LFS path) while the other's bytes go up


class PublishError(ConvertError):
    """The output cannot be published: no token, no write access, the repository exists, the Hub failed."""


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


def source_origin(source) -> tuple[str | None, str | None]:
    """The source's Hub id and commit when known: a Hub source's, or those a folder of the Hugging Face cache
    (`.../models--org--name/snapshots/<commit>`) is named by; `(None, None)` otherwise."""
    if source.name:
        return source.name, source.commit
    return cache_snapshot_origin(Path(source.root))


def cache_snapshot_origin(root: Path) -> tuple[str | None, str | None]:
    """`(org/name, commit)` for a snapshot folder of the Hugging Face cache, else `(None, None)`."""
    root = Path(root).absolute()
    if root.parent.name != "snapshots" or not _COMMIT.match(root.name):
        return None, None
    found = _SNAPSHOT.match(root.parent.parent.name)
    if not found:
        return None, None
    return f"{found.group(1)}/{found.group(2)}", root.name


def _retries() -> tuple[int, float]:
    """How often a failed request is tried again (after a network failure or an HTTP 429/5xx, beyond the
    client's own retries), and the first wait in seconds, doubled each time."""
    return (int(os.environ.get("CONVERT_FP8_PUBLISH_RETRIES", "3")),
            float(os.environ.get("CONVERT_FP8_PUBLISH_BACKOFF", "5")))


class _Stopped(Exception):
    """The run is being interrupted: an upload thread gives up where it is."""


class Publisher:
    """Uploads one conversion's (or dequantization's) output to `options.repo_id` and commits it at once.

    `identity` (the command's options) is kept in the resume records: a rerun with other options does not commit
    an output the records were not written for."""

    def __init__(self, options: PublishOptions, dst: Path, identity: dict):
        from huggingface_hub import HfApi

        self.options, self.dst, self.identity = options, Path(dst), identity
        self.keep = options.keep_output
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
        self._recorded = {n: e for n, e in uploaded.items() if _entry_ok(e)}
        self._recorded_run = data.get("run")
        in_git = data.get("in_git") if isinstance(data.get("in_git"), dict) else {}
        self.in_git = {n: v for n, v in in_git.items() if isinstance(v, int)}
        removed = sorted(n for n, e in self._recorded.items() if e.get("removed"))
        if removed and self.keep:
            raise UsageError(f"{self.dst}: {len(removed)} shard(s) of this output were removed once uploaded "
                             "(--no-keep-output): rerun with --no-keep-output, or pass --overwrite to convert again")
        if in_place:  # the output passed its checks and moved into place: the removed shards are part of it
            self._in_place = True
            self.uploaded.update({n: self._recorded[n] for n in removed})
        return in_place  # its other shards are pre-uploaded again by `commit`, unless `_trusted`

    def forget(self) -> None:
        """--overwrite: an earlier run's record says nothing about the output this run writes."""
        (self.dst / PENDING_RECORD).unlink(missing_ok=True)
        (self.dst / STAGING_NAME / PENDING_RECORD).unlink(missing_ok=True)

    def open(self) -> None:
        """Check the token and the write access, create the repository (and branch) when missing, and refuse one
        that already holds a model unless `overwrite`."""
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

        try:
            self.api.create_repo(self.options.repo_id, private=self.options.private, exist_ok=True)
            if self.options.branch:
                try:
                    self.api.model_info(self.options.repo_id, revision=self.options.branch)
                except RevisionNotFoundError:  # a new branch, from main, whose files this commit replaces
                    self.api.create_branch(self.options.repo_id, branch=self.options.branch, exist_ok=True)
                    self.replace = True
            info = self.api.model_info(self.options.repo_id, revision=self.options.branch, files_metadata=False)
            files = [s.rfilename for s in (info.siblings or [])]
            if self.options.branch and not self.replace:  # still at main's commit: created by a run stopped early
                self.replace = self.api.model_info(self.options.repo_id).sha == info.sha
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "creating the repository") from None
        self.head = info.sha
        model = [f for f in files if f not in _REPO_HOUSEKEEPING]
        if model and not self.replace:
            raise PublishError(f"{where}: the repository already holds {len(model)} file(s) ({sorted(model)[0]}, "
                               "...); pass --overwrite to replace them in one commit, or --hub-branch to stage on a "
                               "branch")

    # --- while the conversion runs ----------------------------------------------------------------------------

    def disk_needed(self, shards: list[ShardPlan]) -> int:
        """Bytes of shards the staging folder holds at most: all of them, or, removing each once uploaded, the
        two largest (one uploading while the next is written)."""
        sizes = sorted((s.nbytes for s in shards), reverse=True)
        return sum(sizes) if self.keep else sum(sizes[:2])

    def resume(self, run: str, done: dict, shards: list[ShardPlan], staging: Path) -> set[str]:
        """The conversion knows its run identity and which recorded pieces still check out (`done`): returns the
        shards an earlier run of this same conversion uploaded and removed, which are not written again."""
        self.run = run
        if self._recorded_run != run:  # another conversion's shards (other source, options or tool)
            self._recorded, self.in_git = {}, {}
        pieces: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for piece in done.values():
            pieces.setdefault((piece.shard, piece.tensor), []).append((piece.start, piece.length))
        self._covered = {s.name for s in shards if all(_covers(pieces.get((s.name, t.name), []), t.nbytes)
                                                       for t in s.tensors)}
        removed = {n for n, e in self._recorded.items() if e.get("removed")}
        for name in removed:
            self.uploaded[name] = self._recorded[name]
            (staging / name).unlink(missing_ok=True)  # a run killed between its record and its removal
        self._announced |= removed
        return removed

    def shard_written(self, path: Path, shard: ShardPlan) -> None:
        """Every byte of a shard is written: upload it in the background. Called from the writing lanes; returns
        at once, or, removing shards once uploaded, once no earlier shard is left on disk."""
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

    def shards_written(self, staging: Path, shards: list[ShardPlan]) -> None:
        """Every shard is written (some perhaps kept from an earlier run, never announced): upload the rest and
        wait for all, before the shards are moved into place. A failed upload is not raised here (the conversion
        completes and is kept) but by `commit`."""
        for shard in shards:
            self.shard_written(staging / shard.name, shard)
        self._wait(lambda: self._outstanding == 0, until_error=False)

    def _wait(self, done, until_error: bool = True) -> None:
        """Wait until `done()` (checked under the lock), an upload failed (with `until_error`), or the run stops.
        Waits in short steps: Ctrl-C reaches the main thread at once."""
        with self._changed:
            while not done() and not self._stop.is_set() and not (until_error and self.error is not None):
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
        if self.error is not None or self._stop.is_set():  # one failure stops the uploads; the conversion goes on
            return
        try:
            started = time.monotonic()
            header = _check_shard(path, shard)
            if not self.keep:  # the output's self-check cannot read a removed shard's scales: checked here
                _check_scales(path, shard, header)
            entry = self._trusted(path, shard.name)
            if entry is None:
                self._send(path, shard.name)
            else:
                with self._lock:
                    self.uploaded[shard.name] = entry
            if not self.keep and shard.name in self.uploaded:
                self._remove(path, shard.name)
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
        if self.error is not None:
            log.warning("%s; the conversion goes on, and the same command publishes it once it is done", self.error)

    def _trusted(self, path: Path, name: str) -> dict | None:
        """The blob an earlier run recorded for this shard, if it is still this file's: then the shard is neither
        hashed nor sent again. Trusted only when the file has the recorded size and modification time (taken
        after its upload; every write since, by this tool or anything else, changes it) and, while staged, when
        every byte of it lies in pieces whose CRC-32C the conversion's manifest recorded and this run read back
        (`verified_pieces`): those are the bytes the earlier run wrote and hashed, and a shard of the same run
        identity is the same bytes. Once in place (the manifest is gone with the staging folder) the output has
        passed its self-check, and size and modification time decide, as they decide for a local source's shards
        (`manifest.source_stamp`). A wrong trust could only commit a blob other than the file's: the commit's
        read-back compares the repository with the sha256 recorded, not with the file."""
        entry = self._recorded.get(name)
        if entry is None or entry.get("removed"):
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_size != entry["size"] or st.st_mtime_ns != entry.get("mtime_ns"):
            return None
        if path.parent != self.dst and name not in self._covered:
            return None
        return entry

    def _send(self, path: Path, name: str) -> None:
        from huggingface_hub import CommitOperationAdd

        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        self._retrying(lambda: self.api.preupload_lfs_files(self.options.repo_id, additions=[op],
                                                            revision=self.options.branch, num_threads=1),
                       f"uploading {name}")
        if op._upload_mode != "lfs":  # a small file the Hub keeps in git: it goes with the commit itself
            with self._lock:
                self.in_git[name] = op.upload_info.size
            self._save()
            return
        with self._lock:
            self.uploaded[name] = {"sha256": op.upload_info.sha256.hex(), "size": op.upload_info.size,
                                   "mtime_ns": os.stat(path).st_mtime_ns}
            self.shards_sent += 1
        self._save()

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
                _write_json(folder / PENDING_RECORD, self._record())

    # --- once the output is in place ---------------------------------------------------------------------------

    def output_in_place(self) -> None:
        """The output is complete and in `--dst`: keep what the commit needs there until it is made."""
        self._in_place = True
        self._save()

    def commit(self) -> "CommitResult":
        """Raise the background upload's failure, if any; else one commit of every file of `--dst`: the uploaded
        shards (removed ones too) by their sha256 and size, the other files uploaded now. Then the repository's
        file list, sizes and LFS hashes are read back and compared."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.lfs import UploadInfo

        if self.error is not None:
            raise self.error
        files = sorted(p.relative_to(self.dst).as_posix() for p in self.dst.rglob("*")
                       if p.is_file() and p.name != PENDING_RECORD and not p.name.startswith(".convert-fp8")
                       and not p.name.startswith("convert-fp8-"))
        removed = sorted(n for n, e in self.uploaded.items() if e.get("removed") and n not in files)
        for name in _shard_names(files):  # not uploaded while converting: now, before the commit
            size = (self.dst / name).stat().st_size
            if name in self.uploaded or self.in_git.get(name) == size:
                continue
            entry = self._trusted(self.dst / name, name)
            if entry is not None:
                self.uploaded[name] = entry
            else:
                self.in_git.pop(name, None)
                self._send(self.dst / name, name)
        operations, expected = [], {}
        for relative in files + removed:
            path = self.dst / relative
            blob = self.uploaded.get(relative)
            if blob is not None:
                size = blob["size"] if relative in removed else path.stat().st_size
                if blob["size"] != size:
                    raise PublishError(f"{path}: {size} bytes, but {blob['size']} were uploaded; convert again with "
                                       "--overwrite")
                # a blob already on the Hub: the commit names it by sha256 and size, and needs no local file
                op = CommitOperationAdd(path_in_repo=relative, path_or_fileobj=b"")
                op.upload_info = UploadInfo(size=size, sample=b"", sha256=bytes.fromhex(blob["sha256"]))
                op._upload_mode, op._should_ignore, op._is_uploaded = "lfs", False, True
                expected[relative] = (size, blob["sha256"])
            else:
                op = CommitOperationAdd(path_in_repo=relative, path_or_fileobj=str(path))
                if relative in self.in_git:  # its upload mode is known: not asked for again
                    op._upload_mode, op._should_ignore = "regular", False
                expected[relative] = (path.stat().st_size, None)
            operations.append(op)
        remote = self._remote_files()
        if self.replace:
            operations += [CommitOperationDelete(path_in_repo=f) for f in sorted(remote)
                           if f not in expected and f not in _REPO_HOUSEKEEPING]
        count = len(files) + len(removed)
        message = self.options.commit_message or f"Upload {count} files converted by convert-fp8"
        info = self._retrying(lambda: self.api.create_commit(
            self.options.repo_id, operations, commit_message=message, revision=self.options.branch,
            parent_commit=self.head), "committing")
        self._read_back(info.oid, expected)
        if not self.keep:  # the shards the Hub keeps in git went with the commit; every shard is on the Hub now
            for name in _shard_names(files):
                (self.dst / name).unlink(missing_ok=True)
        (self.dst / PENDING_RECORD).unlink(missing_ok=True)
        return CommitResult(url=info.commit_url, oid=info.oid, files=count, shards_sent=self.shards_sent,
                            kept=self.keep)

    def _remote_files(self) -> set[str]:
        try:
            return set(self.api.list_repo_files(self.options.repo_id, revision=self.options.branch))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "listing the repository") from None

    def _read_back(self, oid: str, expected: dict[str, tuple[int, str | None]]) -> None:
        """The committed tree holds every file, at its size, and every LFS file under its sha256."""
        from huggingface_hub.hf_api import RepoFile

        try:
            entries = [e for e in self.api.list_repo_tree(self.options.repo_id, revision=oid, recursive=True)
                       if isinstance(e, RepoFile)]
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "reading back the commit") from None
        got = {e.path: e for e in entries}
        for path, (size, sha256) in expected.items():
            entry = got.get(path)
            if entry is None:
                raise PublishError(f"{self.options.where}: commit {oid[:12]} does not hold {path}")
            remote_size = entry.lfs.size if entry.lfs else entry.size
            if remote_size != size:
                raise PublishError(f"{self.options.where}: commit {oid[:12]} holds {path} with {remote_size} bytes, "
                                   f"{size} were written")
            if sha256 is not None and (entry.lfs is None or entry.lfs.sha256 != sha256):
                raise PublishError(f"{self.options.where}: commit {oid[:12]} holds {path} with another sha256 than "
                                   "the one uploaded")
        extra = sorted(set(got) - set(expected) - _REPO_HOUSEKEEPING)
        if extra and self.replace:
            raise PublishError(f"{self.options.where}: commit {oid[:12]} also holds {extra[0]}, which the output "
                               "does not")

    # --- errors -----------------------------------------------------------------------------------------------

    def _retrying(self, call, doing: str):
        """`call()`, tried again after a network failure or an HTTP 429/5xx, with a doubling wait."""
        retries, wait = _retries()
        for attempt in range(retries + 1):
            if self._stop.is_set():
                raise _Stopped
            try:
                return call()
            except Exception as exc:  # noqa: BLE001
                if self._stop.is_set():
                    raise _Stopped from None
                if attempt == retries or not _transient(exc):
                    raise self._error(exc, doing, tries=attempt + 1) from None
                log.debug("%s: %s; trying again in %.0f s", doing, exc, wait)
                if self._stop.wait(wait):  # Ctrl-C ends the wait at once
                    raise _Stopped from None
                wait *= 2

    def _error(self, exc: BaseException, doing: str, tries: int = 1) -> PublishError:
        """One line for a failure of the Hub client."""
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, RepositoryNotFoundError

        from .hub import _is_network_error

        where = self.options.where
        resume = "; the uploaded blobs stay on the Hub: rerun the same command to resume the upload"
        cause = _root_cause(exc)
        if isinstance(cause, PublishError):
            return cause
        if isinstance(cause, LocalTokenNotFoundError):
            return PublishError(f"--push-to-hub {self.options.repo_id}: no Hugging Face token: set HF_TOKEN to a "
                                "write token, or run `hf auth login`")
        text = str(cause)
        if "quota" in text.lower() or (isinstance(cause, HfHubHTTPError) and cause.response is not None
                                       and cause.response.status_code in (402, 413, 507)):
            return PublishError(f"{where}: the Hub refused the upload while {doing}: storage quota exceeded "
                                f"({_first_line(text)}); free space on the account or upgrade it, then rerun the "
                                "same command")
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            if status == 401:
                return PublishError(f"{where}: the Hub refused the token (HTTP 401) while {doing}: check HF_TOKEN")
            if status == 403:
                return PublishError(f"{where}: no write access (HTTP 403) while {doing}: the token's account "
                                    f"cannot write to {self.options.repo_id.split('/')[0]}")
            if isinstance(cause, RepositoryNotFoundError) or status == 404:
                return PublishError(f"{where}: repository or branch not found (HTTP 404) while {doing}")
            if status == 409:
                return PublishError(f"{where}: the repository changed during the run (HTTP 409) while {doing}; "
                                    "rerun the same command")
            later = f", {_tries(tries)}{resume}" if status >= 500 or status == 429 else ""
            return PublishError(f"{where}: the Hub answered HTTP {status} while {doing}{later}")
        if _is_network_error(cause) or isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
            return PublishError(f"{where}: cannot reach the Hub at {constants.ENDPOINT} while {doing}, "
                                f"{_tries(tries)}{resume}")
        return PublishError(f"{where}: {doing} failed: {type(cause).__name__}: {_first_line(text)}{resume}")

    def close(self) -> None:
        """Tell the upload threads to stop, without waiting: one in flight is cut off when the process exits (the
        blobs already on the Hub, and the record of them, make the same command resume)."""
        self._stop.set()
        for _ in self._workers:
            self._queue.put(None)
        with self._changed:
            self._changed.notify_all()


@dataclass
class CommitResult:
    url: str
    oid: str
    files: int
    shards_sent: int  # shards this run pre-uploaded (the bytes of a blob the Hub held already are not sent)
    kept: bool = True  # False: --dst holds no shards (--no-keep-output)


def _check_shard(path: Path, shard: ShardPlan):
    """A shard is uploaded only once its header is, byte for byte, the one the plan gives, and its size the
    plan's. Returns the header."""
    from .write import shard_header

    want = shard_header(shard)
    try:
        with open(path, "rb") as f:
            got, size = f.read(len(want)), os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise PublishError(f"{path}: cannot read the written shard ({exc.strerror}); not uploaded") from None
    if got != want or size != len(want) + shard.nbytes:
        raise PublishError(f"{path}: the written shard does not match the plan; not uploaded")
    return read_header(path)


def _check_scales(path: Path, shard: ShardPlan, header) -> None:
    """The self-check's scale test (every scale finite and positive) on one shard, before it is removed."""
    import numpy as np

    from .dialects.transformers_fp8 import decode_scale_bytes

    with open(path, "rb") as f:
        for t in shard.tensors:
            if t.action != SCALE:
                continue
            info = header.tensors[t.name]
            f.seek(info.offset)
            values = decode_scale_bytes(f.read(info.nbytes), info.dtype)
            bad = int((~np.isfinite(values) | (values <= 0)).sum())
            if bad:
                raise PublishError(f"{path}: {t.name}: {bad} scale(s) not finite and positive; not uploaded")


def _covers(pieces: list[tuple[int, int]], nbytes: int) -> bool:
    """Whether `(start, length)` ranges cover `[0, nbytes)` without a gap."""
    end = 0
    for start, length in sorted(pieces):
        if start > end:
            return False
        end = max(end, start + length)
    return end >= nbytes


def _entry_ok(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64)


def _shard_names(files: list[str]) -> list[str]:
    return [f for f in files if "/" not in f and f.endswith(".safetensors")]


def _transient(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    from .hub import _is_network_error

    cause = _root_cause(exc)
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        return cause.response.status_code == 429 or cause.response.status_code >= 500
    return _is_network_error(cause)


def _root_cause(exc: BaseException) -> BaseException:
    """huggingface_hub wraps an upload's failure (`RuntimeError: Error while uploading ...`): its cause says why."""
    seen = 0
    while isinstance(exc, RuntimeError) and exc.__cause__ is not None and seen < 5:
        exc, seen = exc.__cause__, seen + 1
    return exc


def _tries(n: int) -> str:
    """The client tries a request 6 times; convert-fp8 tries it again `n - 1` times."""
    return f"after {6 * n} tries with backoff"


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        summary = None
        if not waiting:
            summary = run(publisher)
            publisher.output_in_place()
        return summary, publisher.commit()
    finally:
        publisher.close()
