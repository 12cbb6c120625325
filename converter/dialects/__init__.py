"""Quantized checkpoint dialects, one small module each: how a dialect names, shapes and scales its weights.

`reader_for` picks the reader of a checkpoint's `quantization_config` by its `quant_method`. A reader works on
headers alone (which tensor is a quantized weight, which is its scale, what block the scale covers) and has one
pure function that turns a stripe of scales into float32; the dequantize loop and the writer stay dialect-blind.
Adding a dialect is adding a module and a row in `READERS`.
"""

from __future__ import annotations

from ..errors import SourceError
from .compressed_tensors import MX_SCHEME_NAMES, CompressedTensorsWriter, MXWriter
from .compressed_tensors_reader import CompressedTensorsReader
from .transformers_fp8 import ScaledWeight, TransformersFP8Writer
from .transformers_fp8_reader import TransformersFP8Reader

READERS = {"fp8": TransformersFP8Reader, "compressed-tensors": CompressedTensorsReader}

# The writing side: a writer holds one output dialect's tensor names, scale dtypes and shapes, its scale math
# (`quantize`, pure torch on a stripe of whole scale rows), its `quantization_config` and its loader's matching
# rule (`exclusions`, `converts`). The plan picks one with `writer_for`; `verify` finds it from the config.
WRITERS = {"fp8": TransformersFP8Writer, "compressed-tensors": CompressedTensorsWriter}

__all__ = ["READERS", "WRITERS", "ScaledWeight", "reader_for", "writer_for", "writer_from_config"]


def writer_for(scheme):
    """The writer of a `configs.FP8Scheme`."""
    if scheme.format == "compressed-tensors" and scheme.scheme in MX_SCHEME_NAMES:
        return MXWriter(scheme.scheme)
    if scheme.format == "compressed-tensors":
        return CompressedTensorsWriter(scheme.scheme, scheme.block_size)
    return TransformersFP8Writer(scheme.block_size, scheme.scale_fmt)


def writer_from_config(qc: dict):
    """The writer whose output carries this `quantization_config`, and the problems found in it.

    Returns:
        `(writer or None, problems)`: None when the config names no dialect this tool writes.
    """
    method = qc.get("quant_method")
    writer = WRITERS.get(method)
    if writer is None:
        return None, [f"quantization_config.quant_method is {method!r}, expected one of {sorted(WRITERS)}"]
    return writer.from_config(qc)


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
