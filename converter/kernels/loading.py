"""Where transformers' FP8Linear gets its matmul on a GPU: the Hub kernel through the `kernels` package (at the
version the installed transformers requires), a local build of it, or this project's Triton kernel."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Protocol

KERNEL_REPO = "kernels-community/finegrained-fp8"


class Checks(Protocol):
    """Where the outcome of each step goes: `add(name, ok, detail)` records it and returns `ok`."""

    def add(self, name: str, ok: bool, detail: str) -> bool: ...


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def kernels_requirement() -> str | None:
    """The `kernels` requirement of the installed transformers, e.g. `kernels>=0.18.2,<0.19`."""
    try:
        from transformers.dependency_versions_table import deps
    except ImportError:
        return None
    return deps.get("kernels")


def check_kernels_version(installed: str | None, requirement: str | None) -> tuple[bool, str]:
    """Whether the installed `kernels` satisfies transformers' requirement, with the message to show."""
    if requirement is None:
        return False, "transformers does not declare a kernels requirement: too old for the FP8 kernel (need >= 5.4)"
    if installed is None:
        return False, f"the kernels package is not installed; this transformers needs {requirement}: pip install '{requirement}'"
    from packaging.requirements import Requirement

    spec = Requirement(requirement).specifier
    if not spec.contains(installed, prereleases=True):
        return False, f"kernels {installed} is installed but this transformers needs {requirement}: pip install '{requirement}'"
    return True, f"kernels {installed} satisfies {requirement}"


def install_builtin_kernel() -> None:
    """Make transformers' FP8Linear call this project's Triton kernel, without the `kernels` package or a network:
    transformers caches the loaded kernel's entry points in one module global, which is set here."""
    from transformers.integrations import finegrained_fp8

    from . import finegrained_fp8 as builtin

    finegrained_fp8._FINEGRAINED_FP8 = finegrained_fp8.FineGrainedFP8(
        matmul=builtin.matmul_2d, batched_matmul=builtin.matmul_batched, grouped_matmul=builtin.matmul_grouped)


def prepare_kernel(checks: Checks, kernel: str) -> bool:
    """Make transformers' FP8Linear find a kernel: the Hub's (`hub`), a local build (`local:PATH`), or this
    project's Triton kernel (`builtin`). Each step's outcome goes to `checks`; returns whether a kernel is ready."""
    from transformers.integrations import finegrained_fp8

    if kernel == "builtin":
        install_builtin_kernel()
        return checks.add("kernel", True, "builtin Triton block-FP8 matmul (converter.kernels.finegrained_fp8)")
    ok, detail = check_kernels_version(package_version("kernels"), kernels_requirement())
    if not checks.add("kernels version", ok, detail):
        return False
    if kernel.startswith("local:"):
        path = Path(kernel[len("local:"):])
        if not path.is_dir():
            return checks.add("kernel", False, f"{path}: no such kernel build folder")
        os.environ["LOCAL_KERNELS"] = f"{KERNEL_REPO}={path}"
    try:
        finegrained_fp8.load_finegrained_fp8_kernel()
    except Exception as exc:  # noqa: BLE001 - any failure to load is reported as such
        hint = " (offline? use --kernel local:PATH or --kernel builtin)" if kernel == "hub" else ""
        return checks.add("kernel", False, f"the FP8 kernel does not load: {exc}{hint}")
    return checks.add("kernel", True, f"{KERNEL_REPO} loaded ({kernel})")
