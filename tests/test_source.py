"""Reading a source from its headers: order, offsets, and each kind of malformed input."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from converter.errors import SourceError
from converter.source import TensorReader, open_source, read_header


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
