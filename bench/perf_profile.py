"""Where a conversion's CPU goes: the command under `perf record`, its samples summed by what ran them.

    python bench/perf_profile.py --src SLICE --dst OUT [convert-fp8 options...]

Prints one table: the numba kernels by name (perf learns their addresses from a `/tmp/perf-PID.map` this script
writes as the conversion ends), CRC-32C, the Python interpreter, the C library, the operating system's kernel, and
the rest. The kernels are compiled anew, into a fresh numba cache, so that their symbols are known (a kernel loaded
from the cache is machine code without them); the samples taken while one compiles are left out, so the figures
are those of a run with a warm cache. Needs `perf` (Debian: linux-perf) and root or
`kernel.perf_event_paranoid <= 1`; the output folder is removed afterwards.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _write_perf_map() -> None:
    """Name every compiled numba kernel of this process for perf (`perf-PID.map`: start, size, name)."""
    from converter import quantize_fast

    entries = []
    for dispatcher in quantize_fast._kernels.values():
        for compiled in dispatcher.overloads.values():
            library = compiled.library
            for function in library._final_module.functions:
                if function.is_declaration:
                    continue
                address = library.get_pointer_to_function(function.name)
                if address:  # named after the kernel: its parallel loop is a function of numba's own naming
                    part = "parallel_loop" if "parfor" in function.name else "driver"
                    entries.append((address, f"{dispatcher.py_func.__name__}/{part}"))
    entries = sorted(set(entries))
    with open(f"/tmp/perf-{os.getpid()}.map", "w") as f:
        for k, (address, name) in enumerate(entries):
            end = entries[k + 1][0] if k + 1 < len(entries) else address + 2**16
            f.write(f"{address:x} {min(end - address, 2**20):x} {name}\n")


def _child(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    atexit.register(_write_perf_map)
    from converter import quantize_fast
    from converter.cli import main

    run = quantize_fast._run

    def run_noting_compilations(key, *args):
        if key in quantize_fast._kernels and quantize_fast._kernels[key].overloads:
            return run(key, *args)
        start = time.clock_gettime(time.CLOCK_MONOTONIC)  # the first call compiles
        try:
            return run(key, *args)
        finally:
            with open(os.environ["PERF_PROFILE_WINDOWS"], "a") as f:
                f.write(f"{start} {time.clock_gettime(time.CLOCK_MONOTONIC)}\n")

    quantize_fast._run = run_noting_compilations

    try:
        main(argv, standalone_mode=False)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _group(dso: str, symbol: str) -> str:
    if dso.startswith("perf-") and dso.endswith(".map"):  # the names _write_perf_map gave
        return f"numba kernel {symbol}"
    if "crc32c" in dso:
        return "CRC-32C (piece checksums)"
    if "libpython" in dso:
        return "Python interpreter"
    if dso.startswith("libc.") or dso.startswith("libc-"):
        return "C library (memmove, malloc)"
    if dso == "[kernel.kallsyms]":
        return "operating system (I/O, page faults)"
    if dso.startswith("libllvmlite") or dso.startswith("libffi"):
        return "numba's compiler"
    return f"other: {dso}"


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--child"]:
        return _child(args[1:])
    if shutil.which("perf") is None:
        print("perf is not installed (Debian: apt install linux-perf)", file=sys.stderr)
        return 2
    dst = args[args.index("--dst") + 1] if "--dst" in args else None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        windows = Path(tmp) / "compiling"
        env = {**os.environ, "NUMBA_CACHE_DIR": str(Path(tmp) / "numba"), "PERF_PROFILE_WINDOWS": str(windows)}
        code = subprocess.call(["perf", "record", "-q", "-F", "499", "-k", "CLOCK_MONOTONIC", "-o", str(data), "--",
                                sys.executable, __file__, "--child", *args], env=env)
        if dst:
            shutil.rmtree(dst, ignore_errors=True)
        if code != 0:
            return code
        samples = subprocess.run(["perf", "script", "-i", str(data), "-F", "time,ip,sym,dso"],
                                 capture_output=True, text=True, check=True).stdout
        compiling = [tuple(map(float, line.split())) for line in windows.read_text().splitlines()] \
            if windows.exists() else []
    groups: dict[str, int] = {}
    for line in samples.splitlines():
        found = re.match(r"\s*([\d.]+):\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$", line)
        if not found:
            continue
        when, symbol, dso = float(found.group(1)), found.group(2), Path(found.group(3)).name
        if any(start <= when <= end for start, end in compiling):
            continue
        group = _group(dso, symbol)
        groups[group] = groups.get(group, 0) + 1
    total = sum(groups.values()) or 1
    for name in [name for name, count in groups.items() if name.startswith("other: ") and count < total / 100]:
        groups["other (each under 1%)"] = groups.get("other (each under 1%)", 0) + groups.pop(name)
    print(f"{total} samples at 499 Hz ({total / 499:.1f} CPU-s), kernel compilation left out")
    print("| where | share of the CPU samples |")
    print("| --- | --- |")
    for name, count in sorted(groups.items(), key=lambda item: -item[1]):
        print(f"| {name} | {100 * count / total:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
