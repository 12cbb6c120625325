"""Planning an FP8 source: read through its 16-bit view (`dialects.decoded`), it is planned as any BF16 source, and
its FP8 weights that stay unquantized are marked to be decoded (`DECODE`), not copied. `dequantize` is the
plan that decodes every one of them and quantizes nothing (`decode_plan`)."""

from __future__ import annotations

import dataclasses

from .configs import CARD_NAME
from .dialects import writer_for, writer_from_config
from .dialects.decoded import DecodedSource, decoded_view
from .errors import PlanError, SourceError
from .plan import COPY, DECODE, Plan, TensorPlan, assign_shards
from .source import SINGLE_FILE_NAME, SourceIndex


def source_to_convert(source: SourceIndex, scheme) -> SourceIndex:
    """`source` itself when it holds no quantization; else its BF16 view (`decoded_view`).

    Raises:
        PlanError: the source is already in the asked dialect and block, or quantized in a way this tool cannot
            read.
    """
    qc = source.config.get("quantization_config")
    if qc is None:
        return source
    where = f"{source.name or source.root}/config.json"
    try:
        view = decoded_view(source)
    except SourceError as exc:  # the reader's one-line refusal, said for a conversion
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise PlanError(f"the source is already quantized ({method}) and cannot be read as FP8: {exc}; give a BF16 "
                        "checkpoint") from None
    same, _ = writer_from_config(qc) if isinstance(qc, dict) else (None, [])
    if same is not None and same == writer_for(scheme):
        raise PlanError(f"{where}: the source is already {view.dialect}, the dialect and block asked for; nothing to "
                        "convert (another --format, --scheme, --scale-fmt or --block-size re-quantizes it)")
    return view


def plan_for(plan: Plan, source: SourceIndex) -> Plan:
    """The plan with the FP8 weights of a decoded source that stay unquantized marked to be dequantized, not
    copied (their stored bytes are FP8)."""
    if not isinstance(source, DecodedSource):
        return plan

    def retag(t):
        if t.action == COPY and t.source in source.pairs:
            return dataclasses.replace(t, action=DECODE, dtype=source.dtype)
        return t

    shards = tuple(dataclasses.replace(s, tensors=tuple(map(retag, s.tensors))) for s in plan.shards)
    return dataclasses.replace(plan, shards=shards)


def decode_plan(source: DecodedSource, max_shard_size: int) -> Plan:
    """`dequantize`'s plan: every FP8 weight of `source` decoded to its view's dtype, every other tensor copied,
    the scales dropped, the shards and the output config (the view's) decided from headers alone."""
    groups = []
    for info in source.tensors.values():
        if info.name in source.pairs:
            groups.append([TensorPlan(info.name, info.name, DECODE, source.dtype, info.shape, "dequantized")])
        else:
            groups.append([TensorPlan(info.name, info.name, COPY, info.dtype, info.shape, "copied")])
    skipped = tuple((f, "replaced by the dequantized model card" if f == CARD_NAME else why)
                    for f, why in source.files_skipped)
    return Plan(
        scheme=None,
        shards=assign_shards(groups, max_shard_size, single_file=source.shards == (SINGLE_FILE_NAME,)),
        config=source.config,
        fp8_modules=(),
        kept_linears={},
        modules_to_not_convert=(),
        ignored_layers=(),
        unmatched_patterns=(),
        files_to_copy=source.files_to_copy,
        files_skipped=skipped,
        warnings=source.warnings,
        source_nbytes=source.fp8.nbytes,
        decoded_from=source.dialect,
        dropped_scales=len(source.pairs),
    )
