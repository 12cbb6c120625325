"""What a publish checks and keeps on disk beside its Hub conversation: a written shard checked before it is sent
(its header and size the plan's, its scales finite and positive), and the record of the uploads (`PENDING_RECORD`),
written whole or not at all, whose entries name a blob by size and sha256."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import PublishError
from .plan import SCALE, ShardPlan
from .source import read_header

def check_shard(path: Path, shard: ShardPlan):
    """A shard is uploaded only once its header is, byte for byte, the one the plan gives, and its size the
    plan's. Returns the header."""
    from .write import read_back_header

    try:
        header_ok, size_ok = read_back_header(path, shard)
    except OSError as exc:
        raise PublishError(f"{path}: cannot read the written shard ({exc.strerror}); not uploaded") from None
    if not (header_ok and size_ok):
        raise PublishError(f"{path}: the written shard does not match the plan; not uploaded")
    return read_header(path)


def check_scales(path: Path, shard: ShardPlan, header) -> None:
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


def covers(pieces: list[tuple[int, int]], nbytes: int) -> bool:
    """Whether `(start, length)` ranges cover `[0, nbytes)` without a gap."""
    end = 0
    for start, length in sorted(pieces):
        if start > end:
            return False
        end = max(end, start + length)
    return end >= nbytes


def entry_ok(entry) -> bool:
    """Whether a record's entry names a blob: an int size and a 64-digit sha256."""
    return (isinstance(entry, dict) and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64)


def write_json(path: Path, data: dict) -> None:
    """Write a record whole or not at all (a temporary file, synced, renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
