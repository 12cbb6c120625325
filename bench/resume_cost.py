"""What a resume costs: a synthetic Llama-shaped checkpoint converted uninterrupted, then again killed with SIGKILL
at a fraction of that run's time and rerun with the same command, `--repeat` times interleaved; prints the times
(wall, and CPU: user + system, which moves less on a shared machine) and each rerun's share of the uninterrupted
run before it.

    python bench/resume_cost.py --dir /tmp/resume-cost [--layers 24] [--at 0.6] [--repeat 3] [--settle 20]
    python bench/resume_cost.py --dir /tmp/resume-cost --src /tmp/convert-fp8-bench/slice-real-mix

`--src` takes an existing checkpoint (the 24-layer real-mix slice of `make bench`) instead of the synthetic one.

Each timed run follows a sync, a dropped page cache (when it can: root) and `--settle` idle seconds, so the rerun
reads back its kept pieces from the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: list[str], kill_after: float | None = None) -> tuple[float, int, float]:
    """(wall seconds, exit status, CPU seconds) of one run."""
    env = dict(os.environ, CONVERT_FP8_NO_PROGRESS="1")
    drop_caches()
    cpu_before = cpu()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "converter.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after is None:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(err.decode()[-2000:])
        return time.monotonic() - started, proc.returncode, cpu() - cpu_before
    try:
        proc.wait(kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return time.monotonic() - started, proc.returncode, cpu() - cpu_before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--at", type=float, default=0.6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-shard-size", default="100MB")
    parser.add_argument("--settle", type=float, default=20.0, help="idle seconds before each timed run")
    parser.add_argument("--src", type=Path, help="an existing checkpoint to convert (default: a synthetic one)")
    ns = parser.parse_args()
    src = ns.src
    if src is None:
        from tests.conftest import synthetic

        src = ns.dir / f"synthetic-{ns.layers}"
        if not src.exists():
            synthetic(src, layers=ns.layers)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    common = ["--max-shard-size", ns.max_shard_size, "--no-arch-check", "-q"]
    reference, dst = ns.dir / "reference", ns.dir / "out"
    for path in (reference, dst):
        shutil.rmtree(path, ignore_errors=True)
    # interleaved: each rerun beside the uninterrupted run before it, each timed run after the same idle time
    clean, clean_cpu, reruns, rerun_cpu = [], [], [], []
    first_digest = None
    for _ in range(ns.repeat):
        shutil.rmtree(reference, ignore_errors=True)
        settle(ns.settle)
        wall, _, used = run(["--src", str(src), "--dst", str(reference), *common])
        clean.append(wall)
        clean_cpu.append(used)
        first_digest = first_digest or digest(reference)
        shutil.rmtree(reference, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        settle(ns.settle)
        _, rc, _ = run(["--src", str(src), "--dst", str(dst), *common], kill_after=wall * ns.at)
        assert rc == -signal.SIGKILL, f"the run ended (rc {rc}) before the kill: raise --layers"
        settle(ns.settle)
        wall, _, used = run(["--src", str(src), "--dst", str(dst), *common])
        reruns.append(wall)
        rerun_cpu.append(used)
        assert digest(dst) == first_digest, "the resumed output differs from the uninterrupted one"
    pairs = " / ".join(f"{r / c:.2f}x" for r, c in zip(reruns, clean))
    print(f"source {size / 1e6:.0f} MB; uninterrupted {' / '.join(f'{c:.2f}' for c in clean)} s, "
          f"{min(clean_cpu):.2f}-{max(clean_cpu):.2f} CPU-s; killed at {ns.at:.0%} of the run before it, rerun "
          f"{' / '.join(f'{r:.2f}' for r in reruns)} s: {pairs} the uninterrupted run it followed, "
          f"best {min(reruns) / min(clean):.2f}x the best; "
          f"{min(rerun_cpu):.2f}-{max(rerun_cpu):.2f} CPU-s ({min(rerun_cpu) / min(clean_cpu):.2f}-"
          f"{max(rerun_cpu) / min(clean_cpu):.2f}x the least); same bytes")


def settle(seconds: float) -> None:
    """Sync, drop the page cache and idle: a virtual disk may still be writing the run before back."""
    drop_caches()
    time.sleep(seconds)

if __name__ == "__main__":
    main()
