"""Progress that survives a killed run: the run's identity, and a manifest of the pieces already written.

Every piece (a 16 MiB chunk of a copied tensor, a stripe of an FP8 weight, the scale rows of that stripe) is
appended to the manifest, with a CRC-32C of all its bytes, by the shard's writer once its bytes are confirmed on
disk (see `write.ShardWriter`): a piece whose write-back failed is never recorded. A new run with the same
identity reads back every byte of each recorded piece and keeps those that still match, and writes the rest: the
header-first layout fixes every piece's place, so a partly written shard is continued, not restarted. The CRC
catches pieces never written, cut short or with holes anywhere (holes read as zeros).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
from json.encoder import encode_basestring_ascii as _json_string
from pathlib import Path
from typing import NamedTuple

from . import __version__
from .configs import STAGING_NAME
from .errors import UsageError, os_error

RUN_FILE = "run.json"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:  # not Linux
        return None


BOOT_ID = _boot_id()  # tells a process of this boot of the machine from one of an earlier boot with the same pid


def source_stamp(source) -> dict:
    """What tells one version of the source's weights from another without reading them: the resolved commit of
    a Hub source, or each local shard's size and modification time (a shard rewritten with equal headers and
    other values changes its modification time)."""
    if source.provider is not None:
        return {"commit": source.commit}
    stamp = {}
    for shard in source.shards:
        st = os.stat(source.root / shard)
        stamp[shard] = [st.st_size, st.st_mtime_ns]
    return stamp


def run_identity(source, plan, stamp: dict | None = None) -> str:
    """A digest of everything that decides the output bytes: the source's headers, sizes, config and stamp
    (see `source_stamp`), the plan (tensors, dtypes, shapes, shards, output config) and this tool's version."""
    state = {
        "tool": __version__,
        "source_stamp": source_stamp(source) if stamp is None else stamp,
        "source_config": source.config,
        "config": plan.config,
        "files": list(plan.files_to_copy),
    }
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode())
    # a line per tensor, names as JSON strings (no line break inside), formatted directly: an MoE has tens of
    # thousands
    digest.update("".join(f"{_json_string(t.name)} {t.dtype} {t.shape} {_json_string(t.shard)} {t.offset} {t.nbytes}\n"
                          for t in sorted(source.tensors.values(), key=lambda t: t.name)).encode())
    for shard in plan.shards:
        digest.update(f"shard {_json_string(shard.name)}\n".encode())
        digest.update("".join(f"{_json_string(t.name)} {t.action} {t.dtype} {tuple(t.shape)}\n"
                              for t in shard.tensors).encode())
    return digest.hexdigest()


class Piece(NamedTuple):  # a tuple: made for each of tens of thousands of pieces
    """A written range of one tensor, with the CRC-32C of all its bytes. `sample` and `boot` are read from the
    manifests of earlier versions (a CRC of the piece's ends, and the boot it was written in) and not used: every
    byte of a kept piece is checked."""

    shard: str
    tensor: str
    start: int
    length: int
    crc: int
    sample: int | None = None
    boot: str | None = None


