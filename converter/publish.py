"""Publishing the output to the Hub (`--push-to-hub ORG/NAME`), through huggingface_hub's own upload API.

Before anything is converted, the token, the write access and the target are checked, and the repository (and
`--hub-branch`) created. Each output shard is uploaded as soon as its last byte is written and its header checks
against the plan, in a background thread while the next shards are converted: `preupload_lfs_files` stores its
bytes on the Hub (LFS blobs by sha256, or Xet storage when `hf_xet` is installed) without making them visible.
Once the output is complete, checked and in place, one `create_commit` adds the shards (referenced by the sha256
and size the client took from the written files), the index, config, card and other files; the repository's
file list and LFS sizes and hashes are then read back and compared. A repository is never seen half-written.

A rerun of the same command after a kill resumes the conversion as usual, uploads only the blobs the Hub does not
hold yet (the LFS batch endpoint, or Xet's deduplication, says which), and commits. Once the output is in place
and until the commit, `DST/.convert-fp8.publish.json` records what the commit needs, so that a rerun goes
straight to the commit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import ConvertError, UsageError
from .plan import ShardPlan
from .source import read_header

log = logging.getLogger(__name__)

PENDING_RECORD = ".convert-fp8.publish.json"  # in --dst, between the output's move into place and the commit
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SNAPSHOT = re.compile(r"^models--([^/]+?)--([^/]+)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Files of a repository that do not make it hold a model (created with the repository, or by the Hub).
_REPO_HOUSEKEEPING = {".gitattributes"}


class PublishError(ConvertError):
    """The output cannot be published: no token, no write access, the repository exists, the Hub failed."""


@dataclass(frozen=True)
class PublishOptions:
    repo_id: str
    private: bool = False
    branch: str | None = None
    commit_message: str | None = None
    overwrite: bool = False

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


class Publisher:
    """Uploads one conversion's (or dequantization's) output to `options.repo_id` and commits it at once.

    `identity` (the command's options) is kept in the resume records: a rerun with other options does not commit
    an output the records were not written for."""

    def __init__(self, options: PublishOptions, dst: Path, identity: dict):
        from huggingface_hub import HfApi

        self.options, self.dst, self.identity = options, Path(dst), identity
        self.api = HfApi()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # the conversion's bar is the one shown
        self.uploaded: dict[str, dict] = {}  # shard name -> {"sha256", "size"} once its blob is on the Hub
        self.shards_sent = 0
        self._announced: set[str] = set()
        self._lock = threading.Lock()
        # two shards at a time: one is hashed (LFS path) while the other's bytes go up
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="convert-fp8-upload")
        self._jobs: list[Future] = []
        self.error: PublishError | None = None
        self.head: str | None = None  # the branch's commit when the run began
        self.replace = options.overwrite  # the commit deletes the files of the branch the output does not hold

    # --- before the conversion -------------------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether `--dst` holds a complete output of this same command, waiting for its commit (a run stopped
        after the output was moved into place). Another command's record is refused."""
        record = self.dst / PENDING_RECORD
        if not record.is_file():
            return False
        data = _read_json(record)
        if data.get("repo") != self.options.repo_id or data.get("branch") != self.options.branch \
                or data.get("identity") != self.identity:
            raise UsageError(f"{self.dst}: holds a finished output waiting to be published with other options "
                             f"({PENDING_RECORD}); rerun that command, or pass --overwrite to convert again")
        return True  # its shards are pre-uploaded again by `commit`: only the blobs the Hub lacks are sent

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

    def shard_written(self, path: Path, shard: ShardPlan) -> None:
        """Every byte of a shard is written: upload it in the background. Called from the writing lanes; returns
        at once."""
        with self._lock:
            if shard.name in self._announced:
                return
            self._announced.add(shard.name)
        log.debug("%s written: queued for upload", shard.name)
        self._jobs.append(self._pool.submit(self._upload, Path(path), shard))

    def shards_written(self, staging: Path, shards: list[ShardPlan]) -> None:
        """Every shard is written (some perhaps kept from an earlier run, never announced): upload the rest and
        wait for all, before the shards are moved into place. A failed upload is not raised here (the conversion
        completes and is kept) but by `commit`."""
        for shard in shards:
            self.shard_written(staging / shard.name, shard)
        for job in list(self._jobs):
            job.result()
        self._pool.shutdown()

    def _upload(self, path: Path, shard: ShardPlan) -> None:
        if self.error is not None:  # one failure stops the uploads; the conversion goes on and is kept
            return
        try:
            started = time.monotonic()
            _check_shard(path, shard)
            self._send(path, shard.name)
            log.debug("%s uploaded in %.1f s", shard.name, time.monotonic() - started)
        except PublishError as exc:
            self.error = exc
        except ConvertError as exc:
            self.error = PublishError(str(exc))
        except Exception as exc:  # noqa: BLE001
            self.error = self._error(exc, f"uploading {shard.name}")
        if self.error is not None:
            log.warning("%s; the conversion goes on, and the same command publishes it once it is done", self.error)

    def _send(self, path: Path, name: str) -> None:
        from huggingface_hub import CommitOperationAdd

        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        self._retrying(lambda: self.api.preupload_lfs_files(self.options.repo_id, additions=[op],
                                                            revision=self.options.branch, num_threads=1),
                       f"uploading {name}")
        if op._upload_mode != "lfs":  # a small file the Hub keeps in git: it goes with the commit itself
            return
        with self._lock:
            self.uploaded[name] = {"sha256": op.upload_info.sha256.hex(), "size": op.upload_info.size}
            self.shards_sent += 1

    def _record(self) -> dict:
        return {"repo": self.options.repo_id, "branch": self.options.branch, "identity": self.identity,
                "uploaded": self.uploaded}

    # --- once the output is in place ---------------------------------------------------------------------------

    def output_in_place(self) -> None:
        """The output is complete and in `--dst`: keep what the commit needs there until it is made."""
        _write_json(self.dst / PENDING_RECORD, self._record())

    def commit(self) -> "CommitResult":
        """Raise the background upload's failure, if any; else one commit of every file of `--dst`: the uploaded shards by their sha256 and size, the other files
        uploaded now. Then the repository's file list, sizes and LFS hashes are read back and compared."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.lfs import UploadInfo

        if self.error is not None:
            raise self.error
        files = sorted(p.relative_to(self.dst).as_posix() for p in self.dst.rglob("*")
                       if p.is_file() and p.name != PENDING_RECORD and not p.name.startswith(".convert-fp8")
                       and not p.name.startswith("convert-fp8-"))
        operations, expected = [], {}
        for relative in files:
            path = self.dst / relative
            size = path.stat().st_size
            blob = self.uploaded.get(relative)
            if blob is not None:
                if blob["size"] != size:
                    raise PublishError(f"{path}: {size} bytes, but {blob['size']} were uploaded; convert again with "
                                       "--overwrite")
                op = CommitOperationAdd(path_in_repo=relative, path_or_fileobj=b"")
                with open(path, "rb") as f:
                    sample = f.read(512)
                op.upload_info = UploadInfo(size=size, sample=sample, sha256=bytes.fromhex(blob["sha256"]))
                op._upload_mode, op._should_ignore, op._is_uploaded = "lfs", False, True
                expected[relative] = (size, blob["sha256"])
            else:
                op = CommitOperationAdd(path_in_repo=relative, path_or_fileobj=str(path))
                expected[relative] = (size, None)
            operations.append(op)
        missing = [s for s in _shard_names(files) if s not in self.uploaded]
        for name in missing:  # uploaded now, before the commit (the commit's own upload would also do it)
            self._send(self.dst / name, name)
            op = next(o for o in operations if o.path_in_repo == name)
            if name in self.uploaded:
                blob = self.uploaded[name]
                op.upload_info = UploadInfo(size=blob["size"], sample=op.upload_info.sample,
                                            sha256=bytes.fromhex(blob["sha256"]))
                op.path_or_fileobj = b""
                op._upload_mode, op._should_ignore, op._is_uploaded = "lfs", False, True
                expected[name] = (blob["size"], blob["sha256"])
        remote = self._remote_files()
        if self.replace:
            operations += [CommitOperationDelete(path_in_repo=f) for f in sorted(remote)
                           if f not in expected and f not in _REPO_HOUSEKEEPING]
        message = self.options.commit_message or f"Upload {len(files)} files converted by convert-fp8"
        info = self._retrying(lambda: self.api.create_commit(
            self.options.repo_id, operations, commit_message=message, revision=self.options.branch,
            parent_commit=self.head), "committing")
        self._read_back(info.oid, expected)
        (self.dst / PENDING_RECORD).unlink(missing_ok=True)
        return CommitResult(url=info.commit_url, oid=info.oid, files=len(files), shards_sent=self.shards_sent)

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
            try:
                return call()
            except Exception as exc:  # noqa: BLE001
                if attempt == retries or not _transient(exc):
                    raise self._error(exc, doing, tries=attempt + 1) from None
                log.debug("%s: %s; trying again in %.0f s", doing, exc, wait)
                time.sleep(wait)
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
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class CommitResult:
    url: str
    oid: str
    files: int
    shards_sent: int  # shards this run pre-uploaded (the bytes of a blob the Hub held already are not sent)


def _check_shard(path: Path, shard: ShardPlan) -> None:
    """A shard is uploaded only once its header and size are those of the plan."""
    header = read_header(path)
    got = [(t.name, t.dtype, t.shape) for t in header.tensors.values()]
    want = [(t.name, t.dtype, tuple(t.shape)) for t in shard.tensors]
    if got != want or header.file_size != header.data_start + shard.nbytes:
        raise PublishError(f"{path}: the written shard does not match the plan; not uploaded")


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
        summary = None
        if not waiting:
            summary = run(publisher)
            publisher.output_in_place()
        return summary, publisher.commit()
    finally:
        publisher.close()
