"""Two checkouts of convert-fp8 on the same slices, alternated, beside `cp -r`: the time, CPU and bytes of each.

    python bench/compare_checkouts.py OTHER_CHECKOUT [--dir /tmp/convert-fp8-compare] [--reps 2] [--settle 20]
                                      [--mix-layers 24] [--moe-layers 4] [--demo]

For a change that must keep every byte and cost nothing (a refactor): OTHER_CHECKOUT is the code before it (a
`git worktree` of the commit), this checkout the code after. Each slice is built once (bench/make_slice.py: the
24-layer real-mix slice of gemma-4-31B-it, the Qwen3-30B-A3B-shaped MoE slice); each round runs, cold and synced,
after the same idle time: `cp -r`, then the conversion by each checkout (their order alternating between rounds),
then, on the MoE slice, `dequantize` of the output by each. Every output's files are hashed: the two checkouts'
must be equal. With `--demo`, the demo checkpoint is converted by both in every dialect, from BF16 and from FP8,
in parts, and dequantized, and their outputs compared byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench import cpu_features, drop_caches, print_table  # noqa: E402

DIALECTS = [
    [],
    ["--block-size", "128", "--scale-fmt", "ue8m0"],
    ["--format", "compressed-tensors"],
    ["--format", "compressed-tensors", "--scheme", "fp8-dynamic"],
    ["--format", "compressed-tensors", "--scheme", "mxfp8"],
    ["--format", "compressed-tensors", "--scheme", "mxfp8a16"],
]


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the command and its children) of one command, run in `cwd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def digest(folder: Path) -> str:
    """One sha256 over every file of the folder: names and contents."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(16 * 2**20):
                h.update(chunk)
    return h.hexdigest()


def cli(checkout: Path, *args) -> list[str]:
    """The command line of `convert-fp8`, run in `checkout` (whose own `converter` package `-m` then imports)."""
    return [sys.executable, "-m", "converter.cli", *map(str, args)]


def settle(seconds: float) -> None:
    drop_caches()
    time.sleep(seconds)


def compare_slice(label: str, src: Path, work: Path, checkouts: dict[str, Path], args, dequantize: bool) -> list:
    """Rounds of cp, both conversions (and both dequantizations), cold and synced; the table's rows."""
    gb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9
    runs: dict[str, list[tuple[float, float]]] = {}
    digests: dict[str, set[str]] = {}
    names = list(checkouts)
    for k in range(args.reps):
        copy = work / "cp"
        shutil.rmtree(copy, ignore_errors=True)
        settle(args.settle)
        runs.setdefault("cp -r", []).append(timed(["bash", "-c", f"cp -r {src} {copy} && sync"], ROOT))
        shutil.rmtree(copy, ignore_errors=True)
        for name in names if k % 2 == 0 else names[::-1]:
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            settle(args.settle)
            runs.setdefault(f"convert, {name}", []).append(
                timed(cli(checkouts[name], "--src", src, "--dst", out, "-q", "--no-arch-check"), checkouts[name]))
            digests.setdefault("convert", set()).add(digest(out))
        if dequantize:
            for name in names if k % 2 == 0 else names[::-1]:
                out, back = work / f"out-{names[0]}", work / f"bf16-{name}"
                shutil.rmtree(back, ignore_errors=True)
                settle(args.settle)
                runs.setdefault(f"dequantize, {name}", []).append(
                    timed(cli(checkouts[name], "dequantize", "--src", out, "--dst", back, "-q"), checkouts[name]))
                digests.setdefault("dequantize", set()).add(digest(back))
                shutil.rmtree(back, ignore_errors=True)
        for name in names:
            shutil.rmtree(work / f"out-{name}", ignore_errors=True)
    cp_best = min(w for w, _ in runs["cp -r"])
    rows = []
    for what, measured in runs.items():
        best = min(w for w, _ in measured)
        rows.append((f"{what}, {label}", " / ".join(f"{w:.1f} s" for w, _ in measured),
                     f"best {best / cp_best:.2f}x the copy; " + " / ".join(f"{c / gb:.2f}" for _, c in measured)
                     + " CPU-s per GB"))
    for what, found in digests.items():
        rows.append((f"{what}, {label}: outputs of both checkouts", "-",
                     "identical bytes" if len(found) == 1 else f"DIFFERENT BYTES ({len(found)} digests)"))
    return rows


