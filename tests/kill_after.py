"""Run `convert-fp8 ARGS` and SIGKILL the process at a chosen point, as a crash would.

    python tests/kill_after.py pieces N ARGS...    # after the N-th piece is recorded in the manifest
    python tests/kill_after.py finalize ARGS...    # when the last part starts to finalize
"""

import os
import signal
import sys

from converter import convert, manifest
from converter.cli import main

mode = sys.argv[1]
if mode == "pieces":
    limit = int(sys.argv[2])
    args = sys.argv[3:]
    record = manifest.Manifest.record
    count = [0]

    def record_then_maybe_die(self, piece):
        record(self, piece)
        count[0] += 1
        if count[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    manifest.Manifest.record = record_then_maybe_die
elif mode == "finalize":
    args = sys.argv[2:]
    real = convert.finalize_if_complete

    def die_when_complete(out, plan, source, options, notes):
        n = options.part[1]
        if all((out.staging / f"part-{k}-of-{n}.done").exists() for k in range(1, n + 1)):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(out, plan, source, options, notes)

    convert.finalize_if_complete = die_when_complete
else:
    raise SystemExit(f"unknown mode {mode}")

sys.argv = ["convert-fp8", *args]
main()
