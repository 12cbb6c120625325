"""Reading compressed-tensors FP8 checkpoints, whoever wrote them (`CompressedTensorsReader`): which tensors are
quantized weights and scales, what block a scale covers, and its scales as float32, for `dequantize` and for
conversions of an FP8 source."""

from __future__ import annotations

from .compressed_tensors import MX_FORMAT, MX_GROUP, SCALE_SUFFIX, WEIGHT_DTYPE

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
