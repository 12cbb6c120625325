"""The shard writer: header from the plan, then data strictly in plan order, nbytes checked."""

import os

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


def test_large_writes_go_to_disk_behind_the_writer_and_leave_the_page_cache(tmp_path, monkeypatch):
    import converter.write as write

    calls, advice = [], []
    real_sync, real_advise = write._sync_file_range, os.posix_fadvise
    assert real_sync is not None  # Linux
    monkeypatch.setattr(write, "_sync_file_range", lambda fd, off, n, flags: calls.append((off, n, flags)) or
                        real_sync(fd, off, n, flags))
    monkeypatch.setattr(write.os, "posix_fadvise", lambda fd, off, n, how: advice.append((off, n, how)) or
                        real_advise(fd, off, n, how))
    monkeypatch.setattr(write, "WRITE_BEHIND_BYTES", 3 * 2**20)
    mib = 2**20
    plan = ShardPlan("s.safetensors", (TensorPlan("w", "w", COPY, "U8", (8 * mib,), "r"),
                                       TensorPlan("small", "small", COPY, "U8", (100,), "r")))
    writer = ShardWriter(tmp_path / "s.safetensors", plan)
    writer.open()
    pieces = [bytes([k]) * mib for k in range(8)]
    for k, piece in enumerate(pieces):
        writer.write_at("w", k * mib, piece)
    writer.write_at("small", 0, b"\1" * 100)  # too small to be worth a system call
    writer.close()
    base = len(shard_header(plan))
    assert [c for c in calls if c[2] == 2] == [(base + k * mib, mib, 2) for k in range(8)]  # writeback started
    assert [c for c in calls if c[2] == 7] == [(base + k * mib, mib, 7) for k in range(5)]  # waited, oldest first
    assert advice == [(base + k * mib, mib, os.POSIX_FADV_DONTNEED) for k in range(5)]
    data = (tmp_path / "s.safetensors").read_bytes()
    assert data[base:base + 8 * mib] == b"".join(pieces) and data[-100:] == b"\1" * 100
