"""compressed-tensors (`quant_method: compressed-tensors`, format `float-quantized`), as llm-compressor's
`model_free_ptq` writes it (llmcompressor 0.14.0.1, compressed-tensors 0.19): vLLM's usual FP8 checkpoints.

Four schemes, each with static E4M3 weights:

- `fp8-block` (its FP8_BLOCK): one scale per `b x b` block (128 unless `--block-size` says 64), activations per
  token group. A weight whose rows do not tile gets partial blocks (zero-padded for the scale, as it does); one
  whose columns do not tile is kept unquantized and ignored by name: llm-compressor 0.14 fails on such a weight.
- `fp8-dynamic` (its FP8_DYNAMIC): one scale per output channel (row), activations per token.
- `mxfp8` and `mxfp8a16` (its MXFP8 and MXFP8A16, format `mxfp8-quantized`, `MXWriter`): one power-of-two scale
  per 32 consecutive input columns, stored as its biased exponent (`U8`, E8M0), activations quantized the same
  way at run time (`mxfp8`) or left in 16 bits (`mxfp8a16`). A weight whose columns are not a multiple of 32 is
  kept unquantized and ignored by name: llm-compressor 0.14 fails on it.

Each Linear `m` gets `m.weight` (F8_E4M3) and `m.weight_scale`, a *scale* (not an inverse): `w ~ q * scale`,
stored in the weight's own dtype (BF16 for a BF16 source), `[ceil(rows/b), ceil(cols/b)]` or `[rows, 1]`.

The loader quantizes every `nn.Linear` whose name no `ignore` entry matches; an entry matches a module when it
equals its full name or, written `re:REGEX`, when REGEX matches from the start of the name (no implicit
prefixes, unlike transformers' `modules_to_not_convert`). A Linear the loader builds but the checkpoint does not
store (a tied `lm_head`) must be ignored too, or it loads with its `weight_scale` missing.

Fused 3-D expert tensors are not written in this dialect: llm-compressor splits `experts.gate_up_proj` and
`experts.down_proj` into per-expert 2-D Linears (`experts.0.gate_proj.weight`, ...), a layout transformers does
not load back into a fused experts module; the plan refuses them unless they are excluded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WEIGHT_DTYPE = "F8_E4M3"
SCALE_SUFFIX = "_scale"
FP8_MAX = 448.0
COMPRESSED_TENSORS_VERSION = "0.19.0"  # the version whose bytes and config this writes
SCHEME_NAMES = {"fp8-block": "FP8_BLOCK", "fp8-dynamic": "FP8_DYNAMIC"}
MX_SCHEME_NAMES = {"mxfp8": "MXFP8", "mxfp8a16": "MXFP8A16"}
MX_GROUP = 32  # input columns per MX scale
MX_FORMAT = "mxfp8-quantized"
REFERENCE_BLOCK = 128  # FP8_BLOCK's own block; another block is a custom scheme, "config_group_0"


def match_name(name: str, target: str) -> bool:
    """compressed-tensors' `match_name`: `re:REGEX` matches from the start of the name, anything else only
    the whole name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def llm_compressor_targets(tensor_name: str) -> bool:
    """Whether `model_free_ptq` (targets `Linear`) tries to quantize this tensor: every `*.weight` whose module
    name does not end in `norm`, whatever it is (it fails on those that are not 2-D). Whatever we leave
    unquantized of these must be in `ignore`, or it would quantize it."""
    module, _, param = tensor_name.rpartition(".")
    return param == "weight" and not module.endswith("norm")


def unstored_entry(path: str) -> str:
    """The `ignore` entry for an excluded module path that the checkpoint does not store: `lm_head` (a leaf
    Linear, tied to the embeddings) by name; any other path (a vision tower left out of the checkpoint) as a
    `re:` pattern covering the module and everything under it, as the exclusion meant."""
    return path if path == "lm_head" else f"re:{re.escape(path)}($|\\.)"


def _activation_args(strategy: str, group_size: int | None, scale_dtype: str | None = None) -> dict:
    return {"actorder": None, "block_structure": None, "dynamic": True, "group_size": group_size, "num_bits": 8,
            "observer": None, "observer_kwargs": {}, "scale_dtype": scale_dtype, "strategy": strategy,
            "symmetric": True, "type": "float", "zp_dtype": None}


