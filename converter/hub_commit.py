"""The Hub conversation of `--push-to-hub` beside the uploads themselves: which blobs the Hub holds (one LFS
batch request), which paths its ignore rules drop (one preupload request), what a branch's tree holds and
whether it is exactly a given output, and one line for each failure of the client.

Every answer here is the Hub's: nothing is taken as held, ignored or committed because this program believes it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .errors import PublishError

log = logging.getLogger(__name__)

HOUSEKEEPING = {".gitattributes", ".gitignore"}  # the repository's own rules, not part of a model
_BATCH = 256  # objects per LFS batch request, as huggingface_hub sends them


@dataclass(frozen=True)
class Want:
    """What a path of the repository must hold: its size, and its sha256 (an LFS file) or its git blob id (a file
    kept in git); a file the Hub may keep either way has both."""
    size: int
    sha256: str | None = None
    git: str | None = None


def local_want(path: Path) -> Want:
    """A small file's size, sha256 and git blob id (whichever way the Hub stores it)."""
    from huggingface_hub.utils.sha import git_hash

    data = path.read_bytes()
    return Want(len(data), hashlib.sha256(data).hexdigest(), git_hash(data))


def held(api, repo_id: str, branch: str | None, blobs: dict[str, tuple[int, str]]) -> set[str]:
    """The names whose blob (size, sha256) the repository's LFS storage holds: the batch endpoint answers an
    upload action for each object it lacks, none for one it holds."""
    from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info

    names = sorted(blobs)
    have: set[str] = set()
    for k in range(0, len(names), _BATCH):
        chunk = names[k:k + _BATCH]
        infos = [UploadInfo(size=blobs[n][0], sample=b"", sha256=bytes.fromhex(blobs[n][1])) for n in chunk]
        actions, errors, _ = post_lfs_batch_info(
            upload_infos=infos, token=None, repo_type="model", repo_id=repo_id,
            revision=quote(branch or "main", safe=""), endpoint=api.endpoint, headers=api._build_hf_headers())
        if errors:
            raise ValueError("LFS batch API returned errors:\n" + "\n".join(
                f"Encountered error for file with OID {e.get('oid')}: `{(e.get('error') or {}).get('message')}"
                for e in errors))
        have |= {a["oid"] for a in actions if a.get("actions") is None}
    return {n for n in names if blobs[n][1] in have}


def ignored(api, repo_id: str, branch: str | None, paths: list[str], gitignore: str | None) -> list[str]:
    """The paths the Hub would leave out of a commit (`shouldIgnore`): by `gitignore` when given (the output's
    own .gitignore, which the commit brings), else by the repository's. One preupload request per 256 paths,
    with empty contents, so that nothing is uploaded (the client sends an empty file in git)."""
    from huggingface_hub import CommitOperationAdd

    if not paths:
        return []
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=b"") for p in paths]
    api.preupload_lfs_files(repo_id, additions=ops, revision=branch, gitignore_content=gitignore)
    return [op.path_in_repo for op in ops if op._should_ignore]


