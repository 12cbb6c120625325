"""The quantization of `quantize.py`, fused into one pass per tile row and compiled with numba.

Same bytes as `quantize_blocks` (and so as transformers), about 15x faster on a CPU: per stripe of 64 rows, the
tile amax comes from the integer bits (|x| orders like its bits for finite floats: column maxima over the tile row
in the source's own 16-bit lanes, then one reduction per tile), then each value is widened, scaled, clamped and
rounded to E4M3 with integer arithmetic in one loop. The loops index 1-D row views from 0, so that LLVM vectorizes
the byte stores on AVX2 too (with packs; AVX-512 has a narrowing store of its own). Tile rows run in parallel threads with
the GIL released. Kernels are compiled per (source width, block size), the block size being a constant so that
the inner loops vectorize, and cached on disk (the first use of a variant compiles it, about 2 s). Without numba, `available()` is False and callers use
`quantize_blocks`.

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

log = logging.getLogger(__name__)
_kernels: dict = {}  # (shift, block) -> compiled kernel
_uncached = False  # set once numba could not use any cache folder: later variants skip the attempt


def available() -> bool:
    return numba is not None


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


def _make_kernel(shift: int, block: int):
    """A kernel for sources whose element bits, shifted left by `shift`, are float32 bits (BF16: 16, F32: 0)."""
    u32 = np.uint32
    SHIFT, ABS, INF_BITS = u32(shift), u32(0x7FFFFFFF), u32(0x7F800000)
    E4M3_MIN_NORMAL = u32(0x3C800000)  # float32 bits of 2**-6
    HALF_ULP, ONE_BIT, MANTISSA_DROP, SIGN_SHIFT, SIGN = u32(0x7FFFF), u32(1), u32(20), u32(24), u32(0x80)
    REBIAS = u32(960)  # (127 - 7) << 3: float32 exponent bias to E4M3's, in the rounded 8-bit code
    ONE, MAX, NEG_MAX = np.float32(1.0), np.float32(448.0), np.float32(-448.0)
    SUBNORMAL_STEPS = np.float32(512.0)  # E4M3 subnormals are multiples of 2**-9
    B = block
    SRC = np.uint16 if shift == 16 else np.uint32  # the source's element bits
    SRC_ABS = SRC(0x7FFF) if shift == 16 else SRC(0x7FFFFFFF)

    # numba widens integer arithmetic to 64 bits; the explicit uint32 casts let LLVM keep 32-bit vector lanes.
    def kernel(bits, out, scale_inv):  # pragma: no cover - compiled
        rows, cols = bits.shape
        tile_rows, tile_cols = rows // B, cols // B
        status = np.zeros(tile_rows, np.int8)
        for tr in numba.prange(tile_rows):
            # column maxima over the tile row first (a plain element-wise max, in the source's own lane width),
            # then one short reduction per tile
            col_max = np.zeros(cols, SRC)
            for r in range(tr * B, tr * B + B):
                row = bits[r]
                for c in range(cols):
                    col_max[c] = max(col_max[c], SRC(row[c] & SRC_ABS))
            amax_bits = np.empty(tile_cols, np.uint32)
            for t in range(tile_cols):
                m = SRC(0)
                for c in range(t * B, t * B + B):
                    m = max(m, col_max[c])
                amax_bits[t] = u32(u32(m) << SHIFT)
            scale = np.empty(tile_cols, np.float32)
            for t in range(tile_cols):
                if amax_bits[t] >= INF_BITS:
                    status[tr] = NON_FINITE
                amax = _as_float(amax_bits[t])
                s = (ONE / amax) * MAX if amax > 0 else ONE  # two roundings, as torch computes 448 / amax
                if not np.isfinite(s) and status[tr] == OK:
                    status[tr] = SCALE_OVERFLOW
                scale[t] = s
                scale_inv[tr, t] = ONE / s
            if status[tr] != OK:
                continue
            for r in range(tr * B, tr * B + B):
                for t in range(tile_cols):
                    s = scale[t]
                    # one tile's row as 1-D views indexed from 0: numba then emits no negative-index wrap-around
                    # per element, which kept AVX2 from storing the bytes as a vector
                    src, dst = bits[r, t * B:t * B + B], out[r, t * B:t * B + B]
                    for j in range(B):
                        x = min(max(_as_float(u32(u32(src[j]) << SHIFT)) * s, NEG_MAX), MAX)
                        u = _as_bits(x)
                        a = u32(u & ABS)
                        # round the 23-bit mantissa to 3 bits, ties to even; a carry moves into the exponent
                        odd = u32(u32(a >> MANTISSA_DROP) & ONE_BIT)
                        normal = u32(u32(u32(u32(a + HALF_ULP) + odd) >> MANTISSA_DROP) - REBIAS)
                        sub = u32(np.int32(np.rint(abs(x) * SUBNORMAL_STEPS)))
                        sign = u32(u32(u >> SIGN_SHIFT) & SIGN)
                        dst[j] = np.uint8(u32(sign | (normal if a >= E4M3_MIN_NORMAL else sub)))
        return status

    # One name per variant gives each its own on-disk cache index: variants sharing one index can be mixed up
    # when two processes compile at once.
    kernel.__qualname__ = kernel.__name__ = f"quantize_tiles_shift{shift}_block{block}"
    return kernel


def _compile(kernel, cache: bool):
    return numba.njit(parallel=True, nogil=True, cache=cache, boundscheck=False, error_model="numpy")(kernel)


def _without_cache(why: str) -> None:
    global _uncached
    if not _uncached:
        log.warning(f"numba cannot cache its compiled kernels here ({why}); they are compiled for this run only "
                    "(about 2 s each; NUMBA_CACHE_DIR=<a writable folder> keeps them)")
    _uncached = True


def _kernel(shift: int, block: int):
    key = (shift, block)
    if key not in _kernels:
        kernel = _make_kernel(shift, block)
        try:
            _kernels[key] = _compile(kernel, cache=not _uncached)
        except RuntimeError:  # numba's answer when no cache folder is writable; the decoration does nothing else
            _without_cache("neither the package folder, NUMBA_CACHE_DIR nor the user cache folder is writable")
            _kernels[key] = _compile(kernel, cache=False)
    return _kernels[key]


def _run(shift: int, block: int, bits: np.ndarray, out: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """The kernel's status per tile row; a cache numba finds but cannot read or write is given up for the run."""
    try:
        return _kernel(shift, block)(bits, out, scale_inv)
    except OSError as exc:  # the kernel does no I/O: numba failed to read or write its cache file
        if _uncached:
            raise
        _without_cache(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
        _kernels.clear()  # every variant compiled so far is tied to that cache
        return _kernel(shift, block)(bits, out, scale_inv)


def quantize_into(raw: np.ndarray, dtype: str, out: np.ndarray, scale_inv: np.ndarray, block: int) -> tuple[int, int]:
    """Quantize a stripe given as raw little-endian bytes.

    Args:
        raw (`np.ndarray`): uint8 bytes of a (rows, cols) BF16, F16 or F32 stripe, rows a multiple of `block`.
        dtype (`str`): "BF16", "F16" or "F32".
        out (`np.ndarray`): uint8 (rows, cols), C-contiguous; receives the E4M3 bytes.
        scale_inv (`np.ndarray`): float32 (rows/block, cols/block); receives the inverse scales.
        block (`int`): tile edge.

    Returns:
        `(status, row)`: `OK`, or `NON_FINITE` / `SCALE_OVERFLOW` with the first row of the first bad tile row.
    """
    rows, cols = out.shape
    if dtype == "BF16":
        bits, shift = raw.view(np.uint16).reshape(rows, cols), 16
    elif dtype == "F32":
        bits, shift = raw.view(np.uint32).reshape(rows, cols), 0
    elif dtype == "F16":  # widening F16 -> F32 is exact
        bits, shift = raw.view(np.float16).reshape(rows, cols).astype(np.float32).view(np.uint32), 0
    else:
        raise ValueError(f"cannot quantize {dtype}")
    status = _run(shift, block, bits, out, scale_inv)
    bad = np.flatnonzero(status)
    if len(bad):
        return int(status[bad[0]]), int(bad[0]) * block
    return OK, 0