def compare_demo(work: Path, checkouts: dict[str, Path]) -> list:
    """The demo checkpoint through both checkouts in every dialect, from BF16 and FP8, in parts, dequantized."""
    demo = work / "demo"
    if not (demo / "config.json").exists():
        subprocess.run([sys.executable, "-m", "converter.demo", str(demo)], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    cases = [(f"convert {' '.join(d) or '(defaults)'}", d) for d in DIALECTS]
    rows = []
    for label, extra in cases + [("convert --part 1/2, 2/2", None), ("FP8 source -> --block-size 128", "fp8"),
                                 ("dequantize", "deq"), ("dequantize --dtype f32", "deq32")]:
        found = set()
        for name, checkout in checkouts.items():
            out = work / f"demo-{name}"
            shutil.rmtree(out, ignore_errors=True)
            base = ["--src", demo, "--dst", out, "-q", "--no-arch-check"]
            if isinstance(extra, list):
                subprocess.run(cli(checkout, *base, *extra), check=True, cwd=checkout)
            elif extra is None:
                for part in ("1/2", "2/2"):
                    subprocess.run(cli(checkout, *base, "--part", part), check=True, cwd=checkout)
            else:
                fp8 = work / name / "demo-FP8"  # the same name for both: a dequantized card names its source
                shutil.rmtree(fp8, ignore_errors=True)
                fp8.parent.mkdir(exist_ok=True)
                subprocess.run(cli(checkout, "--src", demo, "--dst", fp8, "-q", "--no-arch-check"), check=True,
                               cwd=checkout)
                if extra == "fp8":
                    subprocess.run(cli(checkout, "--src", fp8, "--dst", out, "-q", "--no-arch-check",
                                       "--block-size", "128"), check=True, cwd=checkout)
                else:
                    dtype = ["--dtype", "f32"] if extra == "deq32" else []
                    subprocess.run(cli(checkout, "dequantize", "--src", fp8, "--dst", out, "-q", *dtype), check=True,
                                   cwd=checkout)
                shutil.rmtree(fp8, ignore_errors=True)
            found.add(digest(out))
            shutil.rmtree(out, ignore_errors=True)
        rows.append((f"demo, {label}", "-", "identical bytes" if len(found) == 1 else "DIFFERENT BYTES"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout (the code before a change)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/convert-fp8-compare"))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--settle", type=float, default=20.0, help="idle seconds before each cold run")
    parser.add_argument("--mix-layers", type=int, default=24, help="layers of the real-mix slice (0: skip it)")
    parser.add_argument("--moe-layers", type=int, default=4, help="layers of the Qwen3-MoE slice (0: skip it)")
    parser.add_argument("--demo", action="store_true", help="also compare the demo's outputs in every dialect")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    checkouts = {"before": args.other.resolve(), "after": ROOT}
    rows = []
    if args.demo:
        rows += compare_demo(args.dir, checkouts)
    if args.moe_layers:
        src = args.dir / "slice-qwen3-moe"
        if not (src / "config.json").exists():
            subprocess.run([sys.executable, "bench/make_slice.py", str(src), "--model", "qwen3-30b-a3b", "--layers",
                            str(args.moe_layers)], check=True, cwd=ROOT)
        rows += compare_slice(f"Qwen3-30B-A3B-shaped slice, {args.moe_layers} layers", src, args.dir, checkouts,
                              args, dequantize=True)
    if args.mix_layers:
        src = args.dir / "slice-real-mix"
        if not (src / "config.json").exists():
            subprocess.run([sys.executable, "bench/make_slice.py", str(src), "--layers",
                            ",".join(str(i) for i in range(args.mix_layers))], check=True, cwd=ROOT)
        rows += compare_slice(f"{args.mix_layers}-layer slice", src, args.dir, checkouts, args, dequantize=False)
    print(f"\nmachine: {os.cpu_count()} cores, {cpu_features()}; {time.strftime('%Y-%m-%d')}; before: {args.other}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
