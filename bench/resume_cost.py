"""What a resume costs: a synthetic Llama-shaped checkpoint converted once uninterrupted, then again killed with
SIGKILL at a fraction of that time and rerun with the same command; prints both times (wall, and CPU: user +
system, which moves less on a shared machine) and the rerun's share.

    python bench/resume_cost.py --dir /tmp/resume-cost [--layers 24] [--at 0.6] [--repeat 3]
    python bench/resume_cost.py --dir /tmp/resume-cost --src /tmp/convert-fp8-bench/slice-real-mix

`--src` takes an existing checkpoint (the 24-layer real-mix slice of `make bench`) instead of the synthetic one.

Each run drops the page cache first when it can (root), so the rerun reads back its kept pieces from the disk.
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
    clean, clean_cpu = [], []
    for k in range(ns.repeat):
        shutil.rmtree(reference, ignore_errors=True)
        wall, _, used = run(["--src", str(src), "--dst", str(reference), *common])
        clean.append(wall)
        clean_cpu.append(used)
    full, full_cpu = min(clean), min(clean_cpu)
    reruns, rerun_cpu = [], []
    for _ in range(ns.repeat):
        shutil.rmtree(dst, ignore_errors=True)
        _, rc, _ = run(["--src", str(src), "--dst", str(dst), *common], kill_after=full * ns.at)
        assert rc == -signal.SIGKILL, f"the run ended (rc {rc}) before the kill: raise --layers"
        wall, _, used = run(["--src", str(src), "--dst", str(dst), *common])
        reruns.append(wall)
        rerun_cpu.append(used)
        assert digest(dst) == digest(reference), "the resumed output differs from the uninterrupted one"
    print(f"source {size / 1e6:.0f} MB; uninterrupted {min(clean):.2f}-{max(clean):.2f} s, "
          f"{min(clean_cpu):.2f}-{max(clean_cpu):.2f} CPU-s; killed at {ns.at:.0%} of {full:.2f} s, rerun "
          f"{min(reruns):.2f}-{max(reruns):.2f} s ({min(reruns) / full:.2f}-{max(reruns) / full:.2f}x), "
          f"{min(rerun_cpu):.2f}-{max(rerun_cpu):.2f} CPU-s ({min(rerun_cpu) / full_cpu:.2f}-"
          f"{max(rerun_cpu) / full_cpu:.2f}x); same bytes")


if __name__ == "__main__":
    main()
