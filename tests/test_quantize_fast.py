"""The fused numba kernels: the same bytes as each dialect's torch formula (transformers' for the float-scale
default), on every finite BF16 value and on edge blocks."""

import logging

import numpy as np
import pytest
import torch

from converter import quantize_fast
from converter.configs import FP8Scheme
from converter.dialects import writer_for
from converter.quantize import quantize_blocks

from .conftest import run_cli, tiny_llama, tree_digest
from .test_quantize import TIES, reference, tie_tile, tie_tiles, torch_cast

pytestmark = pytest.mark.skipif(not quantize_fast.available(), reason="numba is not installed")


def fast(weight: torch.Tensor, block: int = 64):
    code = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[weight.dtype]
    raw = weight.contiguous().view(torch.uint8).numpy().reshape(-1)
    out = np.empty(weight.shape, np.uint8)
    scales = np.empty((weight.shape[0] // block, weight.shape[1] // block), np.float32)
    status = quantize_fast.quantize_into(raw, code, out, scales, block)
    return out, scales, status


def test_every_finite_bf16_value_in_every_position():
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = bits[torch.isfinite(bits)]
    values = values[values.float().abs() > 1e-30]  # tiles of only float32-subnormal amax are refused (tested below)
    for seed in range(3):
        order = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))
        n = len(values) // (64 * 256) * (64 * 256)
        w = values[order][:n].reshape(-1, 256)
        out, scales, status = fast(w)
        ref_fp8, ref_scale = reference(w, 64)
        assert status == (quantize_fast.OK, 0)
        assert np.array_equal(out, ref_fp8.view(torch.uint8).numpy())
        assert np.array_equal(scales.view(np.int32), ref_scale.numpy().view(np.int32))


@pytest.mark.parametrize("rule, rows, cols", [("float", 64, 64), ("ue8m0", 128, 128), ("ct", 128, 128),
                                               ("ct", 1, 0), ("mx", 1, 32)])
