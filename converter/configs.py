"""Constants and frozen option types. No I/O here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_DTYPE_NAME = "F8_E4M3"
SCALE_DTYPE_NAME = "F32"
SCALE_SUFFIX = "_scale_inv"

DEFAULT_BLOCK_SIZE = 64
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # "5GB", as transformers counts it
DEFAULT_PRESET = "default"

# safetensors dtype code -> bytes per element
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

# Source dtypes whose Linear weights are quantized (all are widened to float32 first, exactly).
QUANTIZABLE_DTYPES = ("BF16", "F16", "F32")

SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
# An unfinished output lives in `DST/STAGING_NAME` until it moves into place; a publish's record of its uploads in
# the staging folder from the first upload, then in `DST` until the commit.
STAGING_NAME = ".convert-fp8.partial"
PENDING_RECORD = ".convert-fp8.publish.json"


def scale_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """Shape of the inverse scales of a weight of `shape`: one per tile of the last two dimensions (leading
    dimensions, such as experts, kept)."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block_size), -(-cols // block_size))


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A weight as the 2-D matrix its tiles are cut from: expert tensors stack their experts' rows (each
    expert's rows divide by the block, so no tile spans two experts)."""
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows, shape[-1]


def tiles_evenly(shape: tuple[int, ...], block_size: int) -> bool:
    """Whether the last two dimensions split into whole `block_size` tiles (transformers quantizes only those)."""
    return len(shape) >= 2 and shape[-2] % block_size == 0 and shape[-1] % block_size == 0


FORMATS = ("fp8", "compressed-tensors")  # output dialects: transformers' quant_method fp8, llm-compressor's
CT_SCHEMES = ("fp8-block", "fp8-dynamic", "mxfp8", "mxfp8a16")  # compressed-tensors: FP8_BLOCK, FP8_DYNAMIC (per
# output channel), MXFP8 and MXFP8A16 (a power-of-two scale per 32 columns)
SCALE_FORMATS = ("float", "ue8m0")  # transformers fp8: float32 or power-of-two (F8_E8M0) inverse scales
CT_DEFAULT_BLOCK_SIZE = 128  # llm-compressor's FP8_BLOCK


class FusedKernel(NamedTuple):
    """The numba kernel that computes a dialect's bytes (`quantize_fast`): its scale rule, the weight rows and
    columns one scale covers (columns 0: the whole row), and a table the rule reads, if any."""

    rule: str
    rows: int
    cols: int
    aux: Any = None


@dataclass(frozen=True)
class FP8Scheme:
    """How weights are quantized and in which dialect: E4M3 values with square blocks of `block_size` (or one
    scale per output channel, `fp8-dynamic`), in transformers' `fp8` format (float32 or UE8M0 inverse scales)
    or llm-compressor's `compressed-tensors`. `converter.dialects.writer_for` turns it into the dialect."""

    block_size: int = DEFAULT_BLOCK_SIZE
    format: str = "fp8"
    scheme: str = "fp8-block"
    scale_fmt: str = "float"

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size % 16:
            raise ValueError(f"block size must be a positive multiple of 16, got {self.block_size}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.scheme not in CT_SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(CT_SCHEMES)}, got {self.scheme!r}")
        if self.scale_fmt not in SCALE_FORMATS:
            raise ValueError(f"scale format must be one of {', '.join(SCALE_FORMATS)}, got {self.scale_fmt!r}")
        if self.format == "fp8" and self.scheme != "fp8-block":
            raise ValueError(f"--scheme {self.scheme} is a compressed-tensors scheme: add --format compressed-tensors")
        if self.format == "compressed-tensors" and self.scale_fmt != "float":
            raise ValueError("--scale-fmt ue8m0 is a transformers fp8 option; compressed-tensors stores scales in "
                             "the weight's dtype")


@dataclass(frozen=True)
class Preset:
    """A named set of defaults from `configs/`: exclusion patterns and block size."""

    name: str
    modules_to_not_convert: tuple[str, ...]
    block_size: int = DEFAULT_BLOCK_SIZE
    architectures: tuple[str, ...] = ()  # the architectures it was written for; others get a warning
    description: str = ""
    origin: str = ""  # the name or file it was loaded from


NO_PRESET = Preset("none", ())
OUTPUT_DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}  # `dequantize --dtype` -> safetensors dtype


@dataclass(frozen=True)
class ConvertOptions:
    """Everything one run needs to know: a conversion into an FP8 dialect, or, with `dtype`, `dequantize`'s
    16-bit checkpoint of an FP8 source (then only src, dst, max_shard_size, overwrite, base_model, revision,
    low_disk and allow_external_links apply)."""

    src: Path | str  # a folder, or a Hub repo id
    dst: Path
    preset: Preset = NO_PRESET
    extra_excludes: tuple[str, ...] = ()
    block_size: int | None = None  # None: the preset's
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    overwrite: bool = False
    arch_check: bool = True
    base_model: str | None = None  # for the model card; defaults to the source folder name
    quantizer: str = "auto"  # "auto", "numba" or "torch"; all give the same bytes
    device: str = "cpu"  # where the torch quantizer runs
    part: tuple[int, int] = (1, 1)  # (i, n): convert the i-th of n fixed subsets of the output shards
    revision: str | None = None  # Hub sources: branch, tag or commit
    low_disk: bool = False  # Hub sources: delete each downloaded shard once its tensors are written
    allow_external_links: bool = False  # copy files of --src that link outside it (refused by default)
    format: str = "fp8"  # output dialect, see FORMATS
    quant_scheme: str = "fp8-block"  # compressed-tensors scheme, see CT_SCHEMES
    scale_fmt: str = "float"  # transformers fp8 scale format, see SCALE_FORMATS
    dtype: str | None = None  # `dequantize`: a key of OUTPUT_DTYPES, the decoded weights' dtype
    scheme: FP8Scheme | None = field(init=False)  # None for `dequantize`

    def __post_init__(self):
        if self.dtype is not None:
            if self.dtype not in OUTPUT_DTYPES:
                raise ValueError(f"dtype {self.dtype!r}: expected one of {', '.join(OUTPUT_DTYPES)}")
            object.__setattr__(self, "scheme", None)
            return
        # compressed-tensors' FP8_BLOCK is 128x128 unless asked otherwise; the preset's 64 is transformers'
        default_block = CT_DEFAULT_BLOCK_SIZE if self.format == "compressed-tensors" else self.preset.block_size
        object.__setattr__(self, "scheme", FP8Scheme(self.block_size or default_block, self.format,
                                                     self.quant_scheme, self.scale_fmt))
        i, n = self.part
        if not 1 <= i <= n:
            raise ValueError(f"part {i}/{n}: expected 1 <= I <= N")

    @property
    def command(self) -> str:
        """The command this run is: `convert-fp8 convert` or `convert-fp8 dequantize`."""
        return "convert" if self.dtype is None else "dequantize"

    @property
    def exclude_patterns(self) -> tuple[str, ...]:
        """Preset patterns then `--exclude` ones, in order, without repeats."""
        return tuple(dict.fromkeys(self.preset.modules_to_not_convert + self.extra_excludes))


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """Parse a size as transformers' `max_shard_size` does: "5GB" is 5*10**9 bytes, "2GiB" is 2*2**30.

    Raises:
        ValueError: the text is not a positive size.
    """
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB or a number of bytes)")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_size(nbytes: int) -> str:
    """Human-readable decimal size: 1.23 GB."""
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= factor:
            return f"{nbytes / factor:.2f} {unit}"
    return f"{nbytes} B"
