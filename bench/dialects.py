"""Every output dialect on the gemma-4-31B slice, side by side with llm-compressor's `model_free_ptq`.

    python bench/dialects.py [--dir /tmp/convert-fp8-bench] [--llmc-python .venv-llmc/bin/python]

Uses the slice that bench/bench.py builds (bench/make_slice.py, built here when absent). The source is read once
beforehand so that every run starts from the same warm page cache; each run writes to disk and is synced before
its clock stops. For each dialect: wall time, source GB/s and the peak resident memory of the process (its
`ru_maxrss`). llm-compressor (in its own venv: llmcompressor 0.14.0.1, transformers 5.17, compressed-tensors
0.19, the same torch) runs the same schemes on the same source with our `ignore` list, on the CPU with its default
one worker, and every tensor of its output is compared with ours.
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

DIALECTS = [
    ("fp8, float32 scales (64x64)", [], None),
    ("fp8 --scale-fmt ue8m0 (64x64)", ["--scale-fmt", "ue8m0"], None),
    ("compressed-tensors fp8-block (128x128)", ["--format", "compressed-tensors"], "FP8_BLOCK"),
    ("compressed-tensors fp8-dynamic", ["--format", "compressed-tensors", "--scheme", "fp8-dynamic"], "FP8_DYNAMIC"),
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


def formula_rates() -> dict[str, float]:
    """GB/s of BF16 through each dialect's torch formula alone, on one 16 MiB stripe of a 5376-wide weight
    (what the quantizer hands it), best of 5; the fused numba kernel where the dialect uses it."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from converter import quantize_fast
    from converter.configs import FP8Scheme
    from converter.dialects import writer_for

    torch.manual_seed(0)
    weight = (torch.randn(1536, 5376) * 0.02).to(torch.bfloat16)
    schemes = {"fp8, float32 scales (64x64)": FP8Scheme(64),
               "fp8 --scale-fmt ue8m0 (64x64)": FP8Scheme(64, scale_fmt="ue8m0"),
               "compressed-tensors fp8-block (128x128)": FP8Scheme(128, "compressed-tensors"),
               "compressed-tensors fp8-dynamic": FP8Scheme(128, "compressed-tensors", "fp8-dynamic")}
    rates = {}
    for label, scheme in schemes.items():
        writer = writer_for(scheme)
        if writer.fused_kernel and quantize_fast.available():
            raw = weight.view(torch.uint8).numpy().reshape(-1)
            out = np.empty((1536, 5376), np.uint8)
            scales = np.empty((1536 // 64, 5376 // 64), np.float32)
            run_once = lambda: quantize_fast.quantize_into(raw, "BF16", out, scales, 64)  # noqa: E731
        else:
            run_once = lambda: writer.quantize(weight)  # noqa: E731
        run_once()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            run_once()
            best = min(best, time.perf_counter() - start)
        rates[label] = weight.numel() * 2 / best / 1e9
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/convert-fp8-bench"))
    parser.add_argument("--llmc-python", type=Path, default=ROOT / ".venv-llmc" / "bin" / "python")
    parser.add_argument("--src", type=Path, default=None, help="another source instead of the slice")
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
    for shard in src.glob("*.safetensors"):  # one warm page cache for every run
        with open(shard, "rb") as f:
            while f.read(64 * 2**20):
                pass
    env = dict(os.environ, CONVERT_FP8_NO_PROGRESS="1")
    rows = []
    for label, options, llmc_scheme in DIALECTS:
        dst = args.dir / "dialect-out"
        shutil.rmtree(dst, ignore_errors=True)
        seconds, peak = run([sys.executable, "-m", "converter.cli", "--src", str(src), "--dst", str(dst), "-q",
                             *options], env)
        rows.append((f"convert-fp8, {label}", seconds, peak, ""))
        if llmc_scheme is None:
            continue
        if not args.llmc_python.exists():
            rows.append((f"llm-compressor model_free_ptq {llmc_scheme}", None, None,
                         f"skipped: {args.llmc_python} not found (make test-slow builds it)"))
            continue
        ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
        theirs = args.dir / "llmc-out"
        shutil.rmtree(theirs, ignore_errors=True)
        llmc_env = {k: v for k, v in env.items() if not k.startswith("PYTHON")}
        seconds, peak = run([str(args.llmc_python), "-c", LLMC_SCRIPT, str(src), str(theirs), llmc_scheme,
                             json.dumps(ignore)], llmc_env)
        # compared in a child: a forked process inherits its parent's peak RSS, so the runs after a comparison
        # made here would report the comparison's memory as their own
        compared = subprocess.run([sys.executable, __file__, "--compare", str(dst), str(theirs)], check=True,
                                  capture_output=True, text=True).stdout.strip()
        rows.append((f"llm-compressor model_free_ptq {llmc_scheme}", seconds, peak, compared))
        shutil.rmtree(theirs, ignore_errors=True)
    shutil.rmtree(args.dir / "dialect-out", ignore_errors=True)
    rates = formula_rates()  # last: it loads torch into this process
    print(f"slice: {src} ({src_bytes / 2**30:.2f} GiB); machine: {os.cpu_count()} cores; warm page cache, "
          "output on disk, synced")
    print("| what | time | source rate | peak resident memory | bytes |\n| --- | --- | --- | --- | --- |")
    for label, seconds, peak, note in rows:
        if seconds is None:
            print(f"| {label} | - | - | - | {note} |")
        else:
            print(f"| {label} | {seconds:.1f} s | {src_bytes / seconds / 1e9:.2f} GB/s | {peak / 2**20:.0f} MiB | "
                  f"{note} |")
    print("\n| quantization alone, one 1536x5376 BF16 stripe, best of 5 | GB/s |\n| --- | --- |")
    for label, rate in rates.items():
        print(f"| {label} | {rate:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
