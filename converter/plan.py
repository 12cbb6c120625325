"""The plan: every tensor's fate, the output shards and the output config, decided from headers alone.

`make_plan` is pure: a `SourceIndex` and options in, a `Plan` out. Nothing is read or written, so an impossible
conversion fails here, before any byte moves, and `--dry-run` shows exactly what a run would do.
"""

from __future__ import annotations

import copy
import functools
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .configs import (
    DTYPE_SIZES,
    QUANTIZABLE_DTYPES,
    SHARD_NAME,
    FP8Scheme,
    format_size,
)
from .dialects import writer_for
from .dialects.transformers_fp8 import should_convert_module  # noqa: F401 - the fp8 loader's rule, re-exported
from .errors import PlanError
from .source import SINGLE_FILE_NAME, SourceIndex, TensorInfo

# A tensor's action: quantized into the target dialect, the scales of the FP8 weight just before it, copied as
# stored, or decoded from FP8 to 16 bits (an FP8 source's weight that the output keeps unquantized)
QUANTIZE, SCALE, COPY, DECODE = "quantize", "scale", "copy", "dequantize"

# Last module-name component of an nn.Embedding (2-D `.weight`, but not a Linear). Names ending in a
# projection (`embed_vision.embedding_projection`) are Linears and do not match.
_EMBEDDING_NAME = re.compile(
    r"^(wte|wpe|shared|embed_tokens\w*|embed_positions|\w*embeddings|\w*_embedding|embedding|\w*embedding_table)$"
)
_FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
# One expert of a per-expert MoE checkpoint (`mlp.experts.3.gate_proj.weight`): transformers 5.x merges every
# expert of `mlp.experts` into one fused experts module at load, so their fates go together.
_EXPERT_LINEAR = re.compile(r"^(?P<experts>.+\.experts)\.\d+\.[^.]+\.weight$")
_SHARED_EXPERT = re.compile(r"\.shared_experts?\.")
# MoE routers: their scores pick the experts, and their weights are not Linears transformers quantizes
# (DeepSeek-V3's 256x7168 gate tiles by 128 all the same); kept in the source dtype by name, transformers or not.
_ROUTER_MODULE = re.compile(r"(^|\.)router(\.|$)|\.(mlp|block_sparse_moe)\.gate$")
ROUTER_BIAS = "e_score_correction_bias"


