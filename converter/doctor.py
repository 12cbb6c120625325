"""`convert-fp8 doctor`: what a bug report needs, gathered without the network and without writing anything.

The versions of the tool, Python and the packages it runs with (read from their installed metadata, so nothing
heavy is imported for them), whether numba can cache its compiled kernels, the CPU's vector features, the GPUs
torch sees, and the free disk where an output would go. Pure: `report` returns (label, value) rows; the CLI prints
them.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

from . import __version__

NOT_INSTALLED = "not installed"
# distribution names, in the order printed
PACKAGES = ("torch", "transformers", "safetensors", "huggingface_hub", "numba", "triton", "kernels", "numpy", "crc32c",
            "compressed-tensors")
# /proc/cpuinfo flags that decide how fast the kernels run: x86's vector extensions ("flags"), Arm's ("Features")
X86_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_bf16")
ARM_FEATURES = ("asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm")
# environment variables that change what a run does (values shown, except the token's)
ENVIRONMENT = ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_HOME", "HF_TOKEN", "NUMBA_CACHE_DIR",
               "CONVERT_FP8_CACHE_DIR", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(folder: Path) -> bool:
    """Could a process create `folder` (if need be) and files in it? Asked of the nearest existing folder."""
    existing = _nearest_existing(folder)
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def numba_cache_folders() -> list[Path]:
    """Where numba looks for a writable cache folder for this package's kernels, in its order: `NUMBA_CACHE_DIR`,
    `__pycache__` beside the module, the user's cache folder."""
    folders = [Path(os.environ["NUMBA_CACHE_DIR"])] if os.environ.get("NUMBA_CACHE_DIR") else []
    folders.append(Path(__file__).resolve().parent / "__pycache__")
    folders.append(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "numba")
    return folders


def numba_cache() -> str:
    if package_version("numba") == NOT_INSTALLED:
        return "numba not installed (the torch formula runs instead)"
    for folder in numba_cache_folders():
        if _writable(folder):
            return f"writable ({folder})"
    return ("not writable: " + ", ".join(str(f) for f in numba_cache_folders())
            + "; the kernels are compiled again on every run (NUMBA_CACHE_DIR=<a writable folder> keeps them)")


def cpu(cpuinfo: str | None = None) -> tuple[str, str]:
    """(model and cores, vector features present and absent) from /proc/cpuinfo, or what `platform` knows."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    name = fields.get("model name") or fields.get("cpu model") or platform.processor() or platform.machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    known = X86_FEATURES if "flags" in fields else ARM_FEATURES
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    if not flags:
        return f"{name}, {usable} usable cores", "unknown (no flags in /proc/cpuinfo)"
    present = [f for f in known if f in flags]
    absent = [f for f in known if f not in flags]
    return f"{name}, {usable} usable cores", f"{' '.join(present) or 'none'} (absent: {' '.join(absent) or 'none'})"


def gpus() -> list[str]:
    """One line per GPU torch sees, with its compute capability; or why there is none."""
    try:
        import torch
    except ImportError:
        return ["unknown: torch is not installed"]
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        return [f"none visible (torch {torch.__version__}, {build})"]
    lines = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        fp8 = "FP8 kernels: yes" if (props.major, props.minor) >= (8, 9) else "FP8 kernels: no (needs 8.9+)"
        lines.append(f"cuda:{i} {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.1f} GiB; {fp8}")
    return lines


def free_disk(dst: Path) -> tuple[int, Path]:
    """(free bytes, folder measured) for `dst`, measured at its nearest existing folder."""
    folder = _nearest_existing(dst)
    return shutil.disk_usage(folder).free, folder


def environment() -> list[str]:
    lines = []
    for name in ENVIRONMENT:
        value = os.environ.get(name)
        if value is not None:
            lines.append(f"{name}=" + ("(set)" if "TOKEN" in name else value))
    return lines


def report(dst: Path | None = None) -> list[tuple[str, str]]:
    rows = [("convert-fp8", __version__),
            ("python", f"{platform.python_version()} ({sys.executable})"),
            ("platform", platform.platform())]
    rows += [(name, package_version(name)) for name in PACKAGES]
    rows.append(("numba cache", numba_cache()))
    model, features = cpu()
    rows += [("cpu", model), ("cpu features", features)]
    rows += [("gpu", line) for line in gpus()]
    if dst is not None:
        free, folder = free_disk(dst)
        where = "" if folder == Path(os.path.abspath(dst)) else f", measured at {folder}"
        rows.append(("free disk at --dst", f"{free} bytes ({free / 1e9:.1f} GB{where})"))
    rows += [("environment", line) for line in environment()]
    return rows


def describe(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