def test_small_stripes_run_on_the_calling_thread_with_the_same_bytes(monkeypatch, rule, rows, cols):
    """Below PARALLEL_MIN_BYTES a stripe runs through the kernel compiled without threads: the same bytes."""
    from converter.dialects.transformers_fp8 import ue8m0_table

    w = (torch.randn(384, 512, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    w[5, 7] = 300.0
    raw = w.view(torch.uint8).numpy().reshape(-1)
    aux = ue8m0_table() if rule == "ue8m0" else None
    results = []
    for threshold in (0, raw.nbytes + 1):  # every stripe parallel, then none
        monkeypatch.setattr(quantize_fast, "PARALLEL_MIN_BYTES", threshold)
        out = np.empty((384, 512), np.uint8)
        scales = np.empty((-(-384 // rows), 512 // (cols or 512)), quantize_fast.scale_dtype(rule, "BF16"))
        status = quantize_fast.quantize_rule_into(rule, raw, "BF16", out, scales, rows, cols, aux)
        results.append((status, out.tobytes(), scales.tobytes()))
    assert results[0] == results[1] and results[0][0] == (quantize_fast.OK, 0)
    assert {key[4] for key in quantize_fast._kernels if key[:4] == (rule, 16, rows, cols)} == {True, False}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("exponent", [-20, -6, 0, 6])
@pytest.mark.parametrize("block", [64, 128])
def test_edge_tiles_match_transformers(dtype, exponent, block):
    gen = torch.Generator().manual_seed(exponent + 100)
    w = torch.randn(256, 384, generator=gen) * 2.0 ** (exponent if dtype != torch.float16 else max(exponent, -6))
    w[:64, :64] = 0
    w[70, 300] = w.abs().max() * 50
    w = w.to(dtype)
    out, scales, status = fast(w, block)
    assert status == (quantize_fast.OK, 0)
    ref_fp8, ref_scale = quantize_blocks(w, block)
    assert np.array_equal(out, ref_fp8.view(torch.uint8).numpy())
    assert np.array_equal(scales, ref_scale.numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exact_ties_and_negative_zero_match_torchs_cast(dtype):
    w, counts = tie_tiles(dtype)
    assert min(counts) >= 4, counts
    out, scales, status = fast(w)
    assert status == (quantize_fast.OK, 0)
    assert np.array_equal(out, torch_cast(w).numpy())
    assert fast(tie_tile(dtype))[0][0, : len(TIES)].tolist() == list(TIES.values())
    zeros = torch.zeros(64, 128, dtype=dtype)
    zeros[:, 64:] = -0.0  # amax 0: scale 1, each value cast as it is
    zeros[3, 5] = -0.0
    out, scales, _ = fast(zeros)
    assert out[3, 5] == 0x80 and out[4, 5] == 0x00 and (out[:, 64:] == 0x80).all()
    assert np.array_equal(out, zeros.float().to(torch.float8_e4m3fn).view(torch.uint8).numpy())
    assert scales.tolist() == [[1.0, 1.0]]


def test_non_finite_and_overflowing_tiles_are_reported_with_their_row():
    w = torch.zeros(192, 128, dtype=torch.bfloat16)
    w[130, 5] = float("inf")
    assert fast(w)[2] == (quantize_fast.NON_FINITE, 128)
    w = torch.zeros(192, 128, dtype=torch.float32)
    w[70, 5] = 1e-39
    assert fast(w)[2] == (quantize_fast.SCALE_OVERFLOW, 64)


def test_numba_and_torch_quantizers_write_the_same_files(tmp_path):
    src = tiny_llama(tmp_path / "src")
    for kind in ("numba", "torch"):
        result = run_cli("--src", src, "--dst", tmp_path / kind, "--quantizer", kind)
        assert result.exit_code == 0, result.output
    assert tree_digest(tmp_path / "numba") == tree_digest(tmp_path / "torch")


@pytest.fixture
def fresh_kernels(monkeypatch):
    """No kernel compiled in this process yet, and none known to lack a cache (restored after the test)."""
    monkeypatch.setattr(quantize_fast, "_kernels", {})
    monkeypatch.setattr(quantize_fast, "_uncached", False)


def cache_notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "converter.quantize_fast"]


def test_without_a_writable_cache_folder_the_kernels_compile_for_the_run(fresh_kernels, monkeypatch, caplog):
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])  # as where no cache folder can be written
    w = (torch.randn(128, 192, generator=torch.Generator().manual_seed(11)) * 0.02).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="converter.quantize_fast"):
        out, scales, status = fast(w)
        again = fast(w)[0]
    assert status == (quantize_fast.OK, 0)
    ref_fp8, ref_scale = quantize_blocks(w, 64)
    assert np.array_equal(out, ref_fp8.view(torch.uint8).numpy()) and np.array_equal(scales, ref_scale.numpy())
    assert np.array_equal(again, out)
    notes = cache_notes(caplog)
    assert len(notes) == 1 and notes[0].startswith("numba cannot cache its compiled kernels here (neither the "
                                                   "package folder, NUMBA_CACHE_DIR nor the user cache folder")


def test_a_cache_file_that_cannot_be_written_compiles_for_the_run(fresh_kernels, monkeypatch, caplog):
    from numba.core import caching

    def refuse(self, key, data):
        raise PermissionError(13, "Permission denied", f"{self._cache_path}/{self._index_name}")

    monkeypatch.setattr(caching.IndexDataCacheFile, "load", lambda self, key: None)  # a miss: compile, then save
    monkeypatch.setattr(caching.IndexDataCacheFile, "save", refuse)  # an index another user owns, a full disk
    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(12)) * 3).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="converter.quantize_fast"):
        out, _, status = fast(w)
    assert status == (quantize_fast.OK, 0)
    assert np.array_equal(out, quantize_blocks(w, 64)[0].view(torch.uint8).numpy())
    notes = cache_notes(caplog)
    assert len(notes) == 1 and "quantize_tiles_shift16_block64" in notes[0] and "Permission denied" in notes[0]


def test_every_kernel_has_the_same_disk_cache_key_in_every_process():
    """numba keys its disk cache on the kernel's pickled closure: a jitted function in it pickles differently in
    every process, and each run would compile its kernel again (seconds, and 200 MiB of LLVM)."""
    import subprocess
    import sys

    script = ("import hashlib; from numba.core.serialize import dumps; from converter import quantize_fast as q; "
              "print([hashlib.sha256(dumps(tuple(c.cell_contents for c in q._make_kernel(*key).__closure__)))"
              ".hexdigest()[:12] for key in [('float', 16, 64, 64), ('ue8m0', 0, 128, 128), ('ct', 16, 128, 128), "
              "('ct', 0, 1, 0), ('mx', 16, 1, 32)]])")
    keys = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert keys[0] == keys[1] and keys[0].count("'") == 10


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_between_kernel_calls_unless_told_otherwise(given, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, "-c", "import os, converter.quantize_fast; "
                           "print(os.environ['OMP_WAIT_POLICY'])"], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == expected, done.stderr


