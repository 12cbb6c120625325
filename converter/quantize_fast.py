"""The quantization of every output dialect, fused into one pass per row of scales and compiled with numba.

Same bytes as each dialect's torch formula (`quantize.quantize_blocks`, `dialects.transformers_fp8.quantize_tiles`,
`dialects.compressed_tensors.quantize_ct` and `quantize_mx`), about 15x faster on a CPU. One kernel template, one
small function per scale rule:

    float   transformers' float32 inverse scales: multiply by RN(RN(1 / amax) * 448)
    ue8m0   transformers' power-of-two inverse scales (F8_E8M0): multiply by 2 ** -ceil(log2(inverse scale))
    ct      compressed-tensors' scale in the weight's dtype: divide by RN_dtype(amax / 448), rounded to the dtype
    mx      compressed-tensors' MXFP8: multiply by 2 ** (127 - e), e from the group maximum's bits

Per row of scales (a tile row of `rows` weight rows, or a single row), the maxima come from the integer bits
(|x| orders like its bits for finite floats: column maxima over the rows in the source's own 16-bit lanes, then
one reduction per scale), then each value is widened, scaled, clamped and rounded to E4M3 with integer arithmetic
in one loop. The loops index 1-D row views from 0, so that LLVM vectorizes the byte stores on AVX2 too (with
packs; AVX-512 has a narrowing store of its own). Rows of scales run in parallel threads with the GIL released.
Kernels are compiled per (rule, source width, rows and columns per scale), the block being a constant so that
the inner loops vectorize, and cached on disk (the first use of a variant compiles it, about 2 s). Without numba,
`available()` is False and callers use the torch formulas.

numba caches beside this file, else in `NUMBA_CACHE_DIR` or the user's cache folder. Where none of them can be
written (a read-only container, a shared install used by another user), the kernels are compiled for this process
only, with one warning on the `converter.quantize_fast` logger (the CLI prints it as a note): same bytes, 2 s more.
"""

from __future__ import annotations

import logging
import os

import numpy as np

# numba's OpenMP threads otherwise spin between kernel calls, waiting for the next one: on a conversion that was
# a third of all user CPU time, taken from the reading and writing threads. Set before numba loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

OK, NON_FINITE, SCALE_OVERFLOW = 0, 1, 2
FLOAT, UE8M0, CT, MX = "float", "ue8m0", "ct", "mx"

# Source dtypes whose arithmetic each rule reproduces. float and ue8m0 compute in float32, so an F16 source is
# widened (exactly) first; compressed-tensors computes in the weight's own dtype, and F16's rounding is not done
# here (such weights take the torch formula).
RULE_DTYPES = {FLOAT: ("BF16", "F16", "F32"), UE8M0: ("BF16", "F16", "F32"), CT: ("BF16", "F32"), MX: ("BF16", "F32")}

log = logging.getLogger(__name__)
_kernels: dict = {}  # (rule, shift, rows, cols, parallel) -> compiled kernel
# Below this many source bytes a stripe is quantized on the calling thread: starting the kernel's threads costs
# more than the work (tens of thousands of small expert weights spent most of their time waking threads)
PARALLEL_MIN_BYTES = 1 << 20
_uncached = False  # set once numba could not use any cache folder: later variants skip the attempt
_NO_AUX = np.zeros(1, np.uint32)


def available() -> bool:
    return numba is not None


def handles(rule: str, dtype: str) -> bool:
    """Whether the kernel of `rule` gives the dialect's bytes for a source of `dtype`."""
    return dtype in RULE_DTYPES[rule]


def scale_dtype(rule: str, dtype: str) -> np.dtype:
    """The element type of the scales a rule stores: float32, E8M0 bytes, or the BF16 / F32 scale's bits."""
    if rule == FLOAT or (rule == CT and dtype == "F32"):
        return np.dtype(np.float32)
    return np.dtype(np.uint16 if rule == CT else np.uint8)


