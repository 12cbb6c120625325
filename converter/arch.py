"""Cross-check of the plan against transformers itself: build the architecture on the meta device (no memory,
no weights) and compare the modules it would turn into FP8 modules with the plan's FP8 set.

A disagreement means a loader would raw-cast a BF16 weight into an FP8 module, or load FP8 bytes into a plain
Linear: silent garbage either way, so it stops the conversion.
"""

from __future__ import annotations

from .errors import PlanError
from .plan import Plan, should_convert_module


def transformers_fp8_modules(config: dict, patterns: tuple[str, ...]) -> set[str] | None:
    """Module names transformers converts to FP8 for this config and exclusion list, or None when transformers
    is not installed or does not know the architecture."""
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
    expected = transformers_fp8_modules(plan.config, plan.modules_to_not_convert)
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
