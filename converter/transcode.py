"""Converting an FP8 checkpoint into another FP8 dialect in one streaming pass: the bytes of `dequantize` then a
conversion, without the BF16 checkpoint in between.

The source is read as the BF16 checkpoint `dequantize` would write (`dialects.decoded`), planned as any BF16
source, and written in the usual lanes: a weight the target quantizes is decoded stripe by stripe and quantized
(`QuantizeLane` over a `DecodingReader`); one it keeps unquantized is dequantized as `dequantize` writes it
(`DequantizeLane`); every other tensor is copied.
"""

from __future__ import annotations

import dataclasses

from .dialects import writer_for, writer_from_config
from .dialects.decoded import DECODED_DTYPE, DecodedSource, DecodingReader, decoded_view
from .errors import PlanError, SourceError
from .lanes import MainLane, QuantizeLane
from .plan import COPY, QUANTIZE, Plan
from .source import SourceIndex

DECODE = "dequantize"  # a kept FP8 weight, written in BF16 (dequantize's action, which `DequantizeLane` writes)


@dataclasses.dataclass(frozen=True)
class _Kept:
    """What `DequantizeLane` reads of its plan: the FP8 weights with their scales, their reader, the dtype."""

    pairs: dict
    reader: object
    dtype: str = DECODED_DTYPE


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


def requantized(source: SourceIndex) -> str | None:
    """What the source is when it is an FP8 checkpoint read through its BF16 view; else None."""
    return source.dialect if isinstance(source, DecodedSource) else None


def plan_for(plan: Plan, source: SourceIndex) -> Plan:
    """The plan with the FP8 weights of a decoded source that stay unquantized marked to be dequantized, not
    copied (their stored bytes are FP8)."""
    if not isinstance(source, DecodedSource):
        return plan

    def retag(t):
        if t.action == COPY and t.source in source.pairs:
            return dataclasses.replace(t, action=DECODE, dtype=DECODED_DTYPE)
        return t

    shards = tuple(dataclasses.replace(s, tensors=tuple(map(retag, s.tensors))) for s in plan.shards)
    return dataclasses.replace(plan, shards=shards)


def main_lane(source: SourceIndex, quantizer) -> MainLane:
    """The conversion's main lane for this source: `QuantizeLane`, with FP8 weights decoded on the way when the
    source is FP8."""
    if isinstance(source, DecodedSource):
        return TranscodeLane(source, quantizer)
    return QuantizeLane(source, quantizer)


class _DecodingQuantizeLane(QuantizeLane):
    def open_reader(self):
        return DecodingReader(self.source)

    def reads(self, tensor) -> tuple[str, ...]:
        pair = self.source.pairs.get(tensor.source)
        return (pair.weight.shard, pair.scale.shard) if pair is not None else super().reads(tensor)


class TranscodeLane(MainLane):
    """Quantizes the weights the target quantizes (decoded on the way) and dequantizes those it keeps."""

    def __init__(self, source: DecodedSource, quantizer):
        from .dequantize import DequantizeLane

        self.quantize = _DecodingQuantizeLane(source, quantizer)
        self.decode = DequantizeLane(_Kept(source.pairs, source.reader), source.fp8)

    def items(self, writer, tensors) -> list[tuple]:
        return self.quantize.items(writer, tensors) + self.decode.items(writer, tensors)

    def reads(self, tensor) -> tuple[str, ...]:
        return (self.quantize if tensor.action == QUANTIZE else self.decode).reads(tensor)

    def _split(self, items):
        return [i for i in items if i[1].action == QUANTIZE], [i for i in items if i[1].action != QUANTIZE]

    def keep(self, done: dict, items: list[tuple]) -> dict:
        quantized, decoded = self._split(items)
        return {**self.quantize.keep(done, quantized), **self.decode.keep(done, decoded)}

    def run(self, items: list[tuple], stop, *args) -> int:
        quantized, decoded = self._split(items)
        kept = self.quantize.run(quantized, stop, *args)
        if stop.is_set():
            return kept
        return kept + self.decode.run(decoded, stop, *args)
