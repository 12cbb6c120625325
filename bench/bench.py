"""Conversion speed and memory on a real-shape slice of gemma-4-31B-it, side by side with `cp -r`.

    python bench/bench.py [--dir /tmp/convert-fp8-bench] [--reps 2] [--memory-limit 1GiB] [--mix-layers 24]
                          [--settle 60]

Builds the slice once (bench/make_slice.py: 6.3 GiB, the embedding, three sliding and one full attention layer,
the vision projection), then prints one table:
- `cp -r` of the slice and the conversion, each from a cold page cache and synced to disk, alternated;
- the conversion inside a memory cgroup of --memory-limit (when this machine lets us make one), with the peak
  anonymous memory of the cgroup sampled every 20 ms;
- warm: source in the page cache, output on tmpfs (/dev/shm), GB/s of BF16 source through the whole CLI;
- the quantization kernel alone on one 21504x5376 BF16 tensor, against transformers' formula in plain torch;
- `cp -r` and the conversion of a second slice with the real model's mix (--mix-layers, 24 layers, 26 GB: the
  embedding is 11% of its bytes, 4.5% of the model's, 42% of the small slice's), cold, synced, alternated, with
  CPU seconds per GB;
- the full 62.5 GB model projected from the real-mix rates;
- with the transformers cross-check (--first): a model's first conversion, which asks transformers, against a
  later one, which reads its answers from the cache, and the very first run in a Python environment.
Cold runs need root (to drop the page cache); without it they are reported as warm-disk runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULL_MODEL_BYTES = 62.5e9


def sh(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


class MemoryCgroup:
    """A child memory cgroup (v2 or v1) of our own, with a limit; samples its anonymous memory."""

    def __init__(self, limit: int):
        self.limit, self.path, self.version = limit, None, None
        own = Path("/proc/self/cgroup").read_text().splitlines()
        for line in own:
            _, controllers, rel = line.split(":", 2)
            if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
                base, self.version = Path("/sys/fs/cgroup") / rel.lstrip("/"), 2
            elif "memory" in controllers.split(","):
                base, self.version = Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), 1
            else:
                continue
            try:
                path = base / f"convert-fp8-bench-{os.getpid()}"
                path.mkdir(exist_ok=True)
                limit_file = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
                (path / limit_file).write_text(str(limit))
                self.path = path
                return
            except OSError:
                continue

    def anon_bytes(self) -> int:
        key = "anon" if self.version == 2 else "rss"
        for line in (self.path / "memory.stat").read_text().splitlines():
            name, value = line.split()
            if name == key:
                return int(value)
        return 0

    def run(self, cmd: list[str]) -> tuple[float, int, int]:
        """(seconds, exit code, peak anonymous bytes) of `cmd` run inside the cgroup."""
        peak, done = [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], self.anon_bytes())
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        procs = self.path / "cgroup.procs"
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, preexec_fn=lambda: procs.write_text(str(os.getpid())))
        sampler.start()
        code = proc.wait()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        return seconds, code, peak[0]

    def remove(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


def digest(folder: Path) -> dict[str, str]:
    import hashlib

    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(16 * 2**20):
                    h.update(chunk)
            out[path.name] = h.hexdigest()
    return out


def timed(cmd: list[str]) -> float:
    return timed_cpu(cmd)[0]


def measured(cmd: list[str]) -> tuple[float, float, int | None]:
    """Wall seconds, CPU seconds and peak resident bytes (of the command's largest process, through GNU time: a
    child forked from this process would count this process's memory as its own) of one command."""
    if not Path("/usr/bin/time").exists():
        wall, cpu = timed_cpu(cmd)
        return wall, cpu, None
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        wall, cpu = timed_cpu(["/usr/bin/time", "-o", report.name, "-f", "%M", *cmd])
        return wall, cpu, int(report.read().split()[-1]) * 1024


def mib(peak: int | None) -> str:
    return "peak not measured (no /usr/bin/time)" if peak is None else f"peak {peak / 2**20:.0f} MiB"


def timed_cpu(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command and everything it waited for) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    sh(*cmd)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


SETTLE_SECONDS = 60.0  # --settle: idle time before each timed run


def settle() -> None:
    """Sync, drop the page cache and wait SETTLE_SECONDS: on a virtual disk the host may still be writing the
    previous run's output back (the 24-layer slice converted 15-20% slower right after a 26 GB copy than after a
    pause), a cost the run before, not the run timed, should pay."""
    drop_caches()
    time.sleep(SETTLE_SECONDS)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def copy_then_convert(src: Path, copy_out: Path, disk_out: Path, reps: int) -> tuple[list, list]:
    """`cp -r` and the conversion, each from a cold page cache and synced (the converter fsyncs every file it
    writes), after the same idle time (`settle`), alternated `reps` times: the (wall, CPU) seconds of each. The
    last conversion stays in `disk_out`."""
    cp_runs, conv_runs = [], []
    for _ in range(reps):
        shutil.rmtree(disk_out, ignore_errors=True)
        shutil.rmtree(copy_out, ignore_errors=True)
        settle()
        cp_runs.append(timed_cpu(["bash", "-c", f"cp -r {src} {copy_out} && sync"]))
        shutil.rmtree(copy_out, ignore_errors=True)
        settle()
        conv_runs.append(timed_cpu(convert_cmd(src, disk_out)))
    return cp_runs, conv_runs


def real_mix(args, rows: list) -> dict | None:
    """`cp -r` and the conversion of a slice with the real model's mix of bytes (24 of 60 layers: the embedding,
    copied in the kernel, is 11% of its bytes and 4.5% of the whole model's; in the small slice it is 42%), cold and
    synced, alternated, with the CPU seconds per GB that a noisy disk moves less than the wall time."""
    src = args.dir / "slice-real-mix"
    layers = ",".join(str(i) for i in range(args.mix_layers))
    if not (src / "config.json").exists():
        need = 2.2 * args.mix_layers * 1.02e9 + 3e9  # the slice, its copy, and margin
        free = shutil.disk_usage(args.dir).free
        if free < need:
            rows.append((f"{args.mix_layers}-layer slice", "-", f"not measured: needs about {need / 1e9:.0f} GB free "
                         f"under {args.dir}, {free / 1e9:.0f} GB are"))
            return None
        sh(sys.executable, "bench/make_slice.py", str(src), "--layers", layers)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    copy_out, disk_out = args.dir / "cp-real-mix", args.dir / "out-real-mix"
    cp_runs, conv_runs = copy_then_convert(src, copy_out, disk_out, args.reps)
    shutil.rmtree(disk_out, ignore_errors=True)
    copy_and_convert_rows(rows, f"{args.mix_layers}-layer slice ({src_bytes / 1e9:.1f} GB)", src_bytes, cp_runs,
                          conv_runs)
    return {"bytes": src_bytes, "convert": min(w for w, _ in conv_runs), "cp": min(w for w, _ in cp_runs)}


def copy_and_convert_rows(rows: list, label: str, src_bytes: int, cp_runs: list, conv_runs: list,
                          out_bytes: int | None = None) -> None:
    """Two table rows: `cp -r` and the conversion of one slice, cold and synced, each run's wall time and CPU
    seconds per GB, and each conversion's time and CPU as a ratio to the copy it alternated with, and, given the
    output's size, to the disk's limit: the copy moves the source twice through the disk, the conversion the
    source and its output, so a conversion as fast as the copy per byte takes (source + output) / (2 x source) of
    its time."""
    gb = src_bytes / 1e9
    if out_bytes is not None:
        share = (src_bytes + out_bytes) / (2 * src_bytes)
        limit = "; " + " / ".join(f"{cw / (pw * share):.2f}x" for (cw, _), (pw, _) in zip(conv_runs, cp_runs)) + \
            f" the disk's limit ({share:.2f}x the copy's time)"
    else:
        limit = ""
    rows.append((f"cp -r, {label}, cold, synced", " / ".join(f"{w:.1f} s" for w, _ in cp_runs),
                 " / ".join(f"{c / gb:.2f}" for _, c in cp_runs) + " CPU-s per GB"))
    rows.append((f"convert, {label}, cold, synced", " / ".join(f"{w:.1f} s" for w, _ in conv_runs),
                 " / ".join(f"{c / gb:.2f}" for _, c in conv_runs) + " CPU-s per GB; "
                 + " / ".join(f"{cw / pw:.2f}x" for (cw, _), (pw, _) in zip(conv_runs, cp_runs)) + " the copy's time; "
                 + " / ".join(f"{cc / pc:.2f}x" for (_, cc), (_, pc) in zip(conv_runs, cp_runs)) + " its CPU"
                 + limit))


def moe_slice(args, rows: list) -> None:
    """`cp -r` and the conversion of a Qwen3-30B-A3B-shaped per-expert MoE slice (--moe-layers layers of real
    widths: 384 expert Linears of 3 MiB per layer), cold and synced, alternated, with CPU seconds per GB beside
    cp's: the cost per tensor, not per byte, that such checkpoints pay."""
    src = args.dir / "slice-qwen3-moe"
    if not (src / "config.json").exists():
        sh(sys.executable, "bench/make_slice.py", str(src), "--model", "qwen3-30b-a3b", "--layers", str(args.moe_layers))
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    copy_out, disk_out = args.dir / "cp-qwen3-moe", args.dir / "out-qwen3-moe"
    cp_runs, conv_runs = copy_then_convert(src, copy_out, disk_out, args.reps)
    out_bytes = folder_bytes(disk_out)
    args.dense_costs = dense_costs(src, disk_out, args.dir)
    shutil.rmtree(disk_out, ignore_errors=True)
    copy_and_convert_rows(rows, f"Qwen3-30B-A3B-shaped slice, {args.moe_layers} layers ({src_bytes / 1e9:.1f} GB)",
                          src_bytes, cp_runs, conv_runs, out_bytes)


def checks(src: Path, out: Path, work: Path) -> list[tuple[str, list[str], int]]:
    """`verify --src` and `dequantize` of a conversion's output: (name, command, bytes each moves)."""
    moved = folder_bytes(src) + folder_bytes(out)
    return [
        ("verify --src", [sys.executable, "-m", "converter.cli", "verify", "--src", str(src), "--dst", str(out), "-q",
                          "--no-arch-check", "--report", str(work / "verify.json")], moved),
        ("dequantize", [sys.executable, "-m", "converter.cli", "dequantize", "--src", str(out), "--dst",
                        str(work / "dequantized"), "-q", "--overwrite"], moved),
    ]


def dense_costs(src: Path, out: Path, work: Path) -> dict[str, tuple[float, int | None]]:
    """CPU seconds per byte moved, and peak memory, of `verify --src` and `dequantize` on the output of a model of
    few large weights (the Qwen3-shaped slice: 1,575 tensors of megabytes, almost every byte an FP8 weight), warm:
    what a checkpoint's bytes cost these commands, whatever its tensor count."""
    costs = {}
    for what, cmd, moved in checks(src, out, work):
        _, cpu, peak = measured(cmd)
        costs[what] = (cpu / moved, peak)
    shutil.rmtree(work / "dequantized", ignore_errors=True)
    return costs


def deepseek_count(args, rows: list) -> None:
    """DeepSeek-V3's names and tensor count at narrow widths (45,395 tensors, 3.1 GB): `cp -r` and the
    conversion, cold and synced, alternated, the conversion's CPU per tensor over what its bytes cost (cp's CPU
    for the same bytes); then, warm, the conversion's peak memory, `--dry-run`, and `verify` and `dequantize` of
    the output, each one's CPU per tensor over what its bytes cost that command on a model of few large weights
    (`dense_costs`, when the Qwen3-shaped slice was measured; else cp's)."""
    src = args.dir / "deepseek-v3-count"
    if not (src / "config.json").exists():
        sh(sys.executable, "bench/make_slice.py", str(src), "--model", "deepseek-v3-count", "--shard-size",
           "20000000")
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    tensors = len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
    copy_out, disk_out = args.dir / "cp-deepseek", args.dir / "out-deepseek"
    cp_runs, conv_runs = copy_then_convert(src, copy_out, disk_out, args.reps)
    out_bytes = folder_bytes(disk_out)
    label = f"DeepSeek-V3-shaped count checkpoint ({tensors:,} tensors, {src_bytes / 1e9:.1f} GB)"
    copy_and_convert_rows(rows, label, src_bytes, cp_runs, conv_runs, out_bytes)
    cp_cpu_per_byte = min(c for _, c in cp_runs) / (2 * src_bytes)  # cp reads and writes each byte
    over = (min(c for _, c in conv_runs) - cp_cpu_per_byte * (src_bytes + out_bytes)) / tensors
    rows.append((f"convert, {label}, CPU per tensor over its bytes' cost", f"{over * 1e3:.3f} ms", "goal < 0.05 ms"))
    wall, cpu, peak = measured(convert_cmd(src, args.dir / "again"))
    rows.append((f"convert, {label}, warm", f"{wall:.1f} s", f"{cpu:.1f} CPU-s; {mib(peak)}"))
    shutil.rmtree(args.dir / "again", ignore_errors=True)
    wall, cpu, peak = measured([*convert_cmd(src, args.dir / "dry"), "--dry-run"])
    rows.append((f"--dry-run, {label}, warm", f"{wall:.1f} s", f"{cpu:.1f} CPU-s; {mib(peak)}; "
                 "goal < 3 s"))
    dense = getattr(args, "dense_costs", {})
    for what, cmd, moved in checks(src, disk_out, args.dir):
        wall, cpu, peak = measured(cmd)
        bytes_cost = (f"{what} on the Qwen3-shaped slice's output: {dense[what][0] * 1e9:.2f} CPU-s per GB, "
                      f"{mib(dense[what][1])}") if what in dense else "`cp -r`"
        extra = (cpu - (dense[what][0] if what in dense else cp_cpu_per_byte) * moved) / tensors
        rows.append((f"{what}, {label}, warm", f"{wall:.1f} s",
                     f"{cpu:.1f} CPU-s, {mib(peak)}; {extra * 1e3:.3f} ms CPU per tensor over its "
                     f"bytes' cost ({bytes_cost}); goal < 0.1 ms"))
    shutil.rmtree(args.dir / "dequantized", ignore_errors=True)
    shutil.rmtree(disk_out, ignore_errors=True)


def cpu_features() -> str:
    """The CPU's model and the vector extensions the kernel's speed depends on: figures from machines with other
    features are not comparable."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16")
    have = [f for f in wanted if f in flags]
    missing = [f for f in ("avx512f",) if f not in flags]
    return f"{model}; {', '.join(have) or 'no AVX'}" + (f" (no {', '.join(missing)})" if missing else "")


def convert_cmd(src: Path, dst: Path) -> list[str]:
    """The conversion timed: without the transformers cross-check, whose answer a model's first conversion
    computes once (importing transformers and torch in a process of its own: about 5 CPU-s and 350 MiB) and later
    ones read from a cache (`first_conversion` measures both)."""
    return [sys.executable, "-m", "converter.cli", "--src", str(src), "--dst", str(dst), "--overwrite", "-q",
            "--no-arch-check"]


def first_conversion(args, rows: list, src: Path, label: str) -> None:
    """A model's first conversion with the transformers cross-check (its answers not cached yet: transformers is
    asked, in a process of its own) against a later one (answers cached), cold and synced, alternated; before
    them the very first run in a new Python environment, without the record of the files transformers' import
    reads, which it makes. A private cache folder; each row's converter peak and the peak of the process asking
    transformers."""
    from converter.configs import parse_size

    cache, out = args.dir / "arch-cache", args.dir / "out-first"
    env = dict(os.environ, CONVERT_FP8_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "converter.cli", "--src", str(src), "--dst", str(out), "--overwrite"]

    def run() -> tuple[float, int, int]:
        shutil.rmtree(out, ignore_errors=True)
        settle()
        start = time.perf_counter()
        said = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
        wall = time.perf_counter() - start
        shutil.rmtree(out, ignore_errors=True)
        peaks = re.search(r"peak memory ([\d.]+ [kMG]?B)(?: \(and ([\d.]+ [kMG]?B) in the process asking)?", said)
        return wall, parse_size(peaks[1].replace(" ", "")), parse_size(peaks[2].replace(" ", "")) if peaks[2] else 0

    def forget(keep_record: bool) -> None:
        for entry in (cache.iterdir() if cache.is_dir() else []):
            if not (keep_record and entry.name == "imports"):
                shutil.rmtree(entry)

    forget(keep_record=False)
    very_first = run()  # records the import's files
    firsts, laters = [], []
    for _ in range(args.reps):
        forget(keep_record=True)
        firsts.append(run())
        laters.append(run())
    shutil.rmtree(cache, ignore_errors=True)

    def memory(r) -> str:
        return f"{r[1] / 2**20:.0f} MiB" + (f" + {r[2] / 2**20:.0f} MiB asking transformers" if r[2] else "")

    rows.append((f"convert with the cross-check, {label}, cold: a later conversion (answers cached)",
                 " / ".join(f"{w:.1f} s" for w, _, _ in laters), " / ".join(memory(r) for r in laters)))
    rows.append((f"the same, a model's first conversion (transformers asked)",
                 " / ".join(f"{w:.1f} s" for w, _, _ in firsts),
                 " / ".join(f"{f[0] - l[0]:+.1f} s" for f, l in zip(firsts, laters)) + " over the later one it "
                 "alternated with; " + " / ".join(memory(r) for r in firsts)))
    rows.append((f"the same, the very first run in a Python environment (no record of the import's files)",
                 f"{very_first[0]:.1f} s", f"{very_first[0] - min(w for w, _, _ in laters):+.1f} s over the best "
                 f"later one; {memory(very_first)}"))


def _seconds(func) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def kernel_rates() -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from converter import quantize_fast
    from converter.quantize import quantize_blocks

    w = (torch.randn(21504, 5376, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    nbytes = w.numel() * 2
    raw = w.view(torch.uint8).numpy().reshape(-1)
    out = np.empty(w.shape, np.uint8)
    scales = np.empty((21504 // 64, 5376 // 64), np.float32)
    rows = 3072  # 32 MiB stripes of whole tile rows, as the converter reads them
    quantize_fast.quantize_into(raw[: 64 * 5376 * 2], "BF16", out[:64], scales[:1], 64)  # compile / load cache

    def fused_pass():
        for first in range(0, 21504, rows):
            quantize_fast.quantize_into(raw[first * 5376 * 2:(first + rows) * 5376 * 2], "BF16",
                                        out[first:first + rows], scales[first // 64:(first + rows) // 64], 64)

    fused = min(_seconds(fused_pass) for _ in range(3))
    plain = min(_seconds(lambda: quantize_blocks(w, 64)) for _ in range(3))
    ref_fp8, ref_scales = quantize_blocks(w, 64)
    same = bool(np.array_equal(out, ref_fp8.view(torch.uint8).numpy()) and np.array_equal(scales, ref_scales.numpy()))
    return {"fused_gbs": nbytes / fused / 1e9, "torch_gbs": nbytes / plain / 1e9, "same_bytes": same}


def main() -> int:
    global SETTLE_SECONDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/convert-fp8-bench"))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--warm-reps", type=int, default=3)
    parser.add_argument("--memory-limit", default="1GiB")
    parser.add_argument("--settle", type=float, default=SETTLE_SECONDS,
                        help="idle seconds before each timed cold run (the disk's write-back of the run before)")
    parser.add_argument("--mix-layers", type=int, default=24,
                        help="layers of the real-mix slice (0: skip it; 24 needs about 56 GB free)")
    parser.add_argument("--deepseek", type=int, default=1,
                        help="1: the DeepSeek-V3-shaped count checkpoint (45,395 tensors, 3.1 GB); 0: skip it")
    parser.add_argument("--moe-layers", type=int, default=4,
                        help="layers of the Qwen3-30B-A3B-shaped MoE slice (0: skip it; 4 is 6.2 GB)")
    parser.add_argument("--first", type=int, default=1,
                        help="1: a model's first conversion with the cross-check against a later one; 0: skip it")
    args = parser.parse_args()
    SETTLE_SECONDS = args.settle
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    from converter.configs import parse_size

    src = args.dir / "slice"
    if not (src / "config.json").exists():
        sh(sys.executable, "bench/make_slice.py", str(src))
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    disk_out, copy_out, tmpfs_out = args.dir / "out", args.dir / "cp", Path("/dev/shm/convert-fp8-bench-out")
    limit = parse_size(args.memory_limit)
    rows = []

    # cold and synced, alternated
    cold = drop_caches()
    cp_runs, conv_runs = copy_then_convert(src, copy_out, disk_out, args.reps)
    cp_times, conv_times, conv_cpu = [w for w, _ in cp_runs], [w for w, _ in conv_runs], [c for _, c in conv_runs]
    kind = "cold cache, synced" if cold else "page cache as found (not root: cannot drop it), synced"
    cp_best, conv_best = min(cp_times), min(conv_times)
    rows.append((f"cp -r, small slice, {kind}", " / ".join(f"{t:.1f} s" for t in cp_times),
                 f"{src_bytes / cp_best / 1e9:.2f} GB/s"))
    rows.append((f"convert, small slice, {kind}", " / ".join(f"{t:.1f} s" for t in conv_times),
                 f"{src_bytes / conv_best / 1e9:.2f} GB/s; {conv_best / cp_best:.2f}x the copy; "
                 + " / ".join(f"{c / (src_bytes / 1e9):.2f}" for c in conv_cpu) + " CPU-s per GB"))

    # resume: SIGKILL at 60% of an uninterrupted run's time, then the same command again, cold and synced
    uninterrupted = digest(disk_out)
    shutil.rmtree(disk_out, ignore_errors=True)
    drop_caches()
    proc = subprocess.Popen(convert_cmd(src, disk_out))
    time.sleep(0.6 * conv_best)
    proc.kill()
    proc.wait()
    drop_caches()
    resumed = timed(convert_cmd(src, disk_out))
    same = "same bytes" if digest(disk_out) == uninterrupted else "DIFFERENT BYTES"
    rows.append(("convert killed (SIGKILL) at 60% of its time, then rerun", f"{resumed:.1f} s",
                 f"{resumed / conv_best:.2f}x an uninterrupted run; {same} as the uninterrupted output"))

    # memory cgroup
    cgroup = MemoryCgroup(limit)
    if cgroup.path is not None:
        drop_caches()
        seconds, code, peak = cgroup.run(convert_cmd(src, disk_out))
        cgroup.remove()
        verdict = "completed" if code == 0 else f"FAILED (exit {code}{', killed' if code < 0 else ''})"
        rows.append((f"convert in a {args.memory_limit} memory cgroup (v{cgroup.version})", f"{seconds:.1f} s",
                     f"{verdict}; peak anonymous memory {peak / 2**20:.0f} MiB"))
    else:
        rows.append(("convert in a memory cgroup", "-", "not measured: cannot create a memory cgroup here"))

    # warm, tmpfs output
    sh("bash", "-c", f"cat {src}/*.safetensors > /dev/null")
    warm = []
    for _ in range(args.warm_reps):
        shutil.rmtree(tmpfs_out, ignore_errors=True)
        warm.append(timed(convert_cmd(src, tmpfs_out)))
    shutil.rmtree(tmpfs_out, ignore_errors=True)
    rows.append(("convert, warm cache, output on tmpfs", " / ".join(f"{t:.2f} s" for t in warm),
                 f"best {src_bytes / min(warm) / 1e9:.2f} GB/s, median {src_bytes / statistics.median(warm) / 1e9:.2f} GB/s"))

    k = kernel_rates()
    rows.append(("kernel alone, 21504x5376 BF16, best of 3", f"fused {k['fused_gbs']:.2f} GB/s",
                 f"torch formula {k['torch_gbs']:.2f} GB/s ({k['fused_gbs'] / k['torch_gbs']:.1f}x); "
                 f"same bytes: {k['same_bytes']}"))
    shutil.rmtree(disk_out, ignore_errors=True)
    if args.moe_layers:
        moe_slice(args, rows)
    if args.deepseek:
        deepseek_count(args, rows)
    mix = real_mix(args, rows) if args.mix_layers else None
    if args.first:
        first_conversion(args, rows, *((args.dir / "slice-real-mix", f"{args.mix_layers}-layer slice") if mix
                                       else (src, "small slice")))
    if mix is not None:  # the right mix: the small slice's 42% of copied embedding flatters the conversion
        rows.append(("projected 62.5 GB model, from the real-mix slice",
                     f"cold {FULL_MODEL_BYTES / mix['bytes'] * mix['convert'] / 60:.1f} min",
                     f"cp -r cold {FULL_MODEL_BYTES / mix['bytes'] * mix['cp'] / 60:.1f} min"))
    else:
        rows.append(("projected 62.5 GB model, from the small slice (flattering: 42% copied embedding)",
                     f"cold {FULL_MODEL_BYTES / src_bytes * conv_best / 60:.1f} min",
                     f"cp -r cold {FULL_MODEL_BYTES / src_bytes * cp_best / 60:.1f} min"))

    print(f"\nslice: {src} ({src_bytes / 2**30:.2f} GiB); machine: {os.cpu_count()} cores, {cpu_features()}; "
          f"kernel alone {k['fused_gbs']:.2f} GB/s; {time.strftime('%Y-%m-%d')}")
    print_table(rows)
    return 0


def print_table(rows: list[tuple[str, str, str]]) -> None:
    """The rows as one markdown table: what, time, result."""
    width = max(len(r[0]) for r in rows)
    print(f"| {'what'.ljust(width)} | time | result |")
    print(f"| {'-' * width} | --- | --- |")
    for what, t, result in rows:
        print(f"| {what.ljust(width)} | {t} | {result} |")


if __name__ == "__main__":
    raise SystemExit(main())
