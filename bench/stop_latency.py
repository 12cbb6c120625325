"""How fast a conversion stops: from a failed transformers cross-check, and from Ctrl-C, to the process exit.

    python bench/stop_latency.py [--dir /tmp/convert-fp8-bench] [--reps 2] [--sigint-after 3]

On the bench slice (bench/make_slice.py, built if absent). The cross-check is made to fail for real: a preset
without the `lm_head` exclusion, which transformers (with the tied head) would load as FP8; its cache is emptied so
the check runs in full. Each run is a child process that notes when the check raised (or when SIGINT was sent)
and when it exited; the table gives that gap, which is what a user waits for once the run is doomed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import atexit, json, os, signal, sys, threading, time
from converter import arch
from converter.cli import main

marks = {"start": time.monotonic()}
mode, delay, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
if mode == "arch":
    real = arch.cross_check
    def timed(plan):
        try:
            return real(plan)
        except BaseException:
            marks["event"] = time.monotonic()
            raise
    arch.cross_check = timed
else:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell may start us with SIGINT ignored
    def later():
        time.sleep(delay)
        marks["event"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=later, daemon=True).start()

@atexit.register
def report():
    marks["exit"] = time.monotonic()
    with open(out, "w") as f:
        json.dump(marks, f)

sys.argv = ["convert-fp8", *sys.argv[4:]]
main()
"""


def run(mode: str, delay: float, args: list[str], cache: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as marks:
        env = dict(os.environ, CONVERT_FP8_NO_PROGRESS="1", CONVERT_FP8_CACHE_DIR=str(cache))
        done = subprocess.run([sys.executable, "-c", CHILD, mode, str(delay), marks.name, *args], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        found = json.loads(Path(marks.name).read_text())
    found["code"], found["stderr"] = done.returncode, done.stderr.strip().splitlines()[-1:]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/convert-fp8-bench"))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--sigint-after", type=float, default=3.0, help="seconds into the run")
    args = parser.parse_args()
    src, dst = args.dir / "slice", args.dir / "stop-out"
    if not (src / "config.json").exists():
        subprocess.run([sys.executable, "bench/make_slice.py", str(src)], cwd=ROOT, check=True)
    preset = args.dir / "no-lm-head.json"
    preset.write_text(json.dumps({"description": "lm_head left to FP8", "block_size": 64,
                                  "modules_to_not_convert": ["model.vision_tower"]}))
    rows = []
    for k in range(args.reps):
        for mode in ("arch", "sigint"):
            shutil.rmtree(dst, ignore_errors=True)
            cache = args.dir / f"stop-cache-{k}"
            shutil.rmtree(cache, ignore_errors=True)
            extra = ["--config", str(preset)] if mode == "arch" else ["--no-arch-check"]
            marks = run(mode, args.sigint_after, ["--src", str(src), "--dst", str(dst), *extra], cache)
            shutil.rmtree(cache, ignore_errors=True)
            event = marks.get("event")
            rows.append((mode, event - marks["start"] if event else None, marks["exit"] - marks["start"],
                         marks["exit"] - event if event else None, marks["code"], dst.exists()))
    shutil.rmtree(dst, ignore_errors=True)
    print("| what | event at | exit at | event to exit | exit code | output left |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, event, end, gap, code, left in rows:
        what = "cross-check fails" if mode == "arch" else "Ctrl-C (SIGINT)"
        fmt = lambda t: "-" if t is None else f"{t:.2f} s"  # noqa: E731
        print(f"| {what} | {fmt(event)} | {fmt(end)} | {fmt(gap)} | {code} | "
              f"{'staged work kept' if left else 'nothing'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
