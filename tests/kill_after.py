"""Run `convert-fp8 ARGS` and SIGKILL the process at a chosen point, as a crash would.

    python tests/kill_after.py pieces N ARGS...    # after the N-th piece is recorded in the manifest
    python tests/kill_after.py writes N ARGS...    # after the N-th piece is written (before it is on disk)
    python tests/kill_after.py finalize ARGS...    # when the last part starts to finalize
    python tests/kill_after.py moving N ARGS...    # after N entries of the finished output were moved into place
    python tests/kill_after.py cleanup ARGS...     # all moved, after the first file of the staging folder is removed
    python tests/kill_after.py interrupt N MARKER ARGS...
        # Ctrl-C (SIGINT) after the N-th piece; each piece is recorded slowly, so the run would go on for
        # seconds; MARKER is written with the time of the signal
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

    def record_then_maybe_die(self, pieces):
        for piece in pieces:  # one at a time: killed after exactly the N-th
            record(self, [piece])
            count[0] += 1
            if count[0] >= limit:
                os.kill(os.getpid(), signal.SIGKILL)

    manifest.Manifest.record = record_then_maybe_die
elif mode == "writes":
    from converter.write import ShardWriter

    limit = int(sys.argv[2])
    args = sys.argv[3:]
    count = [0]
    for method in ("write_at", "copy_at"):
        def write_then_maybe_die(self, *a, _real=getattr(ShardWriter, method), **k):
            _real(self, *a, **k)
            count[0] += 1
            if count[0] >= limit:
                os.kill(os.getpid(), signal.SIGKILL)

        setattr(ShardWriter, method, write_then_maybe_die)
elif mode == "moving":
    from converter import output_dir as write

    limit = int(sys.argv[2])
    args = sys.argv[3:]
    count = [0]
    real_replace = os.replace

    def replace_then_maybe_die(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if write.STAGING_NAME in str(src) and write.STAGING_NAME not in str(dst):
            count[0] += 1
            if count[0] >= limit:
                os.kill(os.getpid(), signal.SIGKILL)

    write.os.replace = replace_then_maybe_die
elif mode == "cleanup":
    from converter import output_dir as write

    args = sys.argv[2:]
    moved = [False]
    real_replace, real_unlink = os.replace, os.unlink

    def replace_and_note(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if write.STAGING_NAME in str(src) and write.STAGING_NAME not in str(dst):
            moved[0] = True

    def unlink_then_die(path, *a, **k):
        real_unlink(path, *a, **k)
        if moved[0] and write.STAGING_NAME in str(path):
            os.kill(os.getpid(), signal.SIGKILL)

    write.os.replace = replace_and_note
    write.os.unlink = unlink_then_die
elif mode == "finalize":
    args = sys.argv[2:]
    real = convert.finalize_if_complete

    def die_when_complete(out, plan, source, options, notes, **more):
        n = options.part[1]
        if all((out.staging / f"part-{k}-of-{n}.done").exists() for k in range(1, n + 1)):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(out, plan, source, options, notes, **more)

    convert.finalize_if_complete = die_when_complete
elif mode == "interrupt":
    import time

    limit, marker = int(sys.argv[2]), sys.argv[3]
    args = sys.argv[4:]
    record = manifest.Manifest.record
    count = [0]

    def record_slowly_then_interrupt(self, pieces):
        for piece in pieces:
            time.sleep(0.1)
            record(self, [piece])
            count[0] += 1
            if count[0] == limit:
                with open(marker, "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGINT)

    manifest.Manifest.record = record_slowly_then_interrupt
    # as in a terminal: a shell without job control starts background commands with SIGINT ignored, which Python
    # then leaves ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
else:
    raise SystemExit(f"unknown mode {mode}")

sys.argv = ["convert-fp8", *args]
main()