def repo_text(api, repo_id: str, revision: str | None, path: str) -> str | None:
    """A small file of the repository (its .gitignore), None when it has none or it cannot be read."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_session

    try:
        url = hf_hub_url(repo_id, path, revision=revision or "main", endpoint=api.endpoint)
        answer = get_session().get(url, headers=api._build_hf_headers(), follow_redirects=True)
        return answer.text if answer.status_code == 200 else None
    except Exception:  # noqa: BLE001 - only used to name a rule in a message
        return None


def ignore_rule(path: str, text: str | None) -> str | None:
    """The .gitignore rule that ignores `path` (the last matching one, as git decides), if `text` has one."""
    found = None
    for line in (text or "").splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = rule[1:] if negated else rule
        if _matches(path, pattern):
            found = None if negated else rule
    return found


def _matches(path: str, pattern: str) -> bool:
    directory = pattern.endswith("/")
    pattern = pattern.strip("/") if "/" in pattern.rstrip("/") else pattern.rstrip("/")
    parts = path.split("/")
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + (0 if directory else 1))]
    if "/" in pattern:  # anchored at the repository's root
        return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)
    names = parts[:-1] if directory else parts
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def branch_tree(api, repo_id: str, revision: str | None) -> dict:
    """path -> RepoFile at a revision (the branch's head when it names a branch)."""
    from huggingface_hub.hf_api import RepoFile

    return {e.path: e for e in api.list_repo_tree(repo_id, revision=revision, recursive=True)
            if isinstance(e, RepoFile)}


def differences(tree: dict, expected: dict[str, Want], exact: bool) -> list[str]:
    """What keeps `tree` from holding `expected` (every path at its size and content, and, when `exact`, no other
    file but the housekeeping ones): one phrase per path, empty when it holds it."""
    found = []
    for path, want in sorted(expected.items()):
        entry = tree.get(path)
        if entry is None:
            found.append(f"{path} missing")
            continue
        lfs = entry.lfs
        size = lfs.size if lfs is not None else entry.size
        if size != want.size:
            found.append(f"{path} holds {size} bytes, not {want.size}")
        elif lfs is not None and want.sha256 is not None and lfs.sha256 != want.sha256:
            found.append(f"{path} holds another sha256")
        elif lfs is None and want.git is not None and entry.blob_id != want.git:
            found.append(f"{path} holds other bytes")
        elif lfs is None and want.git is None and want.sha256 is not None:
            found.append(f"{path} is kept in git, not as the LFS blob uploaded")
    if exact:
        found += [f"{p} is not part of the output" for p in sorted(set(tree) - set(expected) - HOUSEKEEPING)]
    return found


# --- one line per failure ---------------------------------------------------------------------------------------


def describe(exc: BaseException, doing: str, repo_id: str, where: str, tries: int = 1,
             uploaded: bool = False) -> PublishError:
    """One line for a failure of the Hub client; `uploaded`: whether blobs of this output are on the Hub already
    (then a rerun resumes their upload rather than starting it)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, RepositoryNotFoundError

    from .hub import _is_network_error

    again = ("; the uploaded blobs stay on the Hub: rerun the same command to resume the upload" if uploaded else
             "; nothing was uploaded yet: rerun the same command")
    cause = root_cause(exc)
    if isinstance(cause, PublishError):
        return cause
    if isinstance(cause, LocalTokenNotFoundError):
        return PublishError(f"--push-to-hub {repo_id}: no Hugging Face token: set HF_TOKEN to a write token, or run "
                            "`hf auth login`")
    text = str(cause)
    refused = _batch_errors(text)
    if refused:  # the LFS batch endpoint refused objects: its own reasons, permanent unless a quota
        text = refused[0][1]
        if "quota" not in text.lower():
            return PublishError(f"{where}: the Hub refused the upload while {doing}: {text[:300]}")
    if "quota" in text.lower() or (isinstance(cause, HfHubHTTPError) and cause.response is not None
                                   and cause.response.status_code in (402, 413, 507)):
        return PublishError(f"{where}: the Hub refused the upload while {doing}: storage quota exceeded "
                            f"({first_line(text)}); free space on the account or upgrade it, then rerun the same "
                            "command")
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        status = cause.response.status_code
        if status == 401:
            return PublishError(f"{where}: the Hub refused the token (HTTP 401) while {doing}: check HF_TOKEN")
        if status == 403:
            return PublishError(f"{where}: no write access (HTTP 403) while {doing}: the token's account cannot "
                                f"write to {repo_id.split('/')[0]}")
        if isinstance(cause, RepositoryNotFoundError) or status == 404:
            return PublishError(f"{where}: repository or branch not found (HTTP 404) while {doing}")
        if status in (409, 412):
            return PublishError(f"{where}: the repository changed during the run (HTTP {status}) while {doing}; "
                                "rerun the same command")
        later = f", {tries_text(tries)}{again}" if status >= 500 or status == 429 else ""
        reason = _server_message(cause)
        return PublishError(f"{where}: the Hub answered HTTP {status} while {doing}"
                            + (f" ({reason})" if reason and not later else "") + later)
    if _is_network_error(cause) or isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
        return PublishError(f"{where}: cannot reach the Hub at {constants.ENDPOINT} while {doing}, "
                            f"{tries_text(tries)}{again}")
    return PublishError(f"{where}: {doing} failed: {type(cause).__name__}: {first_line(text)}{again}")


def _batch_errors(text: str) -> list[tuple[str, str]]:
    """(oid, message) of each object an LFS batch answer refused, from huggingface_hub's `ValueError`."""
    if not text.startswith("LFS batch API returned errors"):
        return []
    return re.findall(r"Encountered error for file with OID (\S+): `(.*)", text)


def _server_message(cause) -> str:
    try:
        message = cause.response.headers.get("X-Error-Message") or cause.response.json().get("error")
    except Exception:  # noqa: BLE001 - a body that is not JSON
        return ""
    return first_line(str(message or ""))


def transient(exc: BaseException) -> bool:
    """A failure another try may get past: no answer, or an HTTP 429/5xx."""
    from huggingface_hub.errors import HfHubHTTPError

    from .hub import _is_network_error

    cause = root_cause(exc)
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        return cause.response.status_code == 429 or cause.response.status_code >= 500
    return _is_network_error(cause)


def unknown_outcome(exc: BaseException) -> bool:
    """A commit whose fate the client cannot know: no answer (the Hub may have made it), an HTTP 5xx, or a 412
    (a retry of a commit the Hub made, whose answer was lost, finds the branch moved)."""
    from huggingface_hub.errors import HfHubHTTPError

    cause = root_cause(exc)
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        return cause.response.status_code == 412 or cause.response.status_code >= 500
    return transient(exc) or isinstance(cause, OSError)


def root_cause(exc: BaseException) -> BaseException:
    """huggingface_hub wraps an upload's failure (`RuntimeError: Error while uploading ...`): its cause says why."""
    seen = 0
    while isinstance(exc, RuntimeError) and exc.__cause__ is not None and seen < 5:
        exc, seen = exc.__cause__, seen + 1
    return exc


def tries_text(n: int) -> str:
    """The client tries a request 6 times; convert-fp8 tries it again `n - 1` times."""
    return f"after {6 * n} tries with backoff"


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(2**24)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
