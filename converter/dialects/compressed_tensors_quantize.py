"""compressed-tensors' weight quantization as llm-compressor 0.14 computes it, pure torch on whole weights:
`quantize_ct` (FP8_BLOCK blocks, FP8_DYNAMIC channels) and `quantize_mx` (MXFP8's power-of-two scale per 32
columns), with compressed-tensors' own rounding of a scale to a power of two."""

from __future__ import annotations

FP8_MAX = 448.0
MX_GROUP = 32  # input columns per MX scale


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