u32 = np.uint32
ABS, INF_BITS, MIN_NORMAL_BITS, MANTISSA = u32(0x7FFFFFFF), u32(0x7F800000), u32(0x00800000), u32(0x7FFFFF)
ONE, MAX, NEG_MAX = np.float32(1.0), np.float32(448.0), np.float32(-448.0)
BF16_EPS_BITS = u32(0x3C000000)  # torch.finfo(torch.bfloat16).eps, 2**-7
F32_EPS = np.float32(2.0**-23)
# The E8M0 byte compressed-tensors stores for a group whose maximum rounds up to infinity (|w| >= 1.75 * 2**127):
# its scale is inf, and 127 + int32(log2(inf)) is 127 + INT_MIN on x86 (torch's float-to-int conversion there).
MX_INF_STORED = np.uint8(127)

if numba is not None:

    @intrinsic
    def _as_float(typingctx, bits):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.uint32), codegen

    @intrinsic
    def _as_bits(typingctx, value):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return types.uint32(types.float32), codegen

    # numba widens integer arithmetic to 64 bits; the explicit uint32 casts let LLVM keep 32-bit vector lanes.
    _inline = numba.njit(inline="always", error_model="numpy", boundscheck=False)

    @_inline
    def _e4m3(x):  # pragma: no cover - compiled
        """A float32 within [-448, 448] as its E4M3 byte, ties to even (torch's cast)."""
        u = _as_bits(x)
        a = u32(u & ABS)
        # round the 23-bit mantissa to 3 bits, ties to even; a carry moves into the exponent
        odd = u32(u32(a >> u32(20)) & u32(1))
        normal = u32(u32(u32(u32(a + u32(0x7FFFF)) + odd) >> u32(20)) - u32(960))  # 960: (127 - 7) << 3, the rebias
        sub = u32(np.int32(np.rint(abs(x) * np.float32(512.0))))  # E4M3 subnormals are multiples of 2**-9
        sign = u32(u32(u >> u32(24)) & u32(0x80))
        return np.uint8(u32(sign | (normal if a >= u32(0x3C800000) else sub)))  # 0x3C800000: 2**-6

    @_inline
    def _clamp(x):  # pragma: no cover - compiled
        return min(max(x, NEG_MAX), MAX)

    @_inline
    def _bf16(x):  # pragma: no cover - compiled
        """A finite float32 rounded to BF16, ties to even (torch's cast), as float32."""
        u = _as_bits(x)
        return _as_float(u32(u32(u32(u + u32(0x7FFF)) + u32(u32(u >> u32(16)) & u32(1))) & u32(0xFFFF0000)))

    @_inline
    def _pow2(biased):  # pragma: no cover - compiled
        """2 ** (biased - 127) for biased in [1, 254]."""
        return _as_float(u32(u32(biased) << u32(23)))

    # -- the element operations: a widened source value and its scale's factor -> the E4M3 byte

    @_inline
    def _times(x, f):  # pragma: no cover - compiled
        return _e4m3(_clamp(x * f))

    @_inline
    def _over(x, s):  # pragma: no cover - compiled
        return _e4m3(_clamp(x / s))

    @_inline
    def _over_bf16(x, s):  # pragma: no cover - compiled
        # torch divides BF16 in float32 and rounds the quotient to BF16 before the clamp and the cast (a product
        # with the reciprocal, corrected at the midpoints, measured slower than the division on AVX2)
        return _e4m3(_clamp(_bf16(x / s)))

    # -- the scale rules: the float32 bits of a finite amax -> (status, stored scale, factor for the element op)

    @_inline
    def _scale_float(amax_bits, aux):  # pragma: no cover - compiled
        amax = _as_float(amax_bits)
        s = (ONE / amax) * MAX if amax > 0 else ONE  # two roundings, as torch computes 448 / amax
        return (OK if np.isfinite(s) else SCALE_OVERFLOW), ONE / s, s

    @_inline
    def _scale_ue8m0(amax_bits, aux):  # pragma: no cover - compiled
        amax = _as_float(amax_bits)
        s = (ONE / amax) * MAX if amax > 0 else ONE
        inv = max(_as_bits(ONE / s), MIN_NORMAL_BITS)  # clamped to 2**-126 (an overflowed s gives 0)
        biased = u32(inv >> u32(23))
        # 2 ** ceil(log2(inv)): torch's float32 log2 returns a whole number for the first aux[biased] mantissas
        # above a power of two (the table `transformers_fp8.ue8m0_table` reads from torch), so ceil keeps it
        if u32(inv & MANTISSA) >= aux[biased]:
            biased += u32(1)
        return OK, np.uint8(biased), _pow2(u32(254) - biased)  # stored E8M0 byte, 1 / inv

    @_inline
    def _scale_ct_bf16(amax_bits, aux):  # pragma: no cover - compiled
        bits = _as_bits(_bf16(_as_float(amax_bits) / MAX))  # amax / bf16(448) in float32, then rounded to BF16
        if bits == 0:
            bits = BF16_EPS_BITS
        return OK, np.uint16(bits >> u32(16)), _as_float(bits)

    @_inline
    def _scale_ct_f32(amax_bits, aux):  # pragma: no cover - compiled
        s = _as_float(amax_bits) / MAX
        if s == 0:
            s = F32_EPS
        return OK, s, s

    @_inline
    def _mx(exponent):  # pragma: no cover - compiled
        """From the biased exponent of the rounded group maximum (0 for 0, 255 for inf)."""
        if exponent == u32(255):
            return OK, MX_INF_STORED, np.float32(0.0)  # w / inf: signed zeros
        e = max(np.int32(exponent) - np.int32(8), np.int32(0))  # clamp(127 + floor(log2 p) - 8, 0, 255)
        return OK, np.uint8(e), _pow2(u32(np.int32(254) - e))  # w / 2 ** (e - 127) == w * 2 ** (127 - e), exact

    @_inline
    def _scale_mx_bf16(amax_bits, aux):  # pragma: no cover - compiled
        # round_to_power_2 on the BF16 bits: a quarter of the exponent's step added, the mantissa dropped
        p = u32(u32(u32(amax_bits >> u32(16)) + u32(32)) & u32(0xFF80))
        return _mx(u32(p >> u32(7)))

    @_inline
    def _scale_mx_f32(amax_bits, aux):  # pragma: no cover - compiled
        p = u32(u32(amax_bits + u32(0x200000)) & u32(0xFF800000))
        return _mx(u32(p >> u32(23)))