class Manifest:
    """An append-only JSON-lines file of written pieces; safe to append from several threads."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None

    def load(self) -> dict[tuple[str, str, int], Piece]:
        """Recorded pieces by (shard, tensor, start); a line cut short by a kill is ignored."""
        pieces = {}
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return pieces
        for line in lines:
            try:
                p = Piece(**json.loads(line))
            except (ValueError, TypeError):
                continue
            pieces[(p.shard, p.tensor, p.start)] = p
        return pieces

    def record(self, pieces: list[Piece]) -> None:
        """Append pieces whose bytes are on disk (only a `ShardWriter` knows when that is), in one write."""
        # the lines json.dumps would write, formatted directly: tens of thousands of pieces in an MoE
        data = "".join(f'{{"shard":{_json_string(p.shard)},"tensor":{_json_string(p.tensor)},"start":{p.start},'
                       f'"length":{p.length},"crc":{p.crc}}}\n' for p in pieces).encode()
        with self._lock:
            try:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.write(self._fd, data)
            except OSError as exc:
                raise os_error(exc, self.path, "recording the written pieces") from None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    os.fsync(fd)
                except OSError as exc:
                    raise os_error(exc, self.path, "flushing the record of written pieces") from None
                finally:
                    os.close(fd)


def claim_run(staging: Path, record: dict, overwrite: bool) -> bool:
    """Make `staging/run.json` hold this run, or find it there. Returns True when an earlier run of the same
    identity left work to resume.

    Raises:
        UsageError: the staging folder holds another run's work (other source, options or part count), and
            `overwrite` is False.
    """
    path = staging / RUN_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                found = json.loads(path.read_text())
            except (OSError, ValueError):
                found = {}
            if found.get("identity") == record["identity"] and found.get("parts") == record["parts"]:
                return True
            if not overwrite:
                changed = _changed_source_file(found, record)
                if changed:
                    raise UsageError(
                        f"{staging.parent}: holds the partial output of a conversion of {record['src']}, whose "
                        f"{changed} changed since; its bytes would mix with the new ones: pass --overwrite to "
                        "start over"
                    ) from None
                raise UsageError(
                    f"{staging.parent}: holds the partial output of a different conversion (source "
                    f"{found.get('src', '?')}, other source files, options or part count); pass --overwrite to "
                    "discard it, or use another --dst"
                ) from None
            shutil.rmtree(staging)
            staging.mkdir()
            continue
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise os_error(exc, path, "writing the run record") from None
        return False
    raise UsageError(f"{staging}: another process keeps replacing the run record")


def _changed_source_file(found: dict, record: dict) -> str | None:
    """The first source file (or the Hub commit) that differs between two run records of the same source."""
    before, now = found.get("source_stamp"), record.get("source_stamp")
    if found.get("src") != record.get("src") or not isinstance(before, dict) or before == now:
        return None
    for name in sorted(set(before) | set(now)):
        if before.get(name) != now.get(name):
            return f"commit ({before.get(name)} -> {now.get(name)})" if name == "commit" else name
    return None


class PartLock:
    """`part-I-of-N.lock` in the staging folder, holding host, boot id and pid: a second process converting the
    same part on the same host is refused (its writes would race the first's); a lock whose process is gone is
    taken over, and so is one written before the machine last started (its pid may since name an unrelated
    process). Hosts cannot see each other's processes: a lock from another host is reported and taken over."""

    def __init__(self, staging: Path, part: tuple[int, int]):
        self.path = staging / f"part-{part[0]}-of-{part[1]}.lock"
        self.part = part

    def acquire(self) -> str | None:
        """Take the lock; returns a note when another host's lock was taken over."""
        me = {"host": socket.gethostname(), "boot": BOOT_ID, "pid": os.getpid()}
        note = None
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            held = None
        if not isinstance(held, dict):
            held = None
        same_boot = held is not None and (held.get("boot") is None or me["boot"] is None or held["boot"] == me["boot"])
        if (held and held.get("host") == me["host"] and same_boot and held.get("pid") != me["pid"]
                and _alive(held.get("pid"))):
            i, n = self.part
            raise UsageError(f"{self.path.parent.parent}: process {held['pid']} on this host is already converting "
                             f"part {i}/{n} into it; wait for it or stop it first")
        if held and held.get("host") != me["host"]:
            note = f"took over part {self.part[0]}/{self.part[1]} from host {held.get('host')}, pid {held.get('pid')}"
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(me))
            os.replace(tmp, self.path)
        except OSError as exc:
            raise os_error(exc, self.path, "locking the part") from None
        return note

    def release(self) -> None:
        """Remove the lock; a lock that cannot be removed (a file system turned read-only) is left: the next run
        takes over a lock whose process is gone."""
        try:
            self.path.unlink()
        except OSError:
            pass


def take_lock(path: Path) -> bool:
    """Create the lock file `path` holding this process (host, boot id, pid), atomically with its content.
    Returns False when another live process holds it, or its folder is gone. A lock whose holder is gone (a
    process of this host that no longer runs, of an earlier boot, or an empty lock of an earlier version) is taken
    over: a run killed while it held the lock would otherwise block every later one."""
    me = {"host": socket.gethostname(), "boot": BOOT_ID, "pid": os.getpid()}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(me))
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise os_error(exc, path, "taking the lock") from None
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                try:
                    held = json.loads(path.read_text())
                except FileNotFoundError:
                    continue
                except (OSError, ValueError):
                    held = None
                if isinstance(held, dict) and held.get("host") != me["host"]:
                    return False  # another host's process: it cannot be seen from here
                if isinstance(held, dict) and held.get("boot") in (None, me["boot"]) and _alive(held.get("pid")):
                    return False
                path.unlink(missing_ok=True)
            except FileNotFoundError:
                return False
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def read_run(staging: Path) -> dict:
    path = staging / RUN_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{staging.parent}: no partial conversion to finalize (no {STAGING_NAME}/{RUN_FILE})") from None
    except ValueError as exc:
        raise UsageError(f"{path}: unreadable run record: {exc}") from None
