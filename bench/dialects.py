"""Every output dialect on the gemma-4-31B slice, side by side with llm-compressor's `model_free_ptq`.

    python bench/dialects.py [--dir /tmp/convert-fp8-bench] [--llmc-python .venv-llmc/bin/python] [--no-llmc]

Uses the slice that bench/bench.py builds (bench/make_slice.py, built here when absent). The source is read before
each of our runs so that every one starts from the same warm page cache; each run writes to disk and is synced before
its clock stops. For each dialect: wall time, its ratio to the float-scale fp8 default in the same run, source GB/s
and the peak resident memory of the process (its `ru_maxrss`). llm-compressor (in its own venv: llmcompressor
0.14.0.1, transformers 5.17, compressed-tensors 0.19, the same torch) runs the same schemes on the same source with
our `ignore` list, on the CPU with its default one worker, and every tensor of its output is compared with ours;
without that venv (`make test-slow` builds it) the script says so and prints our rows. Last, each dialect's
quantization alone: its numba kernel and its torch formula on one stripe.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CT = ["--format", "compressed-tensors"]
DIALECTS = [  # (label, options, llm-compressor's scheme, FP8Scheme arguments)
    ("fp8, float32 scales (64x64)", [], None, (64,)),
    ("fp8 --scale-fmt ue8m0 (64x64)", ["--scale-fmt", "ue8m0"], None, (64, "fp8", "fp8-block", "ue8m0")),
    ("compressed-tensors fp8-block (128x128)", CT, "FP8_BLOCK", (128, "compressed-tensors")),
    ("compressed-tensors fp8-dynamic", [*CT, "--scheme", "fp8-dynamic"], "FP8_DYNAMIC",
     (128, "compressed-tensors", "fp8-dynamic")),
    ("compressed-tensors mxfp8", [*CT, "--scheme", "mxfp8"], "MXFP8", (128, "compressed-tensors", "mxfp8")),
    ("compressed-tensors mxfp8a16", [*CT, "--scheme", "mxfp8a16"], "MXFP8A16",
     (128, "compressed-tensors", "mxfp8a16")),
]

LLMC_SCRIPT = """
import json, sys
from llmcompressor import model_free_ptq
model_free_ptq(sys.argv[1], sys.argv[2], scheme=sys.argv[3], ignore=json.loads(sys.argv[4]), device="cpu")
"""


def run(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Run a command; return (wall seconds including a final sync, peak resident bytes of the process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    os.sync()
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def same_tensors(ours: Path, theirs: Path) -> str:
    """Compare every tensor of two checkpoints, byte for byte, one tensor at a time."""
    import torch
    from safetensors import safe_open

    def index(folder):
        out = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                out.update(dict.fromkeys(f.keys(), shard))
        return out

    a, b = index(ours), index(theirs)
    if set(a) != set(b):
        return f"different tensor sets ({len(set(a) ^ set(b))} names differ)"
    differ = []
    for name in a:
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.contiguous().view(torch.uint8),
                                                                            y.contiguous().view(torch.uint8)):
                differ.append(name)
    return f"all {len(a)} tensors identical" if not differ else f"{len(differ)} of {len(a)} differ, first {differ[0]}"


def kernel_rates() -> dict[str, tuple[float | None, float]]:
    """GB/s of BF16 through each dialect's fused numba kernel (None without numba) and through its torch formula,
    on one 16 MiB stripe of a 5376-wide weight (what the quantizer hands them), best of 5."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from converter import quantize_fast
    from converter.configs import FP8Scheme
    from converter.dialects import writer_for

    torch.manual_seed(0)
    weight = (torch.randn(1536, 5376) * 0.02).to(torch.bfloat16)
    raw = weight.view(torch.uint8).numpy().reshape(-1)
    out = np.empty((1536, 5376), np.uint8)

    def rate(run_once) -> float:
        run_once()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            run_once()
            best = min(best, time.perf_counter() - start)
        return weight.numel() * 2 / best / 1e9

    rates = {}
    for label, _, _, scheme in DIALECTS:
        writer = writer_for(FP8Scheme(*scheme))
        k = writer.fused_kernel
        fused = None
        if k is not None and quantize_fast.available():
            grid = (-(-1536 // k.rows), 5376 // (k.cols or 5376))
            scales = np.empty(grid, quantize_fast.scale_dtype(k.rule, "BF16"))
            fused = rate(lambda: quantize_fast.quantize_rule_into(k.rule, raw, "BF16", out, scales, k.rows, k.cols,
                                                                 k.aux))
        rates[label] = (fused, rate(lambda: writer.quantize(weight)))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/convert-fp8-bench"))
    parser.add_argument("--llmc-python", type=Path, default=ROOT / ".venv-llmc" / "bin" / "python")
    parser.add_argument("--src", type=Path, default=None, help="another source instead of the slice")
    parser.add_argument("--no-llmc", action="store_true", help="our dialects only, without llm-compressor's runs")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OURS", "THEIRS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare:
        print(same_tensors(*args.compare))
        return 0
    os.chdir(ROOT)
    src = args.src or args.dir / "slice"
    if not (src / "config.json").exists():
        subprocess.run([sys.executable, "bench/make_slice.py", str(src)], check=True)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    env = dict(os.environ, CONVERT_FP8_NO_PROGRESS="1")
    llmc = args.llmc_python.exists() and not args.no_llmc
    rows = []  # (label, seconds, peak, llm-compressor's seconds, its peak, comparison)
    for label, options, llmc_scheme, _ in DIALECTS:
        dst = args.dir / "dialect-out"
        shutil.rmtree(dst, ignore_errors=True)
        warm(src)  # llm-compressor's run before this one (4 GB, and its output) may have pushed the source out
        seconds, peak = run([sys.executable, "-m", "converter.cli", "--src", str(src), "--dst", str(dst), "-q",
                             *options], env)
        theirs_seconds = theirs_peak = None
        compared = ""
        if llmc_scheme is not None and llmc:
            ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
            theirs = args.dir / "llmc-out"
            shutil.rmtree(theirs, ignore_errors=True)
            llmc_env = {k: v for k, v in env.items() if not k.startswith("PYTHON")}
            theirs_seconds, theirs_peak = run([str(args.llmc_python), "-c", LLMC_SCRIPT, str(src), str(theirs),
                                               llmc_scheme, json.dumps(ignore)], llmc_env)
            # compared in a child: a forked process inherits its parent's peak RSS, so the runs after a comparison
            # made here would report the comparison's memory as their own
            compared = subprocess.run([sys.executable, __file__, "--compare", str(dst), str(theirs)], check=True,
                                      capture_output=True, text=True).stdout.strip()
            shutil.rmtree(theirs, ignore_errors=True)
        rows.append((label, seconds, peak, theirs_seconds, theirs_peak, compared))
    shutil.rmtree(args.dir / "dialect-out", ignore_errors=True)
    rates = kernel_rates()  # last: it loads torch into this process
    print(f"slice: {src} ({src_bytes / 2**30:.2f} GiB); machine: {os.cpu_count()} cores, CPU vector features "
          f"{vector_features()}; warm page cache, output on disk, synced")
    if not args.llmc_python.exists():
        print(f"llm-compressor: {args.llmc_python} not found (make test-slow builds it); its columns are empty")
    elif args.no_llmc:
        print("llm-compressor: not run (--no-llmc)")
    fp8 = rows[0][1]
    print("| dialect | time | vs fp8 float | source rate | peak resident memory | llm-compressor model_free_ptq "
          "| its peak memory | bytes against llm-compressor |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, seconds, peak, theirs, theirs_peak, compared in rows:
        llmc_cells = (f"{theirs:.1f} s | {theirs_peak / 2**20:.0f} MiB" if theirs is not None else "- | -")
        print(f"| convert-fp8 {label} | {seconds:.1f} s | {seconds / fp8:.2f}x | {src_bytes / seconds / 1e9:.2f} GB/s "
              f"| {peak / 2**20:.0f} MiB | {llmc_cells} | {compared or '-'} |")
    print("\n| quantization alone, one 1536x5376 BF16 stripe, best of 5 | numba kernel | torch formula |\n"
          "| --- | --- | --- |")
    for label, (fused, formula) in rates.items():
        print(f"| {label} | {f'{fused:.2f} GB/s' if fused else '-'} | {formula:.2f} GB/s |")
    return 0


def warm(src: Path) -> None:
    """Read the source, so that every run starts from the same warm page cache."""
    for shard in src.glob("*.safetensors"):
        with open(shard, "rb") as f:
            while f.read(64 * 2**20):
                pass


def vector_features() -> str:
    """The x86 vector extensions the CPU reports (AVX, AVX2, AVX-512 subsets, FMA), or what the machine is."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        import platform

        return platform.machine()
    found = sorted({f for f in flags if f.startswith("avx") or f == "fma"})
    return ", ".join(found) + ("" if any(f.startswith("avx512") for f in found) else ", no AVX-512")


if __name__ == "__main__":
    sys.exit(main())
