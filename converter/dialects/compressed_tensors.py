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

from .compressed_tensors_quantize import MX_GROUP, quantize_ct, quantize_mx

WEIGHT_DTYPE = "F8_E4M3"
SCALE_SUFFIX = "_scale"
COMPRESSED_TENSORS_VERSION = "0.19.0"  # the version whose bytes and config this writes
SCHEME_NAMES = {"fp8-block": "FP8_BLOCK", "fp8-dynamic": "FP8_DYNAMIC"}
MX_SCHEME_NAMES = {"mxfp8": "MXFP8", "mxfp8a16": "MXFP8A16"}
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
