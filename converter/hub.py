"""Sources on the Hugging Face Hub: `--src org/name`, resolved through huggingface_hub (its cache, HF_HUB_OFFLINE,
HF_TOKEN), shard by shard.

The plan needs every shard's header: a shard already in the cache gives it from disk, others by two ranged reads
of the remote file, so nothing large is fetched before the conversion starts. Shards are then downloaded as the
conversion reaches them (the next one in the background); with `low_disk`, a shard whose blob this run downloaded
is deleted from the cache once all its tensors are written, unless another snapshot of the cache links to it.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import threading
from pathlib import Path

from .configs import CONFIG_NAME, INDEX_NAME
from .errors import SourceError
from .source import MAX_HEADER_BYTES, SINGLE_FILE_NAME, ShardHeader, json_object, parse_header_bytes, read_header

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def looks_like_repo_id(src: str | Path) -> bool:
    """`org/name` that is not a local path."""
    text = str(src)
    return bool(_REPO_ID.match(text)) and not Path(text).exists()


class HubRepo:
    """One revision of a model repository, fetched through huggingface_hub.

    `config()` resolves the requested revision (a branch, tag or commit; `main` by default) to its commit, once;
    every file is then listed and fetched at that commit, so a push to the branch during a run cannot mix two
    versions of the repository."""

    def __init__(self, repo_id: str, revision: str | None = None, low_disk: bool = False):
        self.repo_id, self.revision, self.low_disk = repo_id, revision, low_disk
        self.commit: str | None = None
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._downloaded: set[str] = set()  # shards whose blob this run fetched (only those are deleted with low_disk)
        self._prefetching: set[str] = set()
        self._order: list[str] = []
        self._files: list[str] | None = None
        self.snapshot: Path | None = None
        self.warnings: list[str] = []

    @property
    def where(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def _errors(self, what: str, exc: Exception) -> SourceError:
        """One line for a huggingface_hub failure, by exception type (subclasses first)."""
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            DisabledRepoError,
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = self.where
        # hf_hub_download reports a failed request as "not in the cache"; the request's own error says why
        cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None else exc
        if isinstance(cause, GatedRepoError):
            return SourceError(
                f"{where}: gated repository: open {constants.ENDPOINT}/{self.repo_id} logged in, accept its "
                "conditions and wait for access to be granted, then set HF_TOKEN to a token of that account (or run "
                "`hf auth login`)")
        if isinstance(cause, DisabledRepoError):
            return SourceError(f"{where}: the repository is disabled on the Hub")
        if isinstance(cause, RepositoryNotFoundError):
            return SourceError(f"{where}: repository not found, or private and HF_TOKEN is not set to a token "
                               "with access to it")
        if isinstance(cause, RevisionNotFoundError):
            return SourceError(f"{where}: revision {self.revision or 'main'!r} not found (give a branch, tag or "
                               "commit of the repository)")
        if isinstance(cause, EntryNotFoundError) and not isinstance(cause, LocalEntryNotFoundError):
            return SourceError(f"{where}: no file {what} in the repository")
        if isinstance(cause, (OfflineModeIsEnabled, LocalEntryNotFoundError)) or constants.HF_HUB_OFFLINE:
            return SourceError(f"{where}: {what} is not in the local Hugging Face cache and cannot be downloaded "
                               "(offline: HF_HUB_OFFLINE is set or there is no network)")
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            if status == 401:
                return SourceError(f"{where}: the Hub refused the token (HTTP 401 for {what}): check HF_TOKEN")
            later = "; try again later" if status >= 500 or status == 429 else ""
            return SourceError(f"{where}: the Hub answered HTTP {status} for {what}{later}")
        if isinstance(exc, LocalEntryNotFoundError) or _is_network_error(cause):
            return SourceError(f"{where}: cannot reach the Hub at {constants.ENDPOINT} for {what}, and it is not in "
                               "the local Hugging Face cache (set HF_HUB_OFFLINE=1 to use only the cache)")
        if isinstance(cause, OSError) and cause.strerror:
            return SourceError(f"{where}: cannot store {what} in the Hugging Face cache: {cause.strerror}")
        return SourceError(f"{where}: cannot fetch {what}: {cause}")

    def config(self) -> dict:
        """The config, read at the resolved commit (resolving it fetches it)."""
        self.resolve()
        try:
            text = (self.snapshot / CONFIG_NAME).read_text()
        except ValueError as exc:  # not UTF-8
            raise SourceError(f"{self.where}: corrupt config.json: {exc}") from None
        return json_object(text, self.where, "config.json")

    def resolve(self) -> str:
        """The commit the requested revision points to, fixed once: the config is fetched at the revision, and the
        cache files it under its commit (online from the Hub's answer, offline from the cache's refs)."""
        if self.commit is not None:
            return self.commit
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(self.repo_id, CONFIG_NAME, revision=self.revision))
        except Exception as exc:  # noqa: BLE001 - each kind becomes one message
            raise self._errors(CONFIG_NAME, exc) from None
        if path.parent.parent.name != "snapshots" or not _COMMIT.match(path.parent.name):
            raise SourceError(f"{self.where}: the Hugging Face cache filed {CONFIG_NAME} under no commit ({path})")
        self.commit, self.snapshot = path.parent.name, path.parent
        return self.commit

    def fetch(self, filename: str) -> Path:
        """The local path of `filename`, downloaded into the cache if it is not there."""
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(self.repo_id, filename, revision=self.resolve()))
        except Exception as exc:  # noqa: BLE001 - each kind becomes one message
            raise self._errors(filename, exc) from None
        self.snapshot = path.parents[filename.count("/")]
        return path

    def cached(self, filename: str) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo_id, filename, revision=self.resolve())
        return Path(found) if isinstance(found, str) else None

    def shard_names(self) -> tuple[list[str], dict | None]:
        """The shard files and the index's weight map (None for a single-file checkpoint), as the file listing
        shows them."""
        files = self.other_files()
        if INDEX_NAME in files:
            try:
                weight_map = json.loads(self.fetch(INDEX_NAME).read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ValueError("empty")
                self._order = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, RecursionError):
                raise SourceError(f"{self.where}: corrupt {INDEX_NAME}: no 'weight_map' of tensor to shard") from None
            for shard in self._order:  # the index names files of the repository's top level, nothing else
                if "/" in shard or not shard.endswith(".safetensors"):
                    raise SourceError(f"{self.where}: {INDEX_NAME} names shard {shard[:80]!r}, which is not a "
                                      ".safetensors file at the top of the repository")
            return self._order, weight_map
        if SINGLE_FILE_NAME in files:
            self._order = [SINGLE_FILE_NAME]
            return self._order, None
        from huggingface_hub import constants

        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "in it"
        raise SourceError(f"{self.where}: no {INDEX_NAME} and no {SINGLE_FILE_NAME} {where}: not a safetensors "
                          "checkpoint")

    def header(self, shard: str) -> ShardHeader:
        """A shard's header: from the cache when the shard is there, else by ranged reads of the remote file."""
        local = self.cached(shard)
        if local is not None:
            return read_header(local)
        return self._remote_header(shard)

    def _remote_header(self, shard: str) -> ShardHeader:
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        if constants.HF_HUB_OFFLINE:
            raise SourceError(f"{self.repo_id}: {shard} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
        url = hf_hub_url(self.repo_id, shard, revision=self.resolve())
        try:
            prefix, size = self._range(get_session(), url, build_hf_headers(), 0, 8)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise SourceError(f"{self.repo_id}/{shard}: corrupt header: length {header_len}")
            raw, _ = self._range(get_session(), url, build_hf_headers(), 8, header_len)
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._errors(shard, exc) from None
        return parse_header_bytes(Path(f"{self.repo_id}/{shard}"), raw, header_len, size)

    @staticmethod
    def _range(session, url: str, headers: dict, start: int, length: int) -> tuple[bytes, int]:
        from huggingface_hub.utils import hf_raise_for_status

        response = session.get(url, headers={**headers, "Range": f"bytes={start}-{start + length - 1}"},
                               follow_redirects=True)
        hf_raise_for_status(response)  # typed errors: a gated or missing repository says so
        total = int(response.headers.get("Content-Range", "/0").rsplit("/", 1)[-1] or 0)
        return response.content[:length], total

    def ensure(self, shard: str) -> Path:
        """The shard on local disk, downloading it once (concurrent callers wait for the same download)."""
        with self._guard:
            lock = self._locks.setdefault(shard, threading.Lock())
        with lock:
            local = self.cached(shard)
            if local is not None:
                return local
            before = self._blobs()
            path = self.fetch(shard)
            if path.resolve().name not in before:  # not a blob an older revision already had, only linked
                self._downloaded.add(shard)
            return path

    def _blobs(self) -> set[str]:
        """The names of the blobs the cache holds for this repository now."""
        self.resolve()
        try:
            return set(os.listdir(self.snapshot.parent.parent / "blobs"))
        except OSError:
            return set()

    def prefetch_after(self, shard: str) -> None:
        """Start downloading the shard after `shard` in the background, if it is not local yet."""
        try:
            following = self._order[self._order.index(shard) + 1]
        except (ValueError, IndexError):
            return
        if following in self._prefetching or self.cached(following) is not None:
            return
        self._prefetching.add(following)

        def fetch():
            try:
                self.ensure(following)
            except Exception:  # noqa: BLE001 - the reader that needs it will fetch again and report
                pass

        threading.Thread(target=fetch, daemon=True, name="convert-fp8-prefetch").start()

    def other_files(self) -> list[str]:
        """Every file of the commit: online the Hub's listing (a failure is an error: falling back to the cache
        would quietly leave out the tokenizer), offline the cached snapshot's."""
        if self._files is not None:
            return self._files
        from huggingface_hub import HfApi, constants

        commit = self.resolve()
        if constants.HF_HUB_OFFLINE:
            snapshot = self.snapshot or self.fetch(CONFIG_NAME).parent
            self._files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
            self.warnings.append("offline (HF_HUB_OFFLINE is set): the files copied besides the weights are those the "
                                 f"local Hugging Face cache holds for {self.repo_id}")
            return self._files
        try:
            self._files = sorted(HfApi().list_repo_files(self.repo_id, revision=commit))
        except Exception as exc:  # noqa: BLE001 - each kind becomes one message
            raise self._errors("the file listing", exc) from None
        return self._files

    def release(self, shard: str) -> None:
        """With low_disk, delete a shard whose blob this run downloaded: its snapshot link, and the blob unless a
        link of another snapshot (another revision, another process) points to it."""
        if not self.low_disk or shard not in self._downloaded:
            return
        local = self.cached(shard)
        if local is None:
            return
        blob = local.resolve()
        try:
            local.unlink()
        except FileNotFoundError:
            pass
        if not _linked_from(blob.parent.parent / "snapshots", blob):
            try:
                blob.unlink()
            except FileNotFoundError:
                pass
        self._downloaded.discard(shard)


def _linked_from(snapshots: Path, blob: Path) -> bool:
    """Whether any file of the cache's snapshots resolves to `blob`."""
    for root, _, files in os.walk(snapshots):
        for name in files:
            path = Path(root, name)
            try:
                if path.resolve() == blob:
                    return True
            except OSError:
                continue
    return False


def _is_network_error(exc: BaseException) -> bool:
    """A request that got no answer. The HTTP client depends on the huggingface_hub version; whichever it is,
    it was imported by the request that failed."""
    kinds: list[type] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None:
            kinds.append(module.TransportError)
    return isinstance(exc, tuple(kinds))