def _quantization_config(group: str, fmt: str, weights: dict, activations: dict | None, ignore: list[str]) -> dict:
    """The `quantization_config` of one config group, as compressed-tensors serializes it (key order included)."""
    return {
        "config_groups": {group: {"format": fmt, "input_activations": activations, "output_activations": None,
                                  "targets": ["Linear"], "weights": weights}},
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def _weight_args(strategy: str, block: list[int] | None, group_size: int | None = None,
                 scale_dtype: str | None = None) -> dict:
    return {"actorder": None, "block_structure": block, "dynamic": False, "group_size": group_size, "num_bits": 8,
            "observer": None, "observer_kwargs": {}, "scale_dtype": scale_dtype, "strategy": strategy,
            "symmetric": True, "type": "float", "zp_dtype": None}


@dataclass(frozen=True)
class CompressedTensorsWriter:
    """Writes llm-compressor's FP8_BLOCK (`scheme` "fp8-block") or FP8_DYNAMIC ("fp8-dynamic")."""

    scheme: str = "fp8-block"
    block_size: int = REFERENCE_BLOCK

    quant_method = "compressed-tensors"
    weight_dtype = WEIGHT_DTYPE
    experts = False
    scale_fmt = None

    def __post_init__(self):
        if self.scheme not in SCHEME_NAMES:
            raise ValueError(f"compressed-tensors scheme must be one of {', '.join(SCHEME_NAMES)}, got {self.scheme!r}")

    @property
    def blocked(self) -> bool:
        return self.scheme == "fp8-block"

    @property
    def rows_per_scale(self) -> int:
        return self.block_size if self.blocked else 1

    @property
    def fused_kernel(self):
        """The numba kernel that gives this dialect's bytes (`configs.FusedKernel`): BF16 and F32 weights."""
        from ..configs import FusedKernel

        return FusedKernel("ct", self.block_size, self.block_size) if self.blocked else FusedKernel("ct", 1, 0)

    @property
    def label(self) -> str:
        if self.blocked:
            b = self.block_size
            return f"compressed-tensors FP8_BLOCK (float-quantized), {b}x{b} blocks, scales in the weight dtype"
        return "compressed-tensors FP8_DYNAMIC (float-quantized), one scale per output channel, per-token activations"

    @property
    def servers(self) -> str:
        return "vLLM (compressed-tensors), transformers with compressed-tensors installed, SGLang"

    # What the cross-check holds the quantized set against: these loaders match Linears by module name
    set_judged_by = ("module names, as compressed-tensors and vLLM match them: the nn.Linear modules of the "
                     "architecture transformers builds, and each stored per-expert Linear of its experts modules")

    @property
    def card_title(self) -> str:
        return "Fine-grained FP8 (block-quantized)" if self.blocked else "FP8 (per-channel)"

    @property
    def group_columns(self) -> int | None:
        """Input columns one scale covers; None for all of them (one scale per row)."""
        return self.block_size if self.blocked else None

    exclusion_key = "ignore"
    legacy_matching = False
    scale_dtype_text = "BF16/F16/F32 (the source weight's)"

    @staticmethod
    def accepts_scale_dtype(dtype: str) -> bool:
        return dtype in ("BF16", "F16", "F32")

    @staticmethod
    def unavailable() -> str | None:
        return None

    def card_weights(self, n: int) -> str:
        """The model card's line on what the weights are and whose bytes they equal."""
        if self.blocked:
            b = self.block_size
            what, acts = f"per-{b}x{b}-block scales", "per token group"
        else:
            what, acts = "one scale per output channel", "per token"
        return (f"{n} Linear weights stored as FP8 E4M3 with {what} (`weight_scale`, in the weight's dtype),\n  "
                f"byte-identical to llm-compressor's `model_free_ptq` (llmcompressor 0.14.0.1, scheme "
                f"{SCHEME_NAMES[self.scheme]}); activations are\n  quantized at run time, {acts} "
                "(compressed-tensors, `float-quantized`).")

    def card_why(self) -> str:
        if not self.blocked:
            return ("One scale per output channel (FP8_DYNAMIC): the widest support in vLLM, and no shape "
                    "constraint.\n  Check output values, not only that the model loads.")
        b = self.block_size
        return (f"{b}x{b} blocks (FP8_BLOCK): outliers flatten only their own block. A block size that divides "
                "every\n  shape is not proof that it is numerically safe: check output values, not only that the "
                "model loads.")

    cpu_load = "weights stay FP8 and compressed-tensors dequantizes them at run time"
    card_ignored = ("`ignore` names by full path every Linear kept unquantized (compressed-tensors matches names "
                    "exactly,\n  or `re:` patterns from the start), the embeddings, and a head tied to them.")
    card_loading = ("vLLM loads it as it is (`vllm serve`); transformers needs `pip install compressed-tensors` and "
                    "keeps the\nweights in FP8, dequantizing them at run time on a CPU.")

    @staticmethod
    def scale_name(weight_name: str) -> str:
        return weight_name + SCALE_SUFFIX

    @staticmethod
    def scale_dtype(weight_dtype: str) -> str:
        return weight_dtype  # calculate_qparams computes in the weight's dtype and keeps it

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        rows, cols = shape[-2:]
        if self.blocked:
            b = self.block_size
            return (-(-rows // b), -(-cols // b))
        return (rows, 1)

    def unfit(self, shape: tuple[int, ...]) -> str | None:
        if self.blocked and shape[-1] % self.block_size:
            return (f"shape {'x'.join(map(str, shape[-2:]))}: columns do not tile by {self.block_size} "
                    "(llm-compressor 0.14 cannot write such a weight)")
        return None

    def quantize(self, weight):
        """See `quantize_ct`."""
        return quantize_ct(weight, self.block_size if self.blocked else None)

    def dequantize(self, fp8, scales):
        """What the loader computes: `q.to(scale dtype) * scale`, per block or row, in float32 here."""
        import torch

        rows, cols = fp8.shape
        q = fp8.to(scales.dtype).to(torch.float32)
        s = scales.to(torch.float32)
        if not self.blocked:
            return q * s
        b = self.block_size
        full = s.repeat_interleave(b, 0).repeat_interleave(b, 1)[:rows, :cols]
        return q * full

    def exclusion_list(self, patterns, kept: dict[str, str], unstored, others) -> list[str]:
        """`ignore`, by full name: every Linear kept unquantized, the excluded module paths the checkpoint does
        not store (`unstored`: a tied `lm_head`, which would otherwise load with its `weight_scale` missing, or a
        whole tower, see `unstored_entry`), and the module of every other tensor (`others`, by tensor name) that
        llm-compressor would try to quantize (embeddings, norms not named `*norm`)."""
        linears = [m for m, why in kept.items() if m.rpartition(".")[2] != "experts"]
        other = [n.rpartition(".")[0] for n in others if llm_compressor_targets(n)]
        return list(dict.fromkeys([*linears, *map(unstored_entry, unstored), *other]))

    def quantization_config(self, ignore: list[str], ignored_layers: list[str] | None = None) -> dict:
        """The `quantization_config` that `model_free_ptq` writes for this scheme and `ignore`."""
        if self.blocked:
            b = self.block_size
            weights = _weight_args("block", [b, b])
            activations = _activation_args("group", b)
        else:
            weights = _weight_args("channel", None)
            activations = _activation_args("token", None)
        name = SCHEME_NAMES[self.scheme] if not self.blocked or self.block_size == REFERENCE_BLOCK else "config_group_0"
        return _quantization_config(name, "float-quantized", weights, activations, ignore)

    @staticmethod
    def exclusions(qc: dict) -> list[str]:
        return list(qc.get("ignore") or [])

    @staticmethod
    def converts(module: str, ignore: list[str]) -> bool:
        """The loader's rule: whether it quantizes the Linear `module` under this `ignore` list."""
        return not any(match_name(module, entry) for entry in ignore)

    @classmethod
    def from_config(cls, qc: dict) -> tuple[CompressedTensorsWriter | None, list[str]]:
        """The writer of this `quantization_config` (one FP8 group of ours), and what is wrong with it."""
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or len(groups) != 1:
            return None, [f"quantization_config.config_groups is {groups!r}: expected one FP8 group"]
        group = next(iter(groups.values()))
        weights = group.get("weights") or {} if isinstance(group, dict) else {}
        problems = []
        want = MX_FORMAT if weights.get("strategy") == "group" else "float-quantized"
        if qc.get("format") != want or group.get("format") != want:
            problems.append(f"quantization_config.format is {qc.get('format')!r}, expected {want!r}")
        if (weights.get("num_bits"), weights.get("type"), weights.get("symmetric")) != (8, "float", True):
            problems.append(f"quantization_config weights are {weights!r}, expected 8-bit symmetric float")
        if group.get("targets") != ["Linear"]:
            problems.append(f"quantization_config targets {group.get('targets')!r}, expected ['Linear']")
        if not isinstance(qc.get("ignore", []), list):
            problems.append("quantization_config.ignore is not a list")
        strategy = weights.get("strategy")
        if strategy == "group":
            return MXWriter.from_group(qc, group, weights, problems)
        if strategy == "channel":
            return cls("fp8-dynamic"), problems
        block = weights.get("block_structure")
        if strategy == "block" and isinstance(block, list) and len(block) == 2 and block[0] == block[1] \
                and isinstance(block[0], int) and block[0] > 0:
            return cls("fp8-block", block[0]), problems
        return None, problems + [f"quantization_config weights strategy {strategy!r} with block {block!r}: "
                                 "expected channel, or block [n, n]"]


def quantize_ct(weight, block: int | None):
    """compressed-tensors' FP8 weight quantization (`calculate_qparams`, then `quantize`), in the weight's dtype:

        scale = amax / 448              (amax per block, zero-padded; or per row), one rounding to the dtype
        scale = eps(dtype) where it is 0
        q = e4m3_RNE(clamp(RN_dtype(w / scale), -448, 448))

    A BF16 weight is divided in BF16 (rounded to BF16 before the cast to E4M3), as it does.

    Args:
        weight (`torch.Tensor`): 2-D, BF16, F16 or F32; with `block`, whole block rows except at the end.
        block (`int` or `None`): block edge, or None for one scale per row.

    Returns:
        `(float8_e4m3fn weight, scale)`, the scale in the weight's dtype, `[ceil(r/b), ceil(c/b)]` or `[r, 1]`.

    Raises:
        quantize.NonFiniteError: the weight holds NaN or Inf (it would write NaN scales).
    """
    import torch

    from ..quantize import NonFiniteError

    dtype = weight.dtype
    rows, cols = weight.shape
    if block is None:
        amax = weight.abs().amax(dim=1, keepdim=True)
        bad = ~torch.isfinite(amax)
        if bad.any():
            raise NonFiniteError("holds NaN or Inf", row=int(bad.nonzero()[0, 0]))
        scale = _scale(amax, dtype)
        fp8 = (weight / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return fp8, scale
    pr, pc = -(-rows // block) * block, -(-cols // block) * block
    padded = weight
    if (pr, pc) != (rows, cols):
        padded = torch.zeros((pr, pc), dtype=dtype, device=weight.device)
        padded[:rows, :cols] = weight
    tiles = padded.reshape(pr // block, block, pc // block, block)
    amax = tiles.abs().amax(dim=(1, 3))
    bad = ~torch.isfinite(amax)
    if bad.any():
        raise NonFiniteError("holds NaN or Inf", row=int(bad.any(dim=1).nonzero()[0, 0]) * block)
    scale = _scale(amax, dtype)
    fp8 = (tiles / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    fp8 = fp8.reshape(pr, pc)[:rows, :cols]
    return fp8.contiguous(), scale


def _scale(amax, dtype):
    import torch

    # a 0-d tensor of the dtype, as calculate_qparams divides by `bit_range.to(dtype) / 2`
    scale = amax / torch.tensor(FP8_MAX, dtype=dtype)
    return torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), scale)


@dataclass(frozen=True)
class MXWriter(CompressedTensorsWriter):
    """Writes compressed-tensors' MXFP8 (`scheme` "mxfp8", dynamic MXFP8 activations) or MXFP8A16 ("mxfp8a16",
    16-bit activations): E4M3 weights, one `U8` E8M0 exponent per row and 32 input columns (`weight_scale`,
    `[rows, cols/32]`), as `model_free_ptq` writes them. Names, `ignore` and its matching are
    `CompressedTensorsWriter`'s."""

    scheme: str = "mxfp8"
    block_size: int = MX_GROUP  # columns per scale; one row per scale

    def __post_init__(self):
        if self.scheme not in MX_SCHEME_NAMES:
            raise ValueError(f"MX scheme must be one of {', '.join(MX_SCHEME_NAMES)}, got {self.scheme!r}")

    blocked = False
    rows_per_scale = 1
    scale_dtype_text = "U8 (E8M0 exponents)"

    @property
    def group_columns(self) -> int:
        return MX_GROUP

    @property
    def fused_kernel(self):
        from ..configs import FusedKernel

        return FusedKernel("mx", 1, MX_GROUP)

    @property
    def label(self) -> str:
        acts = "MXFP8 activations at run time" if self.scheme == "mxfp8" else "16-bit activations"
        return (f"compressed-tensors {MX_SCHEME_NAMES[self.scheme]} ({MX_FORMAT}), one power-of-two scale per "
                f"{MX_GROUP} columns (E8M0, U8), {acts}")

    @property
    def servers(self) -> str:
        return "vLLM (compressed-tensors MXFP8), transformers with compressed-tensors installed"

    @property
    def card_title(self) -> str:
        return "MXFP8 (microscaling, one power-of-two scale per 32 columns)"

    @staticmethod
    def accepts_scale_dtype(dtype: str) -> bool:
        return dtype == "U8"

    def card_weights(self, n: int) -> str:
        acts = ("activations are quantized at run time to MXFP8\n  (32-element groups)" if self.scheme == "mxfp8"
                else "activations stay in 16 bits")
        return (f"{n} Linear weights stored as FP8 E4M3 with one power-of-two scale per {MX_GROUP} input columns "
                f"(`weight_scale`,\n  its E8M0 exponent as U8), byte-identical to llm-compressor's `model_free_ptq` "
                f"(llmcompressor 0.14.0.1, scheme\n  {MX_SCHEME_NAMES[self.scheme]}); {acts} (compressed-tensors, "
                f"`{MX_FORMAT}`).")

    def card_why(self) -> str:
        return (f"{MX_GROUP}-column groups with power-of-two scales (OCP microscaling): fine groups, and scales the "
                "MX tensor cores\n  read as they are. Check output values, not only that the model loads.")

    cpu_load = "weights stay MXFP8 and compressed-tensors dequantizes them at run time"

    @staticmethod
    def scale_dtype(weight_dtype: str) -> str:
        return "U8"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        rows, cols = shape[-2:]
        return (rows, -(-cols // MX_GROUP))

    def unfit(self, shape: tuple[int, ...]) -> str | None:
        if shape[-1] % MX_GROUP:
            return (f"shape {'x'.join(map(str, shape[-2:]))}: columns are not a multiple of {MX_GROUP} "
                    "(llm-compressor 0.14 cannot write such a weight)")
        return None

    def quantize(self, weight):
        """See `quantize_mx`."""
        return quantize_mx(weight)

    def dequantize(self, fp8, scales):
        """What the loader computes: each E4M3 value times `2 ** (exponent - 127)`, in float32 here."""
        import torch

        from .transformers_fp8 import decode_scale_bytes

        q = fp8.to(torch.float32)
        s = torch.from_numpy(decode_scale_bytes(scales.contiguous().view(torch.uint8).numpy(), "U8"))
        return q * s.reshape(scales.shape).repeat_interleave(MX_GROUP, 1)[:, : q.shape[1]]

    def quantization_config(self, ignore: list[str], ignored_layers: list[str] | None = None) -> dict:
        """The `quantization_config` that `model_free_ptq` writes for MXFP8 / MXFP8A16 and `ignore`."""
        activations = (_activation_args("group", MX_GROUP, "torch.uint8") if self.scheme == "mxfp8" else None)
        weights = _weight_args("group", None, MX_GROUP, "torch.uint8")
        return _quantization_config(MX_SCHEME_NAMES[self.scheme], MX_FORMAT, weights, activations, ignore)

    @classmethod
    def from_group(cls, qc: dict, group: dict, weights: dict, problems: list[str]):
        """The MX writer of a `group`-strategy config group (see `CompressedTensorsWriter.from_config`)."""
        if (weights.get("group_size"), weights.get("scale_dtype")) != (MX_GROUP, "torch.uint8"):
            return None, problems + [f"quantization_config weights group_size {weights.get('group_size')!r} with "
                                     f"scale_dtype {weights.get('scale_dtype')!r}: expected {MX_GROUP} and "
                                     "torch.uint8 (MXFP8)"]
        return cls("mxfp8" if group.get("input_activations") else "mxfp8a16"), problems


def quantize_mx(weight):
    """compressed-tensors' MXFP8 weight quantization (`calculate_qparams` with `generate_mx_scales`, `quantize`,
    then `compress_mx_scale`), in the weight's dtype, per row and group of 32 columns:

        amax  = max |w| over the group
        p     = amax with its mantissa rounded to a power of two by bits: + 2**(m - 2) ulp, then the mantissa
                dropped (m the dtype's mantissa bits), so 1.75 * 2**k and above round up to 2**(k + 1)
        e     = round(clamp(127 + floor(log2(p)) - 8, 0, 255))      (8 = floor(log2(448)); -inf for a zero group)
        scale = dtype(2.0 ** (e - 127)), or 1 where that is 0 (uint8's eps; an F16 weight's tiny groups)
        q     = e4m3_RNE(clamp(RN_dtype(w / scale), -448, 448))
        stored: uint8(127 + floor(log2(scale)))

    Args:
        weight (`torch.Tensor`): 2-D, BF16, F16 or F32, columns a multiple of 32.

    Returns:
        `(float8_e4m3fn weight, uint8 exponents [rows, cols / 32])`.

    Raises:
        quantize.NonFiniteError: the weight holds NaN or Inf.
    """
    import torch

    from ..quantize import NonFiniteError

    dtype = weight.dtype
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // MX_GROUP, MX_GROUP)
    amax = groups.abs().amax(dim=-1)
    bad = ~torch.isfinite(amax)
    if bad.any():
        raise NonFiniteError("holds NaN or Inf", row=int(bad.any(dim=1).nonzero()[0, 0]))
    exponent = 127 + torch.floor(torch.log2(_round_to_power_2(amax))) - 8
    exponent = torch.round(exponent.clamp(0, 255)).to(torch.uint8)
    scale = (2.0 ** (exponent.to(torch.int32) - 127).to(torch.float)).to(dtype)
    scale = torch.where(scale == 0, torch.tensor(1, dtype=dtype), scale)
    fp8 = (groups / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(rows, cols)
    stored = (127 + torch.floor(torch.log2(scale)).to(torch.int32)).to(torch.uint8)
    return fp8, stored


# (integer view, mantissa bits) of each float dtype, for the power-of-two rounding
_FLOAT_BITS = {"bfloat16": ("int16", 7), "float16": ("int16", 10), "float32": ("int32", 23)}


def _round_to_power_2(x):
    """compressed-tensors' `round_to_power_2` on the bits of `x` (non-negative): add a quarter of the exponent's
    step to the mantissa and keep sign and exponent."""
    import torch

    int_name, mantissa = _FLOAT_BITS[str(x.dtype).removeprefix("torch.")]
    bits = x.view(getattr(torch, int_name)).to(torch.int32)
    width = 16 if int_name == "int16" else 32
    exponent_bits = width - 1 - mantissa
    mask = ((1 << (exponent_bits + 1)) - 1) << mantissa
    rounded = torch.bitwise_and(bits + (1 << (mantissa - 2)), mask)
    if width == 16:
        return rounded.to(torch.int16).view(x.dtype)
    return rounded.view(x.dtype)


# ---- Reading: compressed-tensors checkpoints for `dequantize` --------------------------------------------------

READ_FORMATS = ("float-quantized", MX_FORMAT)
FLOAT_SCALE_DTYPES = ("BF16", "F16", "F32")


class CompressedTensorsReader:
    """Reads the `quantization_config` and tensor names of a compressed-tensors FP8 checkpoint (`float-quantized`:
    FP8_BLOCK, FP8_DYNAMIC, per-tensor FP8 with static or dynamic activations; `mxfp8-quantized`: MXFP8 and
    MXFP8A16), whoever wrote it. One config group, 8-bit symmetric float weights.

    Each quantized Linear `m` holds `m.weight` (E4M3) and `m.weight_scale`; a static activation scheme adds
    `m.input_scale`, which is dropped with the quantization. What compressed-tensors' decompression computes,
    `q.to(scale dtype) * scale` (in BF16 for MX, whose exponents it turns into BF16 powers of two), is the float32
    product rounded once to the scale's dtype: an E4M3 value (4 significant bits) times a scale (at most 24) is
    exact in float32. So it is the transformers reader's formula with these scales and blocks:

        block      `[b, b]` blocks, a last block cut short (`block_structure`)
        channel    `[1, cols]`: one scale per row
        tensor     the whole matrix
        group      `[1, group_size]`; MX groups hold `2 ** (byte - 127)`

    Raises (from the constructor):
        SourceError: a config this reader cannot read (another format, several groups, integer or asymmetric
            weights, a KV-cache scheme).
    """

    quant_method = "compressed-tensors"

    def __init__(self, qc: dict, where: str):
        from ..errors import SourceError

        self.where = where
        fmt = qc.get("format")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or len(groups) != 1:
            n = len(groups) if isinstance(groups, dict) else groups
            raise SourceError(f"{where}: quantization_config.config_groups holds {n!r} groups; only one FP8 "
                              "group can be dequantized")
        (self.group_name, group), = groups.items()
        fmt = group.get("format") or fmt if isinstance(group, dict) else fmt
        if fmt not in READ_FORMATS:
            raise SourceError(f"{where}: compressed-tensors format {fmt!r} cannot be dequantized by this tool (it "
                              f"reads {', '.join(READ_FORMATS)})")
        self.format = fmt
        weights = group.get("weights") or {}
        if (weights.get("num_bits"), weights.get("type")) != (8, "float") or not weights.get("symmetric", True):
            raise SourceError(f"{where}: compressed-tensors weights {weights!r}: only 8-bit symmetric float (FP8) "
                              "weights can be dequantized")
        if qc.get("kv_cache_scheme"):
            raise SourceError(f"{where}: quantization_config.kv_cache_scheme is set; a quantized KV cache "
                              "cannot be dequantized by this tool")
        self.strategy = weights.get("strategy")
        self.group_size = weights.get("group_size")
        self.block_structure = weights.get("block_structure")
        self.mx = fmt == MX_FORMAT
        if self.strategy == "block" and not (isinstance(self.block_structure, list) and len(self.block_structure) == 2
                                             and all(isinstance(b, int) and b > 0 for b in self.block_structure)):
            raise SourceError(f"{where}: block strategy with block_structure {self.block_structure!r}")
        if self.strategy == "group" and not (isinstance(self.group_size, int) and self.group_size > 0):
            raise SourceError(f"{where}: group strategy with group_size {self.group_size!r}")
        if self.strategy not in ("block", "channel", "tensor", "group"):
            raise SourceError(f"{where}: compressed-tensors weight strategy {self.strategy!r} cannot be dequantized "
                              "(it reads block, channel, tensor and group)")
        if self.mx and (self.strategy, self.group_size) != ("group", MX_GROUP):
            raise SourceError(f"{where}: {MX_FORMAT} with strategy {self.strategy!r} and group_size "
                              f"{self.group_size!r}: expected group and {MX_GROUP}")
        activations = group.get("input_activations") or {}
        self.static_activations = activations.get("dynamic") is False

    def describe(self) -> str:
        what = {"block": f"{'x'.join(map(str, self.block_structure or []))} blocks",
                "channel": "one scale per output channel", "tensor": "one scale per tensor",
                "group": f"one {'power-of-two (E8M0) ' if self.mx else ''}scale per {self.group_size} columns"}
        acts = ", static activation scales dropped" if self.static_activations else ""
        return f"compressed-tensors {self.group_name} ({self.format}), E4M3 weights, {what[self.strategy]}{acts}"

    values_text = "the values compressed-tensors computes when it decompresses the checkpoint"

    def scales_from_bytes(self, data, dtype: str):
        """A scale tensor's bytes as flat float32 values (numpy), as compressed-tensors widens them."""
        from .transformers_fp8 import decode_scale_bytes

        return decode_scale_bytes(data, dtype)

    @staticmethod
    def scale_name(weight) -> str:
        return weight.name + SCALE_SUFFIX

    def block_of(self, shape) -> tuple[int, int]:
        rows, cols = shape[-2:]
        return {"block": lambda: tuple(self.block_structure), "channel": lambda: (1, cols),
                "tensor": lambda: (rows, cols), "group": lambda: (1, self.group_size)}[self.strategy]()

    def dropped(self, tensors: dict) -> set[str]:
        """Tensors that go with the quantization: the static activation scales (`<module>.input_scale`) of
        quantized modules."""
        fp8 = {info.name.rpartition(".")[0] for info in tensors.values() if info.dtype == WEIGHT_DTYPE}
        return {name for name in tensors if name.endswith(".input_scale") and name.rpartition(".")[0] in fp8}

    def pair(self, tensors: dict, shard_of) -> dict:
        """Every E4M3 weight with its `weight_scale`, by weight name, in source order.

        Raises:
            SourceError: a weight without its scale, a scale without its weight, a scale of the wrong dtype or
                grid, an E4M3 tensor that is not a `*.weight`, a zero point (asymmetric weights).
        """
        from ..errors import SourceError
        from .transformers_fp8 import ScaledWeight

        pairs = {}
        scale_dtypes = ("U8",) if self.mx else FLOAT_SCALE_DTYPES
        for info in tensors.values():
            if info.name.endswith(".weight_zero_point"):
                raise SourceError(f"{shard_of(info)}: {info.name}: asymmetric weights (a zero point) cannot be "
                                  "dequantized")
            if info.dtype != WEIGHT_DTYPE:
                if info.dtype.startswith("F8_"):
                    raise SourceError(f"{shard_of(info)}: tensor {info.name} is {info.dtype}; this checkpoint's "
                                      f"weights are E4M3 ({WEIGHT_DTYPE})")
                continue
            where = shard_of(info)
            if len(info.shape) != 2 or not info.name.endswith(".weight"):
                raise SourceError(f"{where}: FP8 tensor {info.name} {list(info.shape)} is not a Linear weight "
                                  "(`<module>.weight`, 2-D)")
            scale = tensors.get(self.scale_name(info))
            if scale is None:
                raise SourceError(f"{where}: FP8 weight {info.name} has no scale {self.scale_name(info)} in the "
                                  "checkpoint")
            if scale.dtype not in scale_dtypes:
                raise SourceError(f"{shard_of(scale)}: scale {scale.name} is {scale.dtype}; expected one of "
                                  f"{', '.join(scale_dtypes)}")
            rows, cols = info.shape
            bm, bn = self.block_of(info.shape)
            grid = (-(-rows // bm), -(-cols // bn))
            shape = tuple(scale.shape)
            if shape != grid and not (self.strategy == "tensor" and shape == (1,)):
                raise SourceError(f"{shard_of(scale)}: scale {scale.name} has shape {list(scale.shape)}, but weight "
                                  f"{info.name} {list(info.shape)} in {bm}x{bn} blocks needs {list(grid)}")
            pairs[info.name] = ScaledWeight(info, scale, (bm, bn))
        scales = {p.scale.name for p in pairs.values()}
        for info in tensors.values():
            if info.name.endswith(".weight" + SCALE_SUFFIX) and info.name not in scales:
                raise SourceError(f"{shard_of(info)}: scale {info.name} belongs to no FP8 weight "
                                  f"({info.name[:-len(SCALE_SUFFIX)]} is missing or not {WEIGHT_DTYPE})")
        return pairs
