"""Reading a source from its headers: order, offsets, and each kind of malformed input."""

import errno
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from converter.errors import SourceError
from converter.source import open_source, read_header
from converter.reader import DIRECT_ALIGN, TensorReader, adjacent_runs, aligned_buffer


def test_headers_give_offsets_that_read_the_right_bytes(gemma_src):
    source = open_source(gemma_src)
    assert len(source.shards) == 23 and len(source.tensors) == 87
    name = "model.language_model.layers.0.mlp.gate_proj.weight"
    info = source.tensors[name]
    assert (info.dtype, info.shape, info.nbytes) == ("BF16", (256, 128), 256 * 128 * 2)
    from safetensors import safe_open

    with safe_open(gemma_src / info.shard, "pt") as f:
        expected = f.get_tensor(name)
    with TensorReader(source) as reader:
        assert torch.equal(reader.read_rows(info, 64, 192), expected[64:192])
        assert bytes(reader.read(info)) == expected.view(torch.uint8).numpy().tobytes()
    assert "tokenizer.json" in source.files_to_copy and "1_Pooling/config.json" in source.files_to_copy
    assert ("README.md", "replaced by the FP8 model card") in source.files_skipped


def test_single_file_checkpoint_without_index(tmp_path):
    save_file({"a.weight": torch.zeros(64, 64, dtype=torch.bfloat16)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    source = open_source(tmp_path)
    assert source.shards == ("model.safetensors",) and list(source.tensors) == ["a.weight"]


def write_raw(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 10**9) + b"{}", "corrupt header: its length field says 1000000000 bytes"),
        (struct.pack("<Q", 5) + b"{nope", "corrupt header: not valid JSON"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(SourceError, match=message):
        read_header(path)


def test_truncated_data_is_found_from_the_header(tmp_path):
    header = json.dumps({"w": {"dtype": "BF16", "shape": [64, 64], "data_offsets": [0, 8192]}}).encode()
    write_raw(tmp_path / "t.safetensors", header, b"\0" * 100)
    size, end = 8 + len(header) + 100, 8 + len(header) + 8192
    with pytest.raises(SourceError, match=rf"truncated: {size} bytes on disk, but tensor 'w' ends at byte {end}"):
        read_header(tmp_path / "t.safetensors")


def test_offsets_that_disagree_with_the_shape(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    write_raw(tmp_path / "t.safetensors", header, b"\0" * 8)
    with pytest.raises(SourceError, match=r"'w' is F32\[4\] \(16 bytes\) but spans 8"):
        read_header(tmp_path / "t.safetensors")


def test_missing_things(tmp_path):
    with pytest.raises(SourceError, match="source folder not found"):
        open_source(tmp_path / "nothing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="not a safetensors checkpoint"):
        open_source(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(SourceError, match="names shard 'gone.safetensors'"):
        open_source(tmp_path)


def test_weight_copies_at_any_depth_are_skipped():
    from converter.source import classify_files

    files = ["README.md", "tokenizer.json", "1_Pooling/config.json", "original/params.json",
             "original/tokenizer.model", "original/consolidated.00.pth", "original/consolidated.01.pth",
             "onnx/model.onnx", "onnx/model.onnx_data", "2_Dense/model.safetensors", "gguf/model-Q4_K_M.gguf",
             "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "old/model.safetensors.index.json",
             "tf_model.h5", "training_args.bin", "model-00001-of-00001.safetensors"]
    copy, skipped = classify_files(files, {"model-00001-of-00001.safetensors"})
    assert copy == ["tokenizer.json", "1_Pooling/config.json", "original/params.json", "original/tokenizer.model"]
    assert dict(skipped) == {
        "README.md": "replaced by the FP8 model card",
        "original/consolidated.00.pth": "another copy of the unquantized weights",
        "original/consolidated.01.pth": "another copy of the unquantized weights",
        "onnx/model.onnx": "another copy of the unquantized weights",
        "onnx/model.onnx_data": "another copy of the unquantized weights",
        "2_Dense/model.safetensors": "another copy of the unquantized weights",
        "gguf/model-Q4_K_M.gguf": "another copy of the unquantized weights",
        "pytorch_model-00001-of-00002.bin": "another copy of the unquantized weights",
        "pytorch_model.bin.index.json": "the index of weights that are not copied",
        "old/model.safetensors.index.json": "the index of weights that are not copied",
        "tf_model.h5": "another copy of the unquantized weights",
        "training_args.bin": "another copy of the unquantized weights",
    }


def test_dry_run_lists_the_nested_weight_copies_it_skips(gemma_copy, tmp_path):
    from .conftest import run_cli, tree_digest

    (gemma_copy / "original").mkdir()
    (gemma_copy / "original" / "consolidated.00.pth").write_bytes(b"\0" * 1000)
    (gemma_copy / "original" / "params.json").write_text("{}")
    result = run_cli("--src", gemma_copy, "--dst", tmp_path / "out", "--dry-run", "--no-arch-check")
    assert result.exit_code == 0, result.output
    assert "not copied: original/consolidated.00.pth (another copy of the unquantized weights)" in result.output
    assert "not copied: original/params.json" not in result.output
    result = run_cli("--src", gemma_copy, "--dst", tmp_path / "out", "--no-arch-check")
    assert result.exit_code == 0, result.output
    written = tree_digest(tmp_path / "out")
    assert "original/params.json" in written and "original/consolidated.00.pth" not in written


@pytest.fixture
def linked_src(tmp_path):
    """A one-shard checkpoint plus a file that only its links point at."""
    src = tmp_path / "src"
    src.mkdir()
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"a.weight": weight}, src / "model.safetensors")
    (src / "config.json").write_text("{}")
    (tmp_path / "secret").write_text("private key\n")
    return src


def test_a_link_out_of_the_source_is_refused_unless_allowed(linked_src, tmp_path):
    os.symlink(tmp_path / "secret", linked_src / "tokenizer.model")
    with pytest.raises(SourceError) as caught:
        open_source(linked_src)
    assert str(caught.value) == (
        f"{linked_src / 'tokenizer.model'}: a link to {tmp_path / 'secret'}, outside the source folder: refusing to "
        "copy it into the output (replace the link by the file, or pass --allow-external-links)")
    assert open_source(linked_src, allow_external_links=True).files_to_copy == ("tokenizer.model",)


def test_a_folder_link_out_of_the_source_is_refused_by_its_name(linked_src, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "id_rsa").write_text("private key\n")
    os.symlink("../elsewhere", linked_src / "extras")
    with pytest.raises(SourceError, match=r"/src/extras: a link to \.\./elsewhere, outside the source folder"):
        open_source(linked_src)
    assert open_source(linked_src, allow_external_links=True).files_to_copy == ("extras/id_rsa",)


def test_links_inside_the_source_and_loops_are_fine(linked_src):
    (linked_src / "tok").mkdir()
    (linked_src / "tok" / "tokenizer.json").write_text("{}")
    os.symlink("tok/tokenizer.json", linked_src / "tokenizer.json")
    os.symlink("..", linked_src / "tok" / "up")  # a loop: walked once, not forever
    source = open_source(linked_src)
    assert source.files_to_copy == ("tokenizer.json", "tok/tokenizer.json")


def test_a_broken_link_is_named(linked_src):
    os.symlink("gone.json", linked_src / "tokenizer.json")
    with pytest.raises(SourceError, match=r"/src/tokenizer.json: a link to gone.json, which does not exist$"):
        open_source(linked_src)


def test_a_hugging_face_cache_snapshot_is_a_source_as_it_is(linked_src, tmp_path):
    from .test_resume import hub_cache

    (linked_src / "tokenizer.json").write_text("{}")
    cache = hub_cache(tmp_path / "hub", "acme/toy", linked_src)
    snapshot = next((cache / "models--acme--toy" / "snapshots").iterdir())
    assert (snapshot / "tokenizer.json").is_symlink()
    source = open_source(snapshot)
    assert source.files_to_copy == ("tokenizer.json",) and list(source.tensors) == ["a.weight"]


def test_the_cli_flag_allows_a_link_out_of_the_source(linked_src, tmp_path):
    from .conftest import run_cli

    os.symlink(tmp_path / "secret", linked_src / "tokenizer.model")
    result = run_cli("--src", linked_src, "--dst", tmp_path / "out", "--no-arch-check")
    assert result.exit_code == 1 and "outside the source folder: refusing to copy it" in result.stderr
    assert not (tmp_path / "out").exists()
    result = run_cli("--src", linked_src, "--dst", tmp_path / "out", "--no-arch-check", "--allow-external-links")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "tokenizer.model").read_text() == "private key\n"


def test_verify_reads_a_source_with_an_allowed_link(linked_src, tmp_path):
    from .conftest import run_cli

    os.symlink(tmp_path / "secret", linked_src / "tokenizer.model")
    result = run_cli("--src", linked_src, "--dst", tmp_path / "out", "--no-arch-check", "--allow-external-links")
    assert result.exit_code == 0, result.output
    result = run_cli("verify", "--src", linked_src, "--dst", tmp_path / "out", "--no-arch-check", "-q")
    assert result.exit_code == 0, result.output
    assert "problem:" not in result.output


@pytest.fixture
def stripe_source(tmp_path):
    """One shard whose tensor starts at an odd, unaligned offset, with bytes that tell every position apart."""
    data = (torch.arange(3 * 4096 * 7, dtype=torch.int64) * 2654435761 % 65521).to(torch.int16)
    path = tmp_path / "src"
    path.mkdir()
    save_file({"w.weight": data.view(torch.bfloat16).reshape(21, 4096)}, path / "model.safetensors",
              metadata={"pad": "x" * 13})
    (path / "config.json").write_text("{}")
    source = open_source(path)
    info = source.tensors["w.weight"]
    assert info.offset % 4096 != 0
    return source, info, (path / "model.safetensors").read_bytes()[info.offset:info.offset + info.nbytes]


def _drop_from_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("cached", ["none", "all", "head"])
def test_read_stripe_gives_the_bytes_whether_cached_or_not(stripe_source, cached):
    source, info, expected = stripe_source
    path = source.root / info.shard
    _drop_from_cache(path)
    if cached == "all":
        path.read_bytes()
    elif cached == "head":  # the page cache holds the start of the range, O_DIRECT reads the rest
        with open(path, "rb") as f:
            f.seek(info.offset)
            f.read(20000)
    buffer = aligned_buffer(len(expected) + 2 * DIRECT_ALIGN)
    with TensorReader(source) as reader:
        for start, length in [(0, len(expected)), (5 * 8192 + 2, 3 * 8192 + 6), (len(expected) - 10, 10)]:
            view = reader.read_stripe(info, start, length, buffer)
            assert bytes(view) == expected[start:start + length]


def test_read_stripe_without_o_direct_reads_through_the_page_cache(stripe_source, monkeypatch):
    source, info, expected = stripe_source
    _drop_from_cache(source.root / info.shard)
    real_open = os.open

    def refusing_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_direct)
    buffer = aligned_buffer(len(expected) + 2 * DIRECT_ALIGN)
    with TensorReader(source) as reader:
        assert bytes(reader.read_stripe(info, 100, 40000, buffer)) == expected[100:40100]


def test_read_stripe_of_a_shard_cut_short_names_it(stripe_source):
    source, info, expected = stripe_source
    path = source.root / info.shard
    with open(path, "r+b") as f:
        f.truncate(info.offset + 50000)
    _drop_from_cache(path)
    buffer = aligned_buffer(len(expected) + 2 * DIRECT_ALIGN)
    with TensorReader(source) as reader, pytest.raises(SourceError, match=r"model.safetensors: truncated while "
                                                                          r"reading w.weight$"):
        reader.read_stripe(info, 40000, 30000, buffer)


def test_adjacent_runs_join_what_one_read_covers():
    ranges = [("a", 0, 10), ("a", 10, 20), ("a", 25, 30), ("a", 40, 41), ("b", 41, 50), ("b", 50, 200),
              ("b", 200, 210), ("b", 205, 215)]
    runs = adjacent_runs(ranges, lambda r: r, max_gap=5, max_bytes=100)
    # a gap of 5 is read through, of 10 not; another file, a run past 100 bytes or an overlap starts a new run
    assert runs == [[("a", 0, 10), ("a", 10, 20), ("a", 25, 30)], [("a", 40, 41)], [("b", 41, 50)],
                    [("b", 50, 200)], [("b", 200, 210)], [("b", 205, 215)]]
    assert adjacent_runs(ranges[:2], lambda r: r, 0, 100, joins=lambda last, r: False) == [[ranges[0]], [ranges[1]]]