# A rule's scale function and element operation, by number: the kernel's closure holds only numbers, because numba
# keys its disk cache on the closure's pickled contents, and a pickled jitted function is new in every process.
_RULE_IDS = {FLOAT: 0, UE8M0: 1, CT: 2, MX: 3}
TIMES, OVER, OVER_BF16 = 0, 1, 2


def _make_kernel(rule: str, shift: int, rows_per_scale: int, cols_per_scale: int, parallel: bool = True):
    """A kernel for sources whose element bits, shifted left by `shift`, are float32 bits (BF16: 16, F32: 0), with
    one scale per `rows_per_scale` x `cols_per_scale` (0: the whole row) of the weight; its rows of scales in
    parallel threads or, not `parallel`, one after the other (the same code: `prange` is then `range`)."""
    RULE = _RULE_IDS[rule]
    ELEMENT = (OVER_BF16 if shift == 16 else OVER) if rule == CT else TIMES
    BF16_SOURCE = shift == 16
    SHIFT, BR, BC = u32(shift), rows_per_scale, cols_per_scale
    SRC = np.uint16 if shift == 16 else np.uint32  # the source's element bits
    SRC_ABS = SRC(0x7FFF) if shift == 16 else SRC(0x7FFFFFFF)

    def kernel(bits, out, scales, aux):  # pragma: no cover - compiled
        rows, cols = bits.shape
        bc = BC if BC else cols
        tile_rows, tile_cols = (rows + BR - 1) // BR, cols // bc
        status = np.zeros(tile_rows, np.int8)
        for tr in numba.prange(tile_rows):
            first, end = tr * BR, min(rows, tr * BR + BR)
            # column maxima over the rows first (a plain element-wise max, in the source's own lane width), then
            # one short reduction per scale; a single row is its own
            col_max = bits[first]
            if BR > 1:
                col_max = np.zeros(cols, SRC)
                for r in range(first, end):
                    row = bits[r]
                    for c in range(cols):
                        col_max[c] = max(col_max[c], SRC(row[c] & SRC_ABS))
            factor = np.empty(tile_cols, np.float32)
            worst, flagged = u32(0), OK
            for t in range(tile_cols):
                m = SRC(0)
                stretch = col_max[t * bc:t * bc + bc]
                for c in range(bc):
                    v = SRC(stretch[c] & SRC_ABS)
                    m = v if v > m else m  # a select: LLVM vectorizes this reduction, not numba's max()
                amax_bits = u32(u32(m) << SHIFT)
                worst = amax_bits if amax_bits > worst else worst
                # computed for NaN and Inf too (harmless, and refused below): a branch out of this loop costs MX,
                # with its many short groups, half its speed. The rule is a constant: LLVM keeps only its branch.
                if RULE == 0:
                    st, stored_f32, f = _scale_float(amax_bits, aux)
                    scales[tr, t] = stored_f32
                elif RULE == 1:
                    st, stored_e8m0, f = _scale_ue8m0(amax_bits, aux)
                    scales[tr, t] = stored_e8m0
                elif RULE == 2 and BF16_SOURCE:
                    st, stored_bf16, f = _scale_ct_bf16(amax_bits, aux)
                    scales[tr, t] = stored_bf16
                elif RULE == 2:
                    st, stored_ct32, f = _scale_ct_f32(amax_bits, aux)
                    scales[tr, t] = stored_ct32
                elif BF16_SOURCE:
                    st, stored_mx, f = _scale_mx_bf16(amax_bits, aux)
                    scales[tr, t] = stored_mx
                else:
                    st, stored_mx32, f = _scale_mx_f32(amax_bits, aux)
                    scales[tr, t] = stored_mx32
                flagged = st if flagged == OK else flagged
                factor[t] = f
            status[tr] = NON_FINITE if worst >= INF_BITS else flagged
            if status[tr] != OK:
                continue
            for r in range(first, end):
                for t in range(tile_cols):
                    f = factor[t]
                    # one scale's stretch of a row as 1-D views indexed from 0: numba then emits no negative-index
                    # wrap-around per element, which kept AVX2 from storing the bytes as a vector
                    src, dst = bits[r, t * bc:t * bc + bc], out[r, t * bc:t * bc + bc]
                    for j in range(bc):
                        x = _as_float(u32(u32(src[j]) << SHIFT))
                        if ELEMENT == TIMES:
                            dst[j] = _times(x, f)
                        elif ELEMENT == OVER:
                            dst[j] = _over(x, f)
                        else:
                            dst[j] = _over_bf16(x, f)
        return status

    # One name per variant gives each its own on-disk cache index: variants sharing one index can be mixed up
    # when two processes compile at once.
    if rule == FLOAT and rows_per_scale == cols_per_scale:
        name = f"quantize_tiles_shift{shift}_block{rows_per_scale}"
    else:
        name = f"quantize_{rule}_shift{shift}_rows{rows_per_scale}_cols{cols_per_scale}"
    kernel.__qualname__ = kernel.__name__ = name + ("" if parallel else "_serial")
    kernel.parallel = parallel
    return kernel