# ---- Every dialect's kernel against its torch formula -----------------------------------------------------------

SCHEMES = {
    "fp8 float": FP8Scheme(64),
    "fp8 ue8m0": FP8Scheme(64, scale_fmt="ue8m0"),
    "compressed-tensors fp8-block": FP8Scheme(128, "compressed-tensors"),
    "compressed-tensors fp8-dynamic": FP8Scheme(128, "compressed-tensors", "fp8-dynamic"),
    "mxfp8": FP8Scheme(128, "compressed-tensors", "mxfp8"),
}
DIALECTS = list(SCHEMES)
CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def rule_fast(writer, weight: torch.Tensor):
    """(E4M3 bytes, scale bytes per row of scales, status) from the dialect's kernel, as the quantizer calls it."""
    kernel = writer.fused_kernel
    rows, cols = weight.shape
    out = np.empty((rows, cols), np.uint8)
    scales = np.empty((-(-rows // kernel.rows), cols // (kernel.cols or cols)),
                      quantize_fast.scale_dtype(kernel.rule, CODES[weight.dtype]))
    raw = weight.contiguous().view(torch.uint8).numpy().reshape(-1)
    status = quantize_fast.quantize_rule_into(kernel.rule, raw, CODES[weight.dtype], out, scales, kernel.rows,
                                              kernel.cols, kernel.aux)
    return out, scales.view(np.uint8), status


def formula(writer, weight: torch.Tensor):
    """(E4M3 bytes, scale bytes per row of scales) from the dialect's torch formula."""
    fp8, scales = writer.quantize(weight)
    return fp8.view(torch.uint8).numpy(), scales.contiguous().view(torch.uint8).numpy().reshape(scales.shape[0], -1)


def assert_kernel_is_formula(writer, weight: torch.Tensor):
    out, scales, status = rule_fast(writer, weight)
    ref_out, ref_scales = formula(writer, weight)
    assert status == (quantize_fast.OK, 0)
    assert np.array_equal(scales, ref_scales), np.argwhere(scales != ref_scales)[:3].tolist()
    assert np.array_equal(out, ref_out), np.argwhere(out != ref_out)[:3].tolist()
    return out, scales


def finite_bf16() -> torch.Tensor:
    """Every finite BF16 value (both zeros included), by magnitude, each positive value beside its negative."""
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = bits[torch.isfinite(bits)]
    return values[torch.sort(values.float().abs(), stable=True).indices]


def by_scale(writer, values: torch.Tensor, seed: int) -> torch.Tensor:
    """`values` laid out so that each scale's block, group or row holds values spanning 16 binades below its
    maximum (128 BF16 mantissas x 2 signs per binade): every value then lands in E4M3's range against its own
    scale, instead of flushing to zero beside a far larger one. Positions within a block are shuffled."""
    kernel = writer.fused_kernel
    cols = kernel.cols or 256
    n = kernel.rows * cols  # values per scale
    span = 16 * 256
    stride = max(1, span // n)
    runs = torch.cat([values[k::stride] for k in range(stride)])  # runs of `n` consecutive (strided) magnitudes
    per = min(n, span)
    runs = torch.cat([runs, torch.zeros((-len(runs)) % per, dtype=values.dtype)]).reshape(-1, per)
    blocks = runs.repeat(1, n // per)  # a 128x128 block holds its 16 binades 4 times
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.stack([b[torch.randperm(n, generator=gen)] for b in blocks])
    width = 2 if kernel.rows > 1 else 256 // cols  # blocks side by side in a row of scales
    blocks = torch.cat([blocks, torch.zeros((-len(blocks)) % width, n, dtype=values.dtype)])
    grid = blocks.reshape(-1, width, kernel.rows, cols).permute(0, 2, 1, 3)
    return grid.reshape(-1, width * cols).contiguous()


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_finite_bf16_value_against_its_own_scale(dialect):
    """Each value quantized against maxima 0 to 16 binades above it, and again with the blocks cut half a block
    later (other maxima): the kernel's E4M3 bytes and scales equal the dialect's torch formula's."""
    writer = writer_for(SCHEMES[dialect])
    values = finite_bf16()
    if dialect == "fp8 float":  # blocks whose maximum is float32-subnormal are refused there (tested below)
        values = values[(values.float().abs() > 1e-30) | (values == 0)]
    for seed, shift in ((0, 0), (1, len(values) // 7)):
        w = by_scale(writer, values.roll(shift), seed)
        out, _ = assert_kernel_is_formula(writer, w)
        assert (out & 0x7F != 0).sum() > len(values) * 0.9  # most values land in E4M3's range, not on zero


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_finite_bf16_value_in_every_position_every_dialect(dialect):
    writer = writer_for(SCHEMES[dialect])
    values = finite_bf16()
    values = values[values.float().abs() > 1e-30]
    for seed in range(2):
        order = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))
        n = len(values) // (128 * 256) * (128 * 256)
        assert_kernel_is_formula(writer, values[order][:n].reshape(-1, 256))


def edge_weight(dtype: torch.dtype, exponent: int, rows: int = 256) -> torch.Tensor:
    """Random values of size 2**exponent with the edges each scale rule handles on its own."""
    gen = torch.Generator().manual_seed(exponent + 300)
    w = torch.randn(rows, 384, generator=gen) * 2.0**exponent
    w[:128, :128] = 0  # an all-zero block, group and row
    w[130, :] = 0
    w[131, 5] = -0.0
    w[140, :128] = 2.0**exponent  # a maximum exactly a power of two
    w[141, :128] *= 1e-3
    w[141, 7] = 448 * 2.0**exponent * (1 - 2**-8)  # just below 448 * 2**k (a BF16 value)
    w[150, 256:] = w[150, 256:].sign() * 448 * 2.0**exponent
    w[200, 128:] = torch.randn(256, generator=gen) * 2.0**-130  # float32- and BF16-subnormal groups
    return w.to(dtype)


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_edge_blocks_match_the_formula(dialect, dtype):
    writer = writer_for(SCHEMES[dialect])
    if not quantize_fast.handles(writer.fused_kernel.rule, CODES[dtype]):
        pytest.skip(f"{dialect} computes in F16 there: the torch formula runs (tested below)")
    for exponent in ((-6, 0, 6) if dtype == torch.float16 else (-40, -6, 0, 6, 40)):
        w = edge_weight(dtype, exponent)
        if dialect == "fp8 float":
            w[200, 128:] = 1e-20  # a float32-subnormal block overflows there (refused, tested below)
        assert_kernel_is_formula(writer, w)
        if dialect == "compressed-tensors fp8-block":  # a last block row cut short, zero-padded for its maximum
            assert_kernel_is_formula(writer, w[:200])


def test_the_edges_give_each_rule_s_own_scales():
    """Concrete scales for an all-zero block, a power-of-two maximum and one just below 448 * 2**k."""
    w = torch.zeros(128, 128, dtype=torch.bfloat16)
    w[64, :64] = 2.0**3
    w[65, 64:] = 448 * 2.0**-2 * (1 - 2**-8)
    w[64:, 64:96] = 0  # an all-zero group of 32
    w[65, 100] = 0  # row 65's maximum stays in columns 96..127
    one, fp8_max = np.float32(1), np.float32(448)
    _, s, _ = rule_fast(writer_for(SCHEMES["fp8 float"]), w)
    assert s.view(np.float32).tolist() == [[1.0, 1.0], [one / 56, one / ((one / np.float32(111.5)) * fp8_max)]]
    _, s, _ = rule_fast(writer_for(SCHEMES["fp8 ue8m0"]), w)
    assert s.tolist() == [[127, 127], [127 + 3 - 8, 127 - 2]]  # 2**ceil(log2(max / 448)) as E8M0
    _, s, _ = rule_fast(writer_for(SCHEMES["compressed-tensors fp8-dynamic"]), w)
    scales = s.view(np.uint16)[:, 0]
    assert scales[0] == 0x3C00  # an all-zero row: BF16's eps, 2**-7
    assert scales[64] == 0x3C92  # RN_bf16(8 / 448) = 1.140625 * 2**-6
    assert scales[65] == 0x3E7F  # RN_bf16(111.5 / 448) = 1.9921875 * 2**-3
    out, s, _ = rule_fast(writer_for(SCHEMES["mxfp8"]), w)
    assert s[0].tolist() == [0, 0, 0, 0]  # all-zero groups: 2**-127, stored as 0
    assert s[64].tolist() == [127 + 3 - 8, 127 + 3 - 8, 0, 0]
    assert s[65].tolist() == [0, 0, 0, 127 + 6 - 8]  # 111.5 = 1.742 * 2**6 rounds down to 2**6 (1.75 rounds up)
    assert out[64, 0] == 0x78  # 8 / 2**-5 = 256 = 2**8, exactly


def test_non_finite_values_are_refused_where_the_formula_refuses_them():
    from converter.quantize import NonFiniteError

    for dialect in DIALECTS:
        writer = writer_for(SCHEMES[dialect])
        for bad in (float("inf"), float("-inf"), float("nan")):
            w = torch.zeros(256, 256, dtype=torch.bfloat16)
            w[130, 7] = bad
            with pytest.raises(NonFiniteError) as refused:
                writer.quantize(w)
            assert rule_fast(writer, w)[2] == (quantize_fast.NON_FINITE, refused.value.row)
            assert refused.value.row == (128 if writer.fused_kernel.rows > 1 else 130)


def test_mx_groups_that_round_up_to_infinity_store_what_the_formula_stores():
    """|w| >= 1.75 * 2**127 rounds up to inf: the formula's scale is inf, its weights signed zeros and its
    stored byte 127 (x86's int32 of inf, plus 127)."""
    w = torch.full((2, 64), 3.0e38, dtype=torch.bfloat16)
    w[1, :32] *= -1
    out, s = assert_kernel_is_formula(writer_for(SCHEMES["mxfp8"]), w)
    assert s.tolist() == [[127, 127], [127, 127]] and out[1, :32].tolist() == [0x80] * 32 and not out[0].any()


def test_ue8m0_table_reads_torch_s_log2():
    from converter.dialects.transformers_fp8 import ue8m0_table

    table = ue8m0_table()
    assert table[0] == 0 and table[255] == 0 and table[1:255].min() >= 1 and table.max() <= 64
    k = 127 + 100  # 2**100 (1 + m * 2**-23) for m below the table's count keeps 2**100 through torch's formula
    bits = torch.tensor([(k << 23) + int(table[k]) - 1, (k << 23) + int(table[k])], dtype=torch.int32)
    got = torch.pow(2.0, torch.ceil(torch.log2(bits.view(torch.float32))))
    assert got.tolist() == [2.0**100, 2.0**101]


def test_the_ue8m0_table_is_kept_so_that_later_runs_load_no_torch(tmp_path):
    import os
    import subprocess
    import sys

    script = ("import sys; from converter.dialects.transformers_fp8 import TransformersFP8Writer, ue8m0_table; "
              "assert TransformersFP8Writer(64, 'ue8m0').unavailable() is None; "
              "print(ue8m0_table().tolist(), 'torch' in sys.modules)")
    env = dict(os.environ, CONVERT_FP8_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
            .stdout.split("] ") for _ in range(2)]
    assert [loaded for _, loaded in runs] == ["True\n", "False\n"]  # read from torch once, then from the file
    assert runs[0][0] == runs[1][0] and runs[0][0].startswith("[0, ")
    kept, = tmp_path.glob("ue8m0-log2-*.npy")
    kept.write_bytes(b"not a table")  # a damaged file is read from torch again
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert again.stdout.split("] ") == [runs[0][0], "True\n"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_numba_and_torch_quantizers_write_the_same_files_in_every_dialect(tmp_path, dialect):
    scheme = SCHEMES[dialect]
    args = ["--scale-fmt", "ue8m0"] if scheme.scale_fmt == "ue8m0" else []
    if scheme.format == "compressed-tensors":
        args = ["--format", "compressed-tensors", "--scheme", scheme.scheme]
    src = tiny_llama(tmp_path / "src", intermediate_size=256)
    for kind in ("numba", "torch"):
        result = run_cli("--src", src, "--dst", tmp_path / kind, "--quantizer", kind, *args)
        assert result.exit_code == 0, result.output
    assert tree_digest(tmp_path / "numba") == tree_digest(tmp_path / "torch")


def test_f16_weights_take_the_formula_where_the_dialect_computes_in_f16(tmp_path):
    """compressed-tensors divides an F16 weight in F16, which no kernel computes: the quantizer runs the torch
    formula for those stripes, even with --quantizer numba, and writes the formula's bytes."""
    src = tiny_llama(tmp_path / "src", dtype=torch.float16, intermediate_size=256)
    args = ["--format", "compressed-tensors"]
    for kind in ("numba", "torch"):
        result = run_cli("--src", src, "--dst", tmp_path / kind, "--quantizer", kind, *args)
        assert result.exit_code == 0, result.output
    assert tree_digest(tmp_path / "numba") == tree_digest(tmp_path / "torch")
