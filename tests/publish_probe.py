"""Run `convert-fp8 ARGS` with two probes for the publishing tests, each appending to the file PROBE_LOG names
(a line per event, so that a run killed with SIGKILL still leaves what it saw):

- `sha256 NAME`: huggingface_hub hashed a file (the LFS path hashes each shard before its upload);
- `staged BYTES`: after a write into a shard, the bytes the staging folder's shards take on disk (allocated
  blocks: a shard is sized in full before its data is written), each time a new maximum is reached.

    python -m tests.publish_probe ARGS...
"""

import os
import sys
from pathlib import Path

import huggingface_hub.lfs as lfs

from converter.cli import main
from converter.write import ShardWriter

LOG = os.environ["PROBE_LOG"]
_most = [0]


def _note(line: str) -> None:
    with open(LOG, "a") as f:
        f.write(line + "\n")


def _hashing(fileobj, *args, _real=lfs.sha_fileobj, **kwargs):
    _note(f"sha256 {Path(getattr(fileobj, 'name', '?')).name}")
    return _real(fileobj, *args, **kwargs)


lfs.sha_fileobj = _hashing


def _staged(folder: Path) -> int:
    total = 0
    for path in folder.glob("*.safetensors"):
        try:
            total += path.stat().st_blocks * 512
        except FileNotFoundError:  # removed meanwhile
            pass
    return total


for _method in ("write_at", "copy_at"):
    def _measuring(self, *args, _real=getattr(ShardWriter, _method), **kwargs):
        _real(self, *args, **kwargs)
        now = _staged(self.path.parent)
        if now > _most[0]:
            _most[0] = now
            _note(f"staged {now}")

    setattr(ShardWriter, _method, _measuring)

if __name__ == "__main__":
    sys.argv[0] = "convert-fp8"
    main()
