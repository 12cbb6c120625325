"""Sources on the Hugging Face Hub: `--src org/name`, resolved through huggingface_hub (its cache, HF_HUB_OFFLINE,
HF_TOKEN), shard by shard.

The plan needs every shard's header: a shard already in the cache gives it from disk, others by two ranged reads
of the remote file, so nothing large is fetched before the conversion starts. Shards are then downloaded as the
conversion reaches them (the next one in the background); with `low_disk`, a shard this run downloaded is deleted
from the cache once all its tensors are written.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from pathlib import Path

from .configs import CONFIG_NAME, INDEX_NAME
from .errors import SourceError
from .source import MAX_HEADER_BYTES, SINGLE_FILE_NAME, ShardHeader, parse_header_bytes

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(src: str | Path) -> bool:
    """`org/name` that is not a local path."""
    text = str(src)
    return bool(_REPO_ID.match(text)) and not Path(text).exists()


class HubRepo:
    """One revision of a model repository, fetched through huggingface_hub."""

    def __init__(self, repo_id: str, revision: str | None = None, low_disk: bool = False):
        self.repo_id, self.revision, self.low_disk = repo_id, revision, low_disk
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._downloaded: set[str] = set()  # shards this run fetched (only those are deleted with low_disk)
        self._prefetching: set[str] = set()
        self._order: list[str] = []
        self.snapshot: Path | None = None

    def _errors(self, filename: str, exc: Exception) -> SourceError:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        if isinstance(exc, LocalEntryNotFoundError):
            return SourceError(f"{where}: {filename} is not in the local Hugging Face cache and cannot be downloaded "
                               "(offline: HF_HUB_OFFLINE is set or there is no network)")
        if isinstance(exc, RepositoryNotFoundError):
            return SourceError(f"{where}: repository not found, or private without a token (set HF_TOKEN)")
        if isinstance(exc, RevisionNotFoundError):
            return SourceError(f"{where}: revision not found")
        if isinstance(exc, EntryNotFoundError):
            return SourceError(f"{where}: no file {filename} in the repository")
        return SourceError(f"{where}: cannot fetch {filename}: {type(exc).__name__}: {exc}")

    def fetch(self, filename: str) -> Path:
        """The local path of `filename`, downloaded into the cache if it is not there."""
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(self.repo_id, filename, revision=self.revision))
        except Exception as exc:  # noqa: BLE001 - each kind becomes one message
            raise self._errors(filename, exc) from None
        self.snapshot = path.parent
        return path

    def cached(self, filename: str) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo_id, filename, revision=self.revision)
        return Path(found) if isinstance(found, str) else None

    def shard_names(self) -> tuple[list[str], dict | None]:
        """The shard files and the index's weight map (None for a single-file checkpoint)."""
        try:
            index = json.loads(self.fetch(INDEX_NAME).read_text())
            self._order = sorted(set(index["weight_map"].values()))
            return self._order, index["weight_map"]
        except SourceError as exc:
            if "no file" not in str(exc) and not self.cached(SINGLE_FILE_NAME):
                raise
        self._order = [SINGLE_FILE_NAME]
        return self._order, None

    def header(self, shard: str) -> ShardHeader:
        """A shard's header: from the cache when the shard is there, else by ranged reads of the remote file."""
        local = self.cached(shard)
        if local is not None:
            from .source import read_header

            return read_header(local)
        return self._remote_header(shard)

    def _remote_header(self, shard: str) -> ShardHeader:
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        if constants.HF_HUB_OFFLINE:
            raise SourceError(f"{self.repo_id}: {shard} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
        url = hf_hub_url(self.repo_id, shard, revision=self.revision)
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
        response = session.get(url, headers={**headers, "Range": f"bytes={start}-{start + length - 1}"},
                               follow_redirects=True)
        response.raise_for_status()
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
            path = self.fetch(shard)
            self._downloaded.add(shard)
            return path

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
        """Every file of the revision (online: the Hub's listing; offline: the cached snapshot's)."""
        from huggingface_hub import HfApi, constants

        if not constants.HF_HUB_OFFLINE:
            try:
                return sorted(HfApi().list_repo_files(self.repo_id, revision=self.revision))
            except Exception:  # noqa: BLE001 - fall back to what the cache holds
                pass
        if self.snapshot is None:
            return []
        return sorted(p.relative_to(self.snapshot).as_posix() for p in self.snapshot.rglob("*") if p.is_file())

    def release(self, shard: str) -> None:
        """With low_disk, delete a shard this run downloaded (its cache blob and snapshot link)."""
        if not self.low_disk or shard not in self._downloaded:
            return
        local = self.cached(shard)
        if local is None:
            return
        blob = local.resolve()
        for path in (local, blob):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self._downloaded.discard(shard)


def fetch_config(repo: HubRepo) -> dict:
    try:
        return json.loads(repo.fetch(CONFIG_NAME).read_text())
    except ValueError as exc:
        raise SourceError(f"{repo.repo_id}: corrupt config.json: {exc}") from None
