"""Reading transformers `fp8` checkpoints, whoever wrote them (`TransformersFP8Reader`): the config's block and
scale format, which tensors are FP8 weights and which their inverse scales, and the scales as float32, as
transformers' `Fp8Dequantize` reads them."""

from __future__ import annotations

import numpy as np

from ..errors import SourceError
from ..source import TensorInfo
from .transformers_fp8 import SCALE_DTYPES, SCALE_FORMATS, SCALE_SUFFIX, WEIGHT_DTYPE, ScaledWeight, decode_scale_bytes

class TransformersFP8Reader:
    """Reads the `quantization_config` and tensor names of a transformers `fp8` checkpoint.

    Raises (from the constructor):
        SourceError: a config this dialect cannot read (no block size, another FP8 format, static activations).
    """

    quant_method = "fp8"
    values_text = "the values transformers computes when it dequantizes the checkpoint on load"

    def __init__(self, qc: dict, where: str):
        self.where = where
        block = qc.get("weight_block_size")
        edges = isinstance(block, (list, tuple)) and len(block) == 2
        if not (edges and all(isinstance(b, int) and b > 0 for b in block)):
            raise SourceError(f"{where}: quantization_config.weight_block_size is {block!r}; only block-wise FP8 "
                              "(two positive block edges, e.g. [128, 128]) can be dequantized")
        self.block = (block[0], block[1])
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise SourceError(f"{where}: quantization_config.fmt is {fmt!r}; only e4m3 weights can be dequantized")
        self.scale_fmt = qc.get("scale_fmt") or "float"
        if self.scale_fmt not in SCALE_FORMATS:
            raise SourceError(f"{where}: quantization_config.scale_fmt is {self.scale_fmt!r}; expected float or ue8m0")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise SourceError(f"{where}: activation_scheme {qc.get('activation_scheme')!r}: only dynamic activation "
                              "scales can be dequantized (static ones store activation scales this tool does not drop)")

    def describe(self) -> str:
        bm, bn = self.block
        return f"transformers fp8, E4M3 weights, {bm}x{bn} blocks, {self.scale_fmt} scales"

    @staticmethod
    def scales_from_bytes(data, dtype: str) -> np.ndarray:
        """A scale tensor's bytes as flat float32 values, as transformers' `Fp8Dequantize` reads them."""
        return decode_scale_bytes(data, dtype)

    @staticmethod
    def dropped(tensors: dict) -> set[str]:
        """Tensors other than the scales that go with the quantization: none."""
        return set()

    @staticmethod
    def scale_name(weight: TensorInfo) -> str:
        """`a.b.weight` -> `a.b.weight_scale_inv` (a Linear); a fused expert tensor `t` -> `t_scale_inv`."""
        return weight.name + SCALE_SUFFIX

    def pair(self, tensors: dict[str, TensorInfo], shard_of) -> dict[str, ScaledWeight]:
        """Every E4M3 weight of the checkpoint with its scale tensor, by weight name, in source order.

        `shard_of(info)` names a tensor's file, for messages.

        Raises:
            SourceError: a weight without its scale, a scale without its weight, a scale of a dtype that is not a
                scale, or a scale grid that does not fit its weight and the config's block.
        """
        pairs: dict[str, ScaledWeight] = {}
        bm, bn = self.block
        for info in tensors.values():
            if info.dtype != WEIGHT_DTYPE:
                if info.dtype.startswith("F8_") and info.dtype != "F8_E8M0":
                    raise SourceError(f"{shard_of(info)}: tensor {info.name} is {info.dtype}; this checkpoint's "
                                      "weights are E4M3 (F8_E4M3)")
                continue
            where = shard_of(info)
            if len(info.shape) < 2:
                raise SourceError(f"{where}: FP8 tensor {info.name} is {len(info.shape)}-D; block scales need a matrix")
            *lead, rows, cols = info.shape
            grid = (*lead, -(-rows // bm), -(-cols // bn))
            scale = tensors.get(self.scale_name(info)) or renamed_scale(info, tensors, grid)
            if scale is None:
                raise SourceError(f"{where}: FP8 weight {info.name} has no scale {self.scale_name(info)} in the "
                                  "checkpoint")
            if scale.dtype not in SCALE_DTYPES:
                raise SourceError(f"{shard_of(scale)}: scale {scale.name} is {scale.dtype}; expected one of "
                                  f"{', '.join(SCALE_DTYPES)}")
            if tuple(scale.shape) != grid:
                raise SourceError(f"{shard_of(scale)}: scale {scale.name} has shape {list(scale.shape)}, but weight "
                                  f"{info.name} {list(info.shape)} in {bm}x{bn} blocks needs {list(grid)}")
            pairs[info.name] = ScaledWeight(info, scale, self.block)
        scales = {p.scale.name for p in pairs.values()}
        for info in tensors.values():
            if info.name.endswith(SCALE_SUFFIX) and info.name not in scales:
                raise SourceError(f"{shard_of(info)}: scale {info.name} belongs to no FP8 weight "
                                  f"({info.name[:-len(SCALE_SUFFIX)]} is missing or not {WEIGHT_DTYPE})")
        return pairs


def renamed_scale(weight: TensorInfo, tensors: dict[str, TensorInfo], grid: tuple[int, ...]) -> TensorInfo | None:
    """The scale of a fused expert tensor that transformers renames on load, saved under the loaded parameter's
    name (granitemoe: `block_sparse_moe.input_linear.weight` with `block_sparse_moe.experts.gate_up_proj_scale_inv`):
    the one scale under the weight's parent module that belongs to no stored tensor and has the weight's grid.
    None when there is no such scale, or more than one."""
    if len(weight.shape) < 3:
        return None
    parent = weight.name.rsplit(".", 2)[0] + "."
    found = [t for t in tensors.values() if t.name.startswith(parent) and t.name.endswith(SCALE_SUFFIX)
             and t.name[:-len(SCALE_SUFFIX)] not in tensors and tuple(t.shape) == grid]
    return found[0] if len(found) == 1 else None
