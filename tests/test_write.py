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


def test_the_header_is_the_json_of_its_entries_byte_for_byte():
    """The header is formatted directly, not through json.dumps: the same bytes, names that need escaping too."""
    import json
    import struct

    from converter.write import data_order

    names = ["model.layers.0.mlp.experts.7.up_proj.weight", 'quote"back\\slash', "ünïcode.名前", "tab\tnew\nline"]
    plan = ShardPlan("s.safetensors", tuple(TensorPlan(n, n, COPY, "BF16", (4, 1024 * (k + 1)), "r")
                                            for k, n in enumerate(names)) + (TensorPlan("s", "s", COPY, "F32", (3,), "r"),))
    offsets, at = {}, 0
    for t in data_order(plan):
        offsets[t.name], at = [at, at + t.nbytes], at + t.nbytes
    want = {"__metadata__": {"format": "pt"}}
    want.update({t.name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": offsets[t.name]} for t in plan.tensors})
    header = shard_header(plan)
    (length,) = struct.unpack("<Q", header[:8])
    assert header[8:].rstrip(b" ") == json.dumps(want, separators=(",", ":")).encode()
    assert length == len(header) - 8 and len(header) % 4096 == 0
    empty = shard_header(ShardPlan("e.safetensors", ()))
    assert empty[8:].rstrip(b" ") == b'{"__metadata__":{"format":"pt"}}'


def test_the_index_is_jsons_indented_output_byte_for_byte():
    import json

    from converter.write import _index_json

    weight_map = {"b.weight": "model-00002-of-00002.safetensors", 'q"uote\\name': "model-00001-of-00002.safetensors",
                  "ünï.名前": "model-00001-of-00002.safetensors", "a.weight_scale_inv": "model-00001-of-00002.safetensors"}
    for names in (weight_map, {}):
        want = json.dumps({"metadata": {"total_size": 12345}, "weight_map": dict(sorted(names.items()))}, indent=2)
        assert _index_json(12345, names) == want + "\n"


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


def aligned_tile_rows(rows: int, cols: int, value: int):
    """A page-aligned uint8 buffer, as the quantize lane hands the writer a stripe of FP8 tile rows."""
    from converter.reader import aligned_buffer

    buf = aligned_buffer(rows * cols).reshape(rows, cols)
    buf[:] = value
    return buf


def mixed_shard():
    """A shard as a conversion plans it: FP8 weights of whole 64x64 tiles, each followed by its small scale,
    and a norm."""
    return ShardPlan("s.safetensors", (
        TensorPlan("norm", "norm", COPY, "BF16", (100,), "r"),
        TensorPlan("w1", "w1", COPY, "F8_E4M3", (512, 4096), "r"),
        TensorPlan("w1_scale_inv", "w1_scale_inv", COPY, "F32", (8, 64), "r"),
        TensorPlan("w2", "w2", COPY, "F8_E4M3", (256, 4096), "r"),
        TensorPlan("w2_scale_inv", "w2_scale_inv", COPY, "F32", (4, 64), "r"),
    ))


def test_tile_aligned_tensors_lie_first_at_page_boundaries_and_the_header_keeps_plan_order(tmp_path):
    import json
    import struct

    plan = mixed_shard()
    header = shard_header(plan)
    assert len(header) % 4096 == 0
    entries = json.loads(header[8:])
    entries.pop("__metadata__")
    assert list(entries) == ["norm", "w1", "w1_scale_inv", "w2", "w2_scale_inv"]  # the plan's order
    offsets = {name: e["data_offsets"] for name, e in entries.items()}
    # the 4 KiB-multiple tensors first (w1_scale_inv is 2048 bytes, norm 200), each then page-aligned in the file
    assert offsets["w1"] == [0, 2 * 2**20] and offsets["w2"] == [2 * 2**20, 3 * 2**20]
    mib = 2**20
    assert offsets["norm"] == [3 * mib, 3 * mib + 200]  # then the others, in plan order
    assert offsets["w1_scale_inv"] == [3 * mib + 200, 3 * mib + 2248]
    assert offsets["w2_scale_inv"] == [3 * mib + 2248, 3 * mib + 3272]
    path = tmp_path / "s.safetensors"
    writer = ShardWriter(path, plan)
    writer.open()
    values = {"norm": torch.arange(100, dtype=torch.bfloat16), "w1_scale_inv": torch.rand(8, 64),
              "w2_scale_inv": torch.rand(4, 64)}
    for name, t in values.items():
        writer.write_at(name, 0, t.view(torch.uint8).numpy())
    writer.write_at("w1", 0, aligned_tile_rows(256, 4096, 1))  # two stripes of four tile rows
    writer.write_at("w1", 2**20, aligned_tile_rows(256, 4096, 2))
    writer.write_at("w2", 0, aligned_tile_rows(256, 4096, 3))
    writer.close()
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + length) % 4096 == 0
    with safe_open(path, "pt") as f:  # safetensors' own reader: entries sorted by offset tile the data
        assert sorted(f.keys()) == sorted(entries)
        for name, t in values.items():
            assert torch.equal(f.get_tensor(name), t)
        w1 = f.get_tensor("w1").view(torch.uint8)
        assert (w1[:256] == 1).all() and (w1[256:] == 2).all() and (f.get_tensor("w2").view(torch.uint8) == 3).all()


def test_aligned_stripes_go_to_the_disk_directly_others_through_the_page_cache(tmp_path):
    """An aligned stripe is written with O_DIRECT: none of its pages is left in the page cache (a read that must
    not wait finds nothing); an unaligned write (a scale) is cached as usual."""
    plan = mixed_shard()
    path = tmp_path / "s.safetensors"
    writer = ShardWriter(path, plan)
    writer.open()
    writer.write_at("w1", 0, aligned_tile_rows(512, 4096, 7))
    writer.write_at("w1_scale_inv", 0, torch.ones(8, 64).numpy())
    if not writer.writes_direct:
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    base = len(shard_header(plan))
    probe = bytearray(4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):  # not in the page cache: it went to the disk
            os.preadv(fd, [probe], base, os.RWF_NOWAIT)
        assert os.preadv(fd, [probe], base + 3 * 2**20, os.RWF_NOWAIT) == 3272  # the scale's page is cached
    finally:
        os.close(fd)
    writer.abort()


def test_a_file_system_refusing_direct_writes_gets_the_same_bytes_through_the_page_cache(tmp_path, monkeypatch):
    import errno

    import converter.write as write

    def written(folder, refuse_at: str | None) -> bytes:
        real_open, real_pwrite = os.open, os.pwrite

        def refusing_open(path, flags, *a):
            if refuse_at == "open" and flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *a)

        def refusing_pwrite(fd, data, offset):
            if refuse_at == "write" and fd == writer._direct_fd and writer._direct_fd is not None:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(write.os, "open", refusing_open)
        monkeypatch.setattr(write.os, "pwrite", refusing_pwrite)
        folder.mkdir()
        writer = ShardWriter(folder / "s.safetensors", mixed_shard())
        writer.open()
        writer.write_at("w1", 0, aligned_tile_rows(512, 4096, 5))
        writer.write_at("w2", 0, aligned_tile_rows(256, 4096, 6))
        assert writer.writes_direct == (refuse_at is None)
        for name, shape in [("norm", (100,)), ("w1_scale_inv", (8, 64)), ("w2_scale_inv", (4, 64))]:
            writer.write_at(name, 0, torch.full(shape, 0.5).to(torch.float32 if "scale" in name else torch.bfloat16)
                            .view(torch.uint8).numpy())
        assert writer.state == "closed"  # by its last write
        monkeypatch.undo()
        return (folder / "s.safetensors").read_bytes()

    direct = written(tmp_path / "direct", None)
    assert written(tmp_path / "no-open", "open") == direct
    assert written(tmp_path / "no-write", "write") == direct