def _compile(kernel, cache: bool):
    """A kernel compiled, in parallel threads unless it says otherwise (`parallel` False)."""
    return numba.njit(parallel=getattr(kernel, "parallel", True), nogil=True, cache=cache, boundscheck=False,
                      error_model="numpy")(kernel)


def _without_cache(why: str) -> None:
    global _uncached
    if not _uncached:
        log.warning(f"numba cannot cache its compiled kernels here ({why}); they are compiled for this run only "
                    "(about 2 s each; NUMBA_CACHE_DIR=<a writable folder> keeps them)")
    _uncached = True


def _kernel(key: tuple):
    if key not in _kernels:
        kernel = _make_kernel(*key)
        try:
            _kernels[key] = _compile(kernel, cache=not _uncached)
        except RuntimeError:  # numba's answer when no cache folder is writable; the decoration does nothing else
            _without_cache("neither the package folder, NUMBA_CACHE_DIR nor the user cache folder is writable")
            _kernels[key] = _compile(kernel, cache=False)
    return _kernels[key]


def _run(key: tuple, *args) -> np.ndarray:
    """The kernel's status per row of scales; a cache numba finds but cannot read or write is given up for the
    run."""
    try:
        return _kernel(key)(*args)
    except OSError as exc:  # the kernel does no I/O: numba failed to read or write its cache file
        if _uncached:
            raise
        _without_cache(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
        _kernels.clear()  # every variant compiled so far is tied to that cache
        return _kernel(key)(*args)


def quantize_rule_into(rule: str, raw: np.ndarray, dtype: str, out: np.ndarray, scales: np.ndarray,
                       rows_per_scale: int, cols_per_scale: int, aux: np.ndarray | None = None) -> tuple[int, int]:
    """Quantize a stripe given as raw little-endian bytes, by one dialect's scale rule.

    Args:
        rule (`str`): FLOAT, UE8M0, CT or MX (see the module's docstring).
        raw (`np.ndarray`): uint8 bytes of a (rows, cols) stripe of a dtype in `RULE_DTYPES[rule]`.
        dtype (`str`): "BF16", "F16" or "F32".
        out (`np.ndarray`): uint8 (rows, cols), C-contiguous; receives the E4M3 bytes.
        scales (`np.ndarray`): `scale_dtype(rule, dtype)`, (ceil(rows / rows_per_scale), cols / cols_per_scale);
            receives the scales as the dialect stores them.
        rows_per_scale, cols_per_scale (`int`): the rows and columns one scale covers (columns 0: the whole row);
            the last row of scales may cover fewer rows.
        aux (`np.ndarray`): uint32 table the rule reads (UE8M0: `transformers_fp8.ue8m0_table()`).

    Returns:
        `(status, row)`: `OK`, or `NON_FINITE` / `SCALE_OVERFLOW` with the first row of the first bad row of scales.
    """
    rows, cols = out.shape
    if not handles(rule, dtype):
        raise ValueError(f"the {rule} kernel cannot quantize {dtype}")
    if dtype == "BF16":
        bits, shift = raw.view(np.uint16).reshape(rows, cols), 16
    elif dtype == "F32":
        bits, shift = raw.view(np.uint32).reshape(rows, cols), 0
    else:  # F16, for rules computing in float32: widening F16 -> F32 is exact
        bits, shift = raw.view(np.float16).reshape(rows, cols).astype(np.float32).view(np.uint32), 0
    key = (rule, shift, rows_per_scale, cols_per_scale, raw.nbytes >= PARALLEL_MIN_BYTES)
    status = _run(key, bits, out, scales, _NO_AUX if aux is None else aux)
    bad = np.flatnonzero(status)
    if len(bad):
        return int(status[bad[0]]), int(bad[0]) * rows_per_scale
    return OK, 0


def quantize_into(raw: np.ndarray, dtype: str, out: np.ndarray, scale_inv: np.ndarray, block: int) -> tuple[int, int]:
    """transformers' float32-scale quantization (`quantize.quantize_blocks`) of a stripe given as raw bytes.

    Args:
        raw (`np.ndarray`): uint8 bytes of a (rows, cols) BF16, F16 or F32 stripe, rows a multiple of `block`.
        dtype (`str`): "BF16", "F16" or "F32".
        out (`np.ndarray`): uint8 (rows, cols), C-contiguous; receives the E4M3 bytes.
        scale_inv (`np.ndarray`): float32 (rows/block, cols/block); receives the inverse scales.
        block (`int`): tile edge.

    Returns:
        `(status, row)`: `OK`, or `NON_FINITE` / `SCALE_OVERFLOW` with the first row of the first bad tile row.
    """
    return quantize_rule_into(FLOAT, raw, dtype, out, scale_inv, block, block)
