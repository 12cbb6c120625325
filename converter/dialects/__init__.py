"""Quantized checkpoint dialects, one small module each: how a dialect names, shapes and scales its weights.

`reader_for` picks the reader of a checkpoint's `quantization_config` by its `quant_method`. A reader works on
headers alone (which tensor is a quantized weight, which is its scale, what block the scale covers) and has one
pure function that turns a stripe of scales into float32; the dequantize loop and the writer stay dialect-blind.
Adding a dialect is adding a module and a row in `READERS`.
"""

from __future__ import annotations

from ..errors import SourceError
from .transformers_fp8 import ScaledWeight, TransformersFP8Reader

READERS = {"fp8": TransformersFP8Reader}

__all__ = ["READERS", "ScaledWeight", "reader_for"]


def reader_for(config: dict, where: str):
    """The reader for a checkpoint whose `config.json` (at `where`, for messages) is `config`.

    Raises:
        SourceError: the config has no `quantization_config` (not a quantized checkpoint), or names a
            `quant_method` no reader handles.
    """
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise SourceError(f"{where}: no quantization_config: not an FP8 checkpoint, nothing to dequantize")
    method = qc.get("quant_method")
    reader = READERS.get(method)
    if reader is None:
        known = ", ".join(sorted(READERS))
        raise SourceError(f"{where}: quant_method {method!r} cannot be dequantized by this tool (it reads {known})")
    return reader(qc, where)