@dataclass(frozen=True, slots=True)  # slots: an MoE plans tens of thousands
class TensorPlan:
    """One output tensor: what it is made from, how, and why."""

    name: str
    source: str
    action: str  # QUANTIZE, SCALE, COPY or DECODE
    dtype: str
    shape: tuple[int, ...]
    reason: str

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its final file name and its tensors in file order."""

    name: str
    tensors: tuple[TensorPlan, ...]

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class Plan:
    """A complete output, decided before anything is written: a conversion into an FP8 dialect (`scheme`), or,
    with `scheme` None, `dequantize`'s 16-bit checkpoint of an FP8 source (`transcode.decode_plan`)."""

    scheme: FP8Scheme | None
    shards: tuple[ShardPlan, ...]
    config: dict  # the output config.json
    fp8_modules: tuple[str, ...]  # modules whose weight becomes FP8, in file order
    kept_linears: dict[str, str]  # Linear-like module -> why it stays in the source dtype
    modules_to_not_convert: tuple[str, ...]
    ignored_layers: tuple[str, ...]
    unmatched_patterns: tuple[tuple[str, str], ...]  # (pattern, note or suggestion)
    files_to_copy: tuple[str, ...]
    files_skipped: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]
    source_nbytes: int
    decoded_from: str | None = None  # a 16-bit output: the FP8 source's dialect, in words
    dropped_scales: int = 0  # a 16-bit output: the scale tensors of the source left out

    @property
    def dialect(self):
        """The output dialect's writer (`converter.dialects`): names, dtypes, scale math, config; None for a
        16-bit output."""
        return writer_for(self.scheme) if self.scheme is not None else None

    @property
    def tensors(self) -> list[TensorPlan]:
        return [t for shard in self.shards for t in shard.tensors]

    @property
    def output_nbytes(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {t.name: shard.name for shard in self.shards for t in shard.tensors}

    @property
    def index_needed(self) -> bool:
        """Whether the output gets a `model.safetensors.index.json`: not when it is one `model.safetensors`."""
        return [s.name for s in self.shards] != [SINGLE_FILE_NAME]

    def count(self, action: str) -> int:
        """How many output tensors have this action."""
        return sum(1 for t in self.tensors if t.action == action)


def should_convert_module_legacy(full_name: str, patterns) -> bool:
    """transformers 5.5-5.22: a regex match at the start of the name with no boundary, or a suffix."""
    return not any(re.match(key, full_name) or full_name.endswith(key) for key in patterns)


def module_of(tensor_name: str) -> str:
    """`a.b.weight` -> `a.b`."""
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else ""


def classify(info: TensorInfo) -> tuple[str, str]:
    """What a source tensor is, from its name, dtype and shape alone: (kind, reason).

    kind is "linear" (an nn.Linear weight), "experts" (a fused expert tensor) or "other".
    """
    module, _, leaf = info.name.rpartition(".")
    last = module.rpartition(".")[2]
    if last == "experts" and len(info.shape) >= 3 and info.dtype in _FLOAT_DTYPES:
        return "experts", "fused expert tensor"
    if info.dtype not in _FLOAT_DTYPES:
        return "other", f"not floating point ({info.dtype})"
    if leaf != "weight":
        return "other", "not a weight matrix" if len(info.shape) != 1 else "1-D"
    if len(info.shape) != 2:
        return "other", "1-D" if len(info.shape) == 1 else f"{len(info.shape)}-D, not a Linear weight"
    if _EMBEDDING_NAME.match(last):
        return "other", "embedding"
    return "linear", "Linear weight"


def router_modules(names) -> set[str]:
    """Modules of these tensor names that are MoE routers by name: a `router` path component, `mlp.gate`
    (`block_sparse_moe.gate`), or a module that also holds an `e_score_correction_bias` (DeepSeek-V3's gate)."""
    modules = {module_of(n) for n in names}
    return {m for m in modules if _ROUTER_MODULE.search(m)} | {
        module_of(n) for n in names if n.rpartition(".")[2] == ROUTER_BIAS}


def linear_role(name: str) -> str:
    """What a quantized Linear weight is, for the plan's summary."""
    if _EXPERT_LINEAR.match(name):
        return "expert Linear (per-expert, fused at load)"
    if _SHARED_EXPERT.search(name):
        return "shared expert Linear"
    return "Linear"


def make_plan(
    source: SourceIndex,
    scheme: FP8Scheme,
    exclude_patterns: tuple[str, ...],
    max_shard_size: int,
    loader=None,
) -> Plan:
    """Decide every tensor's fate, the output shards and the output config.

    Args:
        loader (`arch.Placement`, *optional*): where transformers' FP8 loader puts each source tensor when
            every module not excluded is converted. Given, it decides: exactly the tensors it loads as FP8 are
            quantized (those that can be); the others stay in the source dtype, saying why. Without it, names,
            dtypes and shapes decide.

    Raises:
        PlanError: the source is already quantized, a pattern is not a valid regular expression, or the dialect
            cannot write a tensor the plan would quantize (fused experts in compressed-tensors).
    """
    if "quantization_config" in source.config:
        method = source.config["quantization_config"].get("quant_method", "?")
        raise PlanError(f"{source.root}/config.json: the source is already quantized ({method}); give a BF16 checkpoint")
    for pattern in exclude_patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PlanError(f"exclude pattern {pattern!r} is not a valid regular expression: {exc}") from None

    dialect = writer_for(scheme)
    groups: list[list[TensorPlan]] = []
    others: list[str] = []  # tensors that are not Linear weights (a dialect may have to name their modules)
    fp8_modules: dict[str, None] = {}  # ordered sets: tens of thousands of modules in a large MoE
    kept: dict[str, str] = {}
    linear_like: dict[str, None] = {}  # every module transformers might turn into an FP8 module
    routers = router_modules(source.tensors)
    kinds = {info.name: _kind(info, routers, loader) for info in source.tensors.values()}
    # transformers makes every `*.experts` module one FP8Experts, whether the checkpoint stores it fused or
    # expert by expert: all its expert tensors are FP8, or none
    experts_why = _experts_fates(source, dialect, kinds, exclude_patterns)
    for info in source.tensors.values():
        kind, reason = kinds[info.name]
        module = module_of(info.name)
        if kind == "other":
            others.append(info.name)
            groups.append([_copy(info, reason)])
            continue
        group = experts_module(info.name, kind, dialect)
        owner = group or module  # what the loader builds, and so what a kept tensor's exclusion names
        linear_like.setdefault(owner)
        matched = _first_match(module, exclude_patterns)
        if matched is not None:
            why = f"excluded by {matched!r}"
        elif group is not None:
            why = experts_why[group]
        else:
            why = _why_kept(info, kind, reason, dialect)
        if why is None and kind == "experts" and not dialect.experts:
            every = re.sub(r"\.\d+\.", r".\\d+.", module)  # the same module in every layer
            raise PlanError(
                f"{info.name}: fused expert tensors cannot be written as {scheme.format} (llm-compressor splits "
                "them into per-expert Linears, which transformers does not load back into the fused module); "
                f"--exclude '{every}' keeps them in {info.dtype}, or use --format fp8")
        if why is None:
            fp8_modules.setdefault(module)
            # a Linear's scales are `<module>.weight<suffix>`, an expert tensor's `<tensor><suffix>`, under the
            # name it loads as: transformers saves a fused tensor it renames on load (granitemoe's
            # `input_linear.weight`, loaded as `experts.gate_up_proj`) with the scale of the loaded parameter
            loaded = loader.tensors[info.name][1] if loader is not None and kind == "experts" else info.name
            scale_name = dialect.scale_name(loaded)
            groups.append(
                [
                    TensorPlan(info.name, info.name, QUANTIZE, dialect.weight_dtype, info.shape,
                               "fused expert tensor" if kind == "experts" else linear_role(info.name)),
                    TensorPlan(scale_name, info.name, SCALE, dialect.scale_dtype(info.dtype),
                               dialect.scale_shape(info.shape), "scale"),
                ]
            )
            continue
        kept.setdefault(owner, why)
        groups.append([_copy(info, why)])

    if not fp8_modules and linear_like:
        reasons = "; ".join(f"{why}: {n}" for why, n in Counter(kept.values()).most_common(3))
        raise PlanError(f"nothing to quantize: all {len(linear_like)} Linear-like module(s) stay in the source dtype "
                        f"({reasons})")
    # Every Linear kept unquantized must be excluded in the dialect's own terms, or the loader builds an FP8
    # module for it and raw-casts the unquantized weight into it.
    unmatched = _unmatched(exclude_patterns, linear_like, source.config)
    # a module path excluded but not stored (a head tied to the embeddings) may still be built by the loader:
    # a dialect that names modules exactly names it all the same
    unstored = [p for p, _ in unmatched if re.fullmatch(r"[A-Za-z_][\w.]*", p)]
    modules_to_not_convert = tuple(dialect.exclusion_list(exclude_patterns, kept, unstored, others))
    ignored_layers = tuple(kept)

    config = copy.deepcopy(source.config)
    config["quantization_config"] = dialect.quantization_config(list(modules_to_not_convert), list(ignored_layers))

    warnings = list(source.warnings)
    if dialect.legacy_matching:
        warnings += _legacy_matching_warnings(linear_like, modules_to_not_convert)
    return Plan(
        scheme=scheme,
        shards=assign_shards(groups, max_shard_size, single_file=source.shards == (SINGLE_FILE_NAME,)),
        config=config,
        fp8_modules=tuple(fp8_modules),
        kept_linears=kept,
        modules_to_not_convert=modules_to_not_convert,
        ignored_layers=ignored_layers,
        unmatched_patterns=tuple(unmatched),
        files_to_copy=source.files_to_copy,
        files_skipped=source.files_skipped,
        warnings=tuple(warnings),
        source_nbytes=source.nbytes,
    )


def _kind(info: TensorInfo, routers: set[str], loader) -> tuple[str, str]:
    """`classify`, with routers told apart, and with transformers' word where it was asked: a weight it keeps
    in high precision (GPT-2's Conv1D, a router) is no Linear to quantize; one it loads as FP8 is one."""
    kind, reason = classify(info)
    if kind == "linear" and module_of(info.name) in routers:
        kind, reason = "router", "MoE router"
    if loader is None:
        return kind, reason
    role = loader.role(info.name)
    if role == "unexpected":  # the loader drops it (DeepSeek-V3's MTP layer); servers that load it go by names
        return kind, reason
    if role == "fp8" and kind == "other" and info.dtype in _FLOAT_DTYPES and len(info.shape) in (2, 3):
        return ("linear" if len(info.shape) == 2 else "experts"), f"loaded as FP8 by transformers ({reason})"
    if role != "fp8" and kind in ("linear", "experts"):
        cls = loader.module_class(info.name) or "no module"
        return "kept", f"transformers keeps it in high precision ({cls})"
    return kind, reason


def _why_kept(info: TensorInfo, kind: str, reason: str, dialect) -> str | None:
    """Why a Linear-like weight stays in the source dtype, or None when it is quantized."""
    if kind in ("router", "kept"):
        return reason
    if 0 in info.shape:
        return f"shape {'x'.join(map(str, info.shape))} holds no value"
    if dialect.unfit(info.shape):
        return dialect.unfit(info.shape)
    if info.dtype not in QUANTIZABLE_DTYPES:
        return f"dtype {info.dtype} is not quantized (only {', '.join(QUANTIZABLE_DTYPES)})"
    return None


def experts_module(name: str, kind: str, dialect) -> str | None:
    """The experts module a tensor belongs to: a fused expert tensor's own module, or, for a dialect whose loader
    fuses experts (transformers' fp8), the `*.experts` module a per-expert Linear is merged into at load."""
    if kind == "experts":
        return module_of(name)
    match = _EXPERT_LINEAR.match(name) if kind in ("linear", "kept") and dialect.experts else None
    return match["experts"] if match else None


def _experts_fates(source: SourceIndex, dialect, kinds: dict, patterns) -> dict[str, str | None]:
    """Per experts module: None when every expert tensor of it can be quantized, else why not."""
    fates: dict[str, str | None] = {}
    for info in source.tensors.values():
        kind, reason = kinds[info.name]
        group = experts_module(info.name, kind, dialect)
        if group is None:
            continue
        matched = _first_match(module_of(info.name), patterns)
        why = None
        if matched is not None:
            why = f"excluded by {matched!r}"
        elif kind == "kept":
            why = reason
        elif dialect.unfit(info.shape):
            shape = dialect.unfit(info.shape).removeprefix("shape ")
            why = f"expert tensor {info.name.removeprefix(group + '.')} {shape}"
        elif info.dtype not in QUANTIZABLE_DTYPES:
            why = f"dtype {info.dtype} is not quantized (only {', '.join(QUANTIZABLE_DTYPES)})"
        fates[group] = fates.get(group) or why
    return fates


def _copy(info: TensorInfo, reason: str) -> TensorPlan:
    return TensorPlan(info.name, info.name, COPY, info.dtype, info.shape, reason)


def _first_match(module: str, patterns: tuple[str, ...]) -> str | None:
    """The first of `patterns` that excludes `module`, or None."""
    if should_convert_module(module, patterns):  # all at once (one regex): most modules match none
        return None
    for pattern in patterns:
        if not should_convert_module(module, [pattern]):
            return pattern
    return None


def assign_shards(groups: list[list[TensorPlan]], max_shard_size: int,
                   single_file: bool = False) -> tuple[ShardPlan, ...]:
    """Fill shards in order up to `max_shard_size`; an FP8 weight and its scale always share a shard, and a
    group larger than the cap gets a shard of its own (as transformers does). A `single_file` source whose
    output fits one shard keeps the one `model.safetensors`, as `save_pretrained` writes it (some loaders look
    for that name first); otherwise shards are `model-0000i-of-0000n.safetensors`."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for group in groups:
        group_size = sum(t.nbytes for t in group)
        if shards[-1] and size + group_size > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += group_size
    count = len(shards)
    if single_file and count == 1:
        return (ShardPlan(SINGLE_FILE_NAME, tuple(shards[0])),)
    return tuple(
        ShardPlan(SHARD_NAME.format(index=i + 1, count=count), tuple(tensors)) for i, tensors in enumerate(shards)
    )


def _unmatched(patterns, linear_modules: Iterable[str], config: dict) -> list[tuple[str, str]]:
    """Patterns that exclude no Linear of the checkpoint, each with a note or a suggested full path."""
    out = []
    for pattern in patterns:
        if any(not should_convert_module(m, [pattern]) for m in linear_modules):
            continue
        if pattern == "lm_head" and _ties_embeddings(config):
            note = "lm_head is tied to the input embedding and not stored; kept in the config, the loader needs it"
        else:
            suggestion = _suggest_full_path(pattern, linear_modules)
            note = f"did you mean {suggestion!r}? patterns match full module paths" if suggestion else "matches no Linear"
        out.append((pattern, note))
    return out


def _ties_embeddings(config: dict) -> bool:
    sub = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", sub.get("tie_word_embeddings", True)))


def _suggest_full_path(pattern: str, modules: Iterable[str]) -> str | None:
    """The most common full prefix, ending at a module boundary, whose last components equal `pattern`."""
    found = Counter()
    for module in modules:
        parts = module.split(".")
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if prefix.endswith("." + pattern):
                found[prefix] += 1
                break
    return found.most_common(1)[0][0] if found else None


def _legacy_matching_warnings(modules: Iterable[str], patterns: tuple[str, ...]) -> list[str]:
    differ = [m for m in modules if should_convert_module(m, patterns) != should_convert_module_legacy(m, patterns)]
    if not differ:
        return []
    return [
        f"transformers 5.5-5.22 match exclusions without a module boundary: they would also keep {differ[0]} "
        f"(and {len(differ) - 1} more) in BF16 and load it wrongly; use transformers >= 5.23"
    ]


def describe_plan(plan: Plan) -> str:
    """A human summary of a plan: counts per fate, output size, exclusions, warnings."""
    if plan.scheme is None:
        return _describe_decoding(plan)
    fates = Counter()
    for t in plan.tensors:
        if t.action == QUANTIZE:
            fates[f"FP8 weight, {t.reason}"] += 1
        elif t.action == SCALE:
            fates[f"scale ({t.name.rpartition('.')[2]}, {t.dtype})"] += 1
        else:
            fates[f"copied, {t.reason}"] += 1
    lines = [
        f"dialect: {plan.dialect.label}",
        f"loaded by: {plan.dialect.servers}",
        f"tensor set checked against: {plan.dialect.set_judged_by}",
        f"{len(plan.tensors)} output tensors in {len(plan.shards)} shard(s)",
        f"source tensors {format_size(plan.source_nbytes)} -> output tensors {format_size(plan.output_nbytes)} "
        f"({plan.output_nbytes / max(plan.source_nbytes, 1):.1%})",
        "tensors by fate:",
    ]
    lines += [f"  {n:6d}  {fate}" for fate, n in sorted(fates.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines.append(f"Linear modules kept in the source dtype: {len(plan.kept_linears)}")
    for reason, n in Counter(plan.kept_linears.values()).most_common():
        lines.append(f"  {n:6d}  {reason}")
    lines.append(f"{plan.dialect.exclusion_key}: {list(plan.modules_to_not_convert)}")
    for pattern, note in plan.unmatched_patterns:
        lines.append(f"pattern {pattern!r} matches no Linear in the checkpoint: {note}")
    lines.append(f"other files copied: {len(plan.files_to_copy)}")
    for path, why in plan.files_skipped:
        lines.append(f"not copied: {path} ({why})")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _describe_decoding(plan: Plan) -> str:
    """`dequantize`'s plan in words: what is read, what is written."""
    decoded = [t for t in plan.tensors if t.action == DECODE]
    dtype = decoded[0].dtype if decoded else "?"
    lines = [
        f"source: {plan.decoded_from}",
        f"{len(decoded)} FP8 weights to {dtype}, {plan.dropped_scales} scale tensors dropped, "
        f"{len(plan.tensors) - len(decoded)} tensors copied; {len(plan.shards)} shard(s)",
        f"source tensors {format_size(plan.source_nbytes)} -> output tensors {format_size(plan.output_nbytes)}",
        f"other files copied: {len(plan.files_to_copy)}",
    ]
    lines += [f"not copied: {path} ({why})" for path, why in plan.files_skipped]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)
