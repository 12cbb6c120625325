"""The shard writer: header from the plan, then data strictly in plan order, nbytes checked."""

import pytest
import torch
from safetensors import safe_open

from converter.errors import WriteError
from converter.plan import COPY, ShardPlan, TensorPlan
from converter.write import ShardWriter, shard_header


def shard():
    return ShardPlan(
        "model-00001-of-00001.safetensors",
        (
            TensorPlan("a", "a", COPY, "BF16", (2, 3), "r"),
            TensorPlan("empty", "empty", COPY, "F32", (0,), "r"),
            TensorPlan("b", "b", COPY, "F32", (5,), "r"),
        ),
    )


def test_written_file_is_valid_safetensors(tmp_path):
    path = tmp_path / "s.safetensors"
    a = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    b = torch.linspace(0, 1, 5)
    writer = ShardWriter(path, shard())
    writer.open()
    writer.write("a", a.view(torch.uint8).numpy()[:1])  # in two pieces
    writer.write("a", a.view(torch.uint8).numpy()[1:])
    writer.write("b", b.numpy())
    writer.close()
    assert writer.state == "closed"
    header = shard_header(shard())
    assert len(header) % 8 == 0 and path.read_bytes()[: len(header)] == header
    with safe_open(path, "pt") as f:
        assert list(f.keys()) == ["a", "b", "empty"]
        assert torch.equal(f.get_tensor("a"), a) and torch.equal(f.get_tensor("b"), b)
        assert f.get_tensor("empty").shape == (0,)
        assert f.metadata() == {"format": "pt"}


def test_writes_outside_the_declared_bytes_are_refused(tmp_path):
    writer = ShardWriter(tmp_path / "s.safetensors", shard())
    with pytest.raises(WriteError, match="writer is 'new', expected 'open'"):
        writer.write("a", b"\0" * 12)
    writer.open()
    with pytest.raises(WriteError, match="c is not a tensor of this shard"):
        writer.write("c", b"\0")
    with pytest.raises(WriteError, match="a would take bytes up to 13, declared 12"):
        writer.write_at("a", 0, b"\0" * 13)
    with pytest.raises(WriteError, match="b would take bytes up to 21, declared 20"):
        writer.write_at("b", 19, b"\0\0")
    writer.write_at("a", 6, b"\1" * 6)
    with pytest.raises(WriteError, match="a written past its 12 declared bytes"):
        writer.write_at("a", 0, b"\0" * 7)
    writer.write_at("a", 0, b"\2" * 6)
    with pytest.raises(WriteError, match=r"closed before b was complete \(0 of 20 bytes\)"):
        writer.close()


def test_tensors_in_any_order_land_at_their_offsets(tmp_path):
    path = tmp_path / "s.safetensors"
    b = torch.linspace(0, 1, 5)
    a = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    writer = ShardWriter(path, shard())
    writer.open()
    writer.write_at("b", 8, b.numpy().view("uint8")[8:])  # second half first
    writer.write_at("a", 0, a.view(torch.uint8).numpy())
    writer.write_at("b", 0, b.numpy().view("uint8")[:8])
    writer.close()
    with safe_open(path, "pt") as f:
        assert torch.equal(f.get_tensor("a"), a) and torch.equal(f.get_tensor("b"), b)
