"""Lay the builtin kernel out as a local `kernels` build, for `LOCAL_KERNELS` or `--kernel local:PATH`.

    python -m converter.kernels.layout OUT_DIR

writes OUT_DIR/build/torch-cuda/{metadata.json, __init__.py}; then
LOCAL_KERNELS="kernels-community/finegrained-fp8=OUT_DIR/build/torch-cuda" makes transformers load it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path


KERNEL_NAME = "finegrained-fp8"
KERNEL_VERSION = 4  # the version transformers asks the Hub for
VARIANT = "torch-cuda"


def write_layout(out: Path) -> Path:
    """Write the build variant folder and return its path."""
    source = Path(__file__).parent / "finegrained_fp8" / "__init__.py"
    variant = Path(out) / "build" / VARIANT
    variant.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, variant / "__init__.py")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    metadata = {
        "name": KERNEL_NAME,
        "id": f"_finegrained_fp8_convert_fp8_{digest[:8]}",
        "version": KERNEL_VERSION,
        "license": "Apache-2.0",
        "python-depends": [],
        "backend": {"type": "cuda"},
    }
    (variant / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return variant


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        raise SystemExit(2)
    print(write_layout(Path(sys.argv[1])))
