"""The commit of `--push-to-hub` (`Publisher`'s part once the output is in place): the files the Hub's ignore
rules drop left out, every blob the commit names asked for (one LFS batch request; a lost one sent again), the
branch compared with the output first (a commit made by an earlier run whose answer was lost is not made again),
one `create_commit`, a failure of unknown outcome settled by the branch's tree, and the tree read back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import hub_commit as hc
from .configs import INDEX_NAME, PENDING_RECORD, STAGING_NAME
from .errors import PublishError

log = logging.getLogger("converter.publish")



def _retries() -> tuple[int, float]:
    """How often a failed request is tried again (after a network failure or an HTTP 429/5xx, beyond the
    client's own retries), and the first wait in seconds, doubled each time."""
    return (int(os.environ.get("CONVERT_FP8_PUBLISH_RETRIES", "3")),
            float(os.environ.get("CONVERT_FP8_PUBLISH_BACKOFF", "5")))


class _Stopped(Exception):
    """The run is being interrupted: an upload thread gives up where it is."""


class CommitPhase:
    """The commit, for `publish.Publisher` (which holds `api`, `options`, `dst`, `uploaded`, `in_git`, `replace`,
    `head`, `keep` and the upload's `_send`, `_trusted`, `_held`, `_check_ignored`)."""

    # --- once the output is in place ---------------------------------------------------------------------------

    def output_in_place(self) -> None:
        """The output is complete and in `--dst`: keep what the commit needs there until it is made."""
        self._in_place = True
        self._save()

    def _output_files(self) -> list[str]:
        return sorted(p.relative_to(self.dst).as_posix() for p in self.dst.rglob("*")
                      if p.is_file() and STAGING_NAME not in p.relative_to(self.dst).parts
                      and p.name != PENDING_RECORD and not p.name.startswith(".convert-fp8")
                      and not p.name.startswith("convert-fp8-"))

    def commit(self) -> "CommitResult":
        """Raise the background upload's failure, if any; else one commit of every file of `--dst`: the uploaded
        shards (removed ones too) by their sha256 and size, once the Hub has answered that it still holds each;
        the other files uploaded now. Files the ignore rules drop are left out first (a shard, the index or the
        config is an error). When the branch already holds exactly this output (a commit made by an earlier run
        whose answer was lost), nothing is committed. After the commit, the branch's tree is read back and
        compared: every file at its size and content."""
        started = time.monotonic()
        if self.error is not None:
            raise self.error
        files = self._output_files()
        gitignore = (self.dst / ".gitignore").read_text(errors="replace") if ".gitignore" in files else None
        removed = sorted(n for n, e in self.uploaded.items() if e.get("removed") and n not in files)
        left_out = self._check_ignored(files + removed, gitignore)
        if left_out:
            log.warning("%s: left out of the commit, which the Hub would not store (ignored by %s): %s",
                        self.options.where, "the output's .gitignore" if gitignore is not None else
                        "the repository's .gitignore", ", ".join(left_out))
            files = [f for f in files if f not in left_out]
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
        blobs = {n: (e["size"], e["sha256"]) for n, e in self.uploaded.items() if n in files or n in removed}
        lost = sorted(set(blobs) - self._held(blobs))
        gone = [n for n in lost if n in removed]
        if gone:
            raise PublishError(f"{self.options.where}: the Hub no longer holds the blob of {gone[0]} ({len(gone)} "
                               "shard(s) removed from this disk once uploaded, --no-keep-output); convert again with "
                               "--overwrite")
        for name in lost:  # lost by the Hub since it was uploaded: sent again from the local bytes
            log.debug("the Hub no longer holds the blob of %s: sending it again", name)
            self.uploaded.pop(name)
            self._send(self.dst / name, name)
        expected, operations = self._operations(files, removed)
        count = len(files) + len(removed)
        if self._at_head(expected) is not None:  # committed by an earlier run whose answer was lost
            return self._done(CommitResult(*self._at_head(expected), files=count, shards_sent=self.shards_sent,
                                           kept=self.keep, already=True, seconds=time.monotonic() - started), files)
        if self.replace:
            from huggingface_hub import CommitOperationDelete

            operations += [CommitOperationDelete(path_in_repo=f) for f in sorted(self._remote_files())
                           if f not in expected and f not in hc.HOUSEKEEPING]
        message = self.options.commit_message or f"Upload {count} files converted by convert-fp8"
        url, oid = self._commit(operations, message, expected)
        self._read_back(oid, expected)
        return self._done(CommitResult(url, oid, files=count, shards_sent=self.shards_sent, kept=self.keep,
                                       seconds=time.monotonic() - started), files)

    def _done(self, result: "CommitResult", files: list[str]) -> "CommitResult":
        if not self.keep:  # the shards the Hub keeps in git went with the commit; every shard is on the Hub now
            for name in _shard_names(files):
                (self.dst / name).unlink(missing_ok=True)
        (self.dst / PENDING_RECORD).unlink(missing_ok=True)
        return result

    def _operations(self, files: list[str], removed: list[str]):
        """What the branch must hold (path -> `Want`), and the commit's operations."""
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.lfs import UploadInfo

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
                expected[relative] = hc.Want(size, blob["sha256"])
            else:
                op = CommitOperationAdd(path_in_repo=relative, path_or_fileobj=str(path))
                if relative in self.in_git:  # its upload mode is known: not asked for again
                    op._upload_mode, op._should_ignore = "regular", False
                expected[relative] = hc.local_want(path)
            operations.append(op)
        return expected, operations

    def _at_head(self, expected: dict) -> tuple[str, str] | None:
        """(url, commit) of the branch's head when its tree holds exactly `expected`, else None."""
        tree = self._retrying(lambda: hc.branch_tree(self.api, self.options.repo_id, self.options.branch),
                              "reading the repository")
        if hc.differences(tree, expected, exact=self.replace):
            return None
        sha = self._retrying(lambda: self.api.model_info(self.options.repo_id, revision=self.options.branch).sha,
                             "reading the repository")
        return f"{self.api.endpoint}/{self.options.repo_id}/commit/{sha}", sha

    def _commit(self, operations, message: str, expected: dict) -> tuple[str, str]:
        """`create_commit`, tried again after a failure that may be transient; a failure whose outcome is unknown
        (no answer, HTTP 5xx, or a 412 because the branch moved) is settled by the branch's tree: when it holds
        exactly the output, the commit was made."""
        retries, wait = _retries()
        for attempt in range(retries + 1):
            if self._stop.is_set():
                raise _Stopped
            try:
                info = self.api.create_commit(self.options.repo_id, operations, commit_message=message,
                                              revision=self.options.branch, parent_commit=self.head)
                return info.commit_url, info.oid
            except Exception as exc:  # noqa: BLE001
                for op in operations:  # each attempt is a new commit to the client
                    op._is_committed = False
                if hc.unknown_outcome(exc):
                    try:
                        made = self._at_head(expected)
                    except PublishError:
                        made = None
                    if made is not None:
                        return made
                if attempt == retries or not hc.transient(exc):
                    raise self._error(exc, "committing", tries=attempt + 1) from None
                log.debug("committing: %s; trying again in %.0f s", exc, wait)
                if self._stop.wait(wait):
                    raise _Stopped from None
                wait *= 2

    def published(self) -> "CommitResult":
        """A finished output in `--dst` (no record) and a repository holding a model: done when the branch holds
        exactly the output's files (each compared by size and sha256 or git blob id; shards removed from this disk,
        --no-keep-output, by the index's names, as LFS files); else the refusal of `open`."""
        started = time.monotonic()
        files = self._output_files()
        expected = {}
        for name in files:
            path = self.dst / name
            expected[name] = (hc.Want(path.stat().st_size, hc.sha256_file(path)) if name in _shard_names(files)
                              else hc.local_want(path))
        tree = self._retrying(lambda: hc.branch_tree(self.api, self.options.repo_id, self.options.branch),
                              "reading the repository")
        missing = [s for s in _index_shards(self.dst) if s not in files and (s not in tree or tree[s].lfs is None)]
        if missing or hc.differences(tree, expected, exact=False):
            raise self.finished
        sha = self._retrying(lambda: self.api.model_info(self.options.repo_id, revision=self.options.branch).sha,
                             "reading the repository")
        return CommitResult(f"{self.api.endpoint}/{self.options.repo_id}/commit/{sha}", sha, files=len(files),
                            shards_sent=0, kept=bool(_shard_names(files)), already=True,
                            seconds=time.monotonic() - started)

    def _remote_files(self) -> set[str]:
        return set(self._retrying(lambda: self.api.list_repo_files(self.options.repo_id,
                                                                   revision=self.options.branch),
                                  "listing the repository"))

    def _read_back(self, oid: str, expected: dict) -> None:
        """The committed tree holds every file, at its size and content (every LFS file under its sha256), and,
        replacing, no other."""
        tree = self._retrying(lambda: hc.branch_tree(self.api, self.options.repo_id, oid),
                              "reading back the commit")
        found = hc.differences(tree, expected, exact=self.replace)
        if found:
            raise PublishError(f"{self.options.where}: commit {oid[:12]} does not hold the output: {found[0]}"
                               + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""))

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
                if attempt == retries or not hc.transient(exc):
                    raise self._error(exc, doing, tries=attempt + 1) from None
                log.debug("%s: %s; trying again in %.0f s", doing, exc, wait)
                if self._stop.wait(wait):  # Ctrl-C ends the wait at once
                    raise _Stopped from None
                wait *= 2

    def _error(self, exc: BaseException, doing: str, tries: int = 1) -> PublishError:
        return hc.describe(exc, doing, self.options.repo_id, self.options.where, tries,
                           uploaded=bool(self.uploaded or self._recorded))


@dataclass
class CommitResult:
    url: str
    oid: str
    files: int
    shards_sent: int  # shards this run pre-uploaded (the bytes of a blob the Hub held already are not sent)
    kept: bool = True  # False: --dst holds no shards (--no-keep-output)
    already: bool = False  # the branch held exactly this output already: nothing was committed
    seconds: float = 0.0  # spent comparing and committing


def _shard_names(files: list[str]) -> list[str]:
    return [f for f in files if "/" not in f and f.endswith(".safetensors")]


def _index_shards(dst: Path) -> list[str]:
    """The shards the output's index names (one shard and no index: none)."""
    data = _read_json(dst / INDEX_NAME)
    weight_map = data.get("weight_map") if isinstance(data.get("weight_map"), dict) else {}
    return sorted({v for v in weight_map.values() if isinstance(v, str)})


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
