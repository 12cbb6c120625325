"""Cross-check of the plan against transformers itself: build the architecture on the meta device (no memory,
no weights) and compare the modules it would turn into FP8 modules with the plan's FP8 set.

A disagreement means a loader would raw-cast a BF16 weight into an FP8 module, or load FP8 bytes into a plain
Linear: silent garbage either way, so it stops the conversion.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

from .errors import PlanError
from .plan import Plan, should_convert_module

CACHE_ENV = "CONVERT_FP8_CACHE_DIR"


def cache_dir() -> Path:
    """Where answers of the cross-check are kept: `$CONVERT_FP8_CACHE_DIR`, else `~/.cache/convert-fp8`."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convert-fp8"
    return Path(os.environ.get(CACHE_ENV) or default)


def _cache_key(config: dict, patterns: tuple[str, ...]) -> str | None:
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None
    method = (config.get("quantization_config") or {}).get("quant_method", "fp8")
    blob = json.dumps([version, config, list(patterns), method], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def cached_fp8_modules(config: dict, patterns: tuple[str, ...]) -> set[str] | None:
    """`transformers_fp8_modules`, remembered per transformers version, config and patterns: importing
    transformers costs seconds, and the answer never changes for the same three."""
    key = _cache_key(config, patterns)
    path = cache_dir() / "arch" / f"{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            return set(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    modules = transformers_fp8_modules(config, patterns)
    if modules is not None and path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(sorted(modules)))
            os.replace(tmp, path)
        except OSError:
            pass  # a cache that cannot be written only costs time
    return modules


def transformers_fp8_modules(config: dict, patterns: tuple[str, ...]) -> set[str] | None:
    """Module names transformers converts to FP8 for this config and exclusion list (in the matching rule of the
    config's dialect: `modules_to_not_convert` for fp8, `ignore` for compressed-tensors, which quantizes
    `nn.Linear` modules only), or None when transformers is not installed or does not know the architecture."""
    try:
        import torch
        import transformers
        from torch import nn
    except ImportError:
        return None
    archs = config.get("architectures") or []
    model_class = getattr(transformers, archs[0], None) if archs else None
    if model_class is None:
        return None
    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        cfg = transformers.AutoConfig.for_model(**clean)
    except (ValueError, KeyError, TypeError):
        return None
    with torch.device("meta"):
        model = model_class._from_config(cfg)
    if (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
        from .dialects.compressed_tensors import CompressedTensorsWriter

        return {name for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and CompressedTensorsWriter.converts(name, list(patterns))}
    skip = list(patterns) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {
        name
        for name, module in model.named_modules()
        if (type(module) is nn.Linear or name.endswith(".experts")) and should_convert_module(name, skip)
    }


def cross_check(plan: Plan) -> str | None:
    """Raise `PlanError` when transformers would convert a different module set than the plan.

    Returns:
        None when the check ran and passed, else the reason it could not run.
    """
    expected = cached_fp8_modules(plan.config, plan.modules_to_not_convert)
    if expected is None:
        arch = (plan.config.get("architectures") or ["?"])[0]
        return f"architecture check skipped: transformers is not installed or does not know {arch}"
    ours = set(plan.fp8_modules)
    only_theirs = sorted(expected - ours)
    only_ours = sorted(ours - expected)
    if not only_theirs and not only_ours:
        return None
    parts = []
    if only_theirs:
        parts.append(
            f"transformers would load {len(only_theirs)} module(s) as FP8 that stay unquantized here, "
            f"first {only_theirs[0]!r} (absent or tied weights need an exclusion: --exclude {only_theirs[0]})"
        )
    if only_ours:
        parts.append(
            f"{len(only_ours)} module(s) quantized here are not Linears transformers converts, "
            f"first {only_ours[0]!r} (--exclude {only_ours[0]})"
        )
    raise PlanError("architecture check failed: " + "; ".join(parts) + "; or --no-arch-check to skip the check")
