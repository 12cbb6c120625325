"""Where a source comes from: a local folder or a Hub repository id, opened as a `SourceIndex`, and the Hub id
and commit it was made from (for the model card)."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UsageError
from .source import SourceIndex, open_hub_source, open_source

_SNAPSHOT = re.compile(r"^models--([^/]+?)--([^/]+)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def load_source(src: Path | str, dst: Path, revision: str | None = None, low_disk: bool = False,
                allow_external_links: bool = False) -> SourceIndex:
    """The source `src`: a local folder, or a Hub repository id (`org/name`) at `revision`; `dst` is where the
    output goes (a local source must not hold it, nor sit inside it).

    Raises:
        UsageError: `revision` or `low_disk` for a local folder, `dst` inside `src` or `src` inside `dst`.
    """
    from .hub import HubRepo, looks_like_repo_id

    if looks_like_repo_id(src):
        return open_hub_source(HubRepo(str(src), revision, low_disk))
    if revision or low_disk:
        raise UsageError("--revision and --low-disk apply to Hub sources (--src org/name), not to a local folder")
    _check_paths(src, dst)
    return open_source(src, allow_external_links=allow_external_links)


def _check_paths(src: Path, dst: Path) -> None:
    src_abs, dst_abs = Path(src).resolve(), Path(dst).resolve()
    if dst_abs == src_abs or src_abs in dst_abs.parents:
        raise UsageError(f"--dst {dst} is inside --src {src}: the source is never written to; choose another folder")
    if dst_abs in src_abs.parents:
        raise UsageError(f"--src {src} is inside --dst {dst}: replacing --dst would destroy the source")


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
