"""The two writing lanes: the first failure anywhere stops both at once; every copy path gives the same bytes."""

import errno
import shutil
import threading
import time

import pytest

from converter import arch, lanes, resume, write
from converter.errors import PlanError, QuantizeError, WriteError
from converter.stripes import Quantizer

from .conftest import run_cli, tree_digest


class Recorder:
    """Counts written pieces (each write of a shard writer), per lane, before and after a planted failure; each
    write takes `delay` s, so a run that does not stop would go on well past the failure."""

    def __init__(self, monkeypatch, delay: float):
        self.pieces, self.failed_at = [], None
        self.lock = threading.Lock()
        for method in ("write_at", "copy_at"):
            real = getattr(write.ShardWriter, method)

            def slow(writer, name, *args, _real=real, **kwargs):
                time.sleep(delay)
                _real(writer, name, *args, **kwargs)
                with self.lock:
                    self.pieces.append((name, self.failed_at is not None))

            monkeypatch.setattr(write.ShardWriter, method, slow)

    def fail(self, error: Exception):
        with self.lock:
            self.failed_at = len(self.pieces)
        raise error

    def after(self, lane: str) -> int:
        """Pieces of a lane ('copy' or 'fp8') recorded after the failure."""
        fp8 = lambda name: name.endswith(("proj.weight", "_scale_inv"))  # noqa: E731
        return sum(1 for name, late in self.pieces if late and fp8(name) == (lane == "fp8"))


def test_a_failing_cross_check_stops_both_lanes_within_a_piece(toy_src, tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch, delay=0.05)

    def failing_cross_check(plan):
        while len(recorder.pieces) < 2:  # fail once the writing is well under way
            time.sleep(0.005)
        recorder.fail(PlanError("model.layers.0.mlp.up_proj: transformers would keep it in BF16 (planted)"))

    dst = tmp_path / "out"
    # the placement before the plan (seconds the first time: transformers is imported) is cached by a dry run,
    # so that the time measured is the stop's
    assert run_cli("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--dry-run").exit_code == 0
    monkeypatch.setattr(arch, "cross_check", failing_cross_check)
    started = time.monotonic()
    result = run_cli("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1
    assert result.stderr == ("convert-fp8: error: model.layers.0.mlp.up_proj: transformers would keep it in BF16 "
                             "(planted)\n")
    assert recorder.after("copy") <= 1 and recorder.after("fp8") <= 2  # at most the piece each lane was writing
    assert len(recorder.pieces) < 10 < 3 * 8 + 4  # the whole run records 28 pieces
    assert elapsed < 3 and not dst.exists()


def test_a_failing_copy_lane_stops_the_quantize_lane(toy_src, tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch, delay=0.05)
    copy_at = write.ShardWriter.copy_at

    def failing_copy(writer, name, *args):
        if name == "model.layers.1.input_layernorm.weight":
            recorder.fail(WriteError(f"{writer.path}: planted failure while copying {name}"))
        return copy_at(writer, name, *args)

    monkeypatch.setattr(write.ShardWriter, "copy_at", failing_copy)
    dst = tmp_path / "out"
    result = run_cli("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    assert result.exit_code == 1
    assert "planted failure while copying model.layers.1.input_layernorm.weight" in result.stderr
    assert recorder.failed_at is not None and recorder.after("fp8") <= 2
    assert sum(1 for name, _ in recorder.pieces if name.endswith("proj.weight")) < 12  # of 12 FP8 weights
    assert not dst.exists()


def test_a_failing_quantize_lane_stops_the_copy_lane(toy_src, tmp_path, monkeypatch):
    # 64 KiB copy pieces: the 8 MiB embedding alone is 128 pieces, seconds of copying at 10 ms a piece
    monkeypatch.setattr(lanes, "COPY_BUFFER_BYTES", 2**16)
    monkeypatch.setattr(resume, "COPY_BUFFER_BYTES", 2**16)
    recorder = Recorder(monkeypatch, delay=0.01)
    stripes_of = Quantizer.stripes_of

    def failing_stripes(quantizer, weights, reader):
        while len(recorder.pieces) < 3:
            time.sleep(0.005)
        info = weights[0][0]
        recorder.fail(QuantizeError(f"tensor {info.name} in shard {info.shard} holds NaN or Inf (planted)"))
        yield from stripes_of(quantizer, weights, reader)

    monkeypatch.setattr(Quantizer, "stripes_of", failing_stripes)
    dst = tmp_path / "out"
    result = run_cli("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    assert result.exit_code == 1 and "holds NaN or Inf (planted)" in result.stderr
    assert recorder.after("copy") <= 1
    assert len(recorder.pieces) < 10  # of 128 + 3 copy pieces
    assert not dst.exists()


def test_disk_full_in_the_copy_lane(toy_src, tmp_path, monkeypatch):
    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write.os, "copy_file_range", no_space)
    monkeypatch.setattr(write.os, "sendfile", no_space)
    dst = tmp_path / "out"
    result = run_cli("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    assert result.exit_code == 1
    assert "disk full while copying model." in result.stderr and result.stderr.count("\n") == 1
    assert not dst.exists()


@pytest.mark.parametrize("available, expected_calls", [
    ({"copy_file_range": False, "sendfile": True}, {"sendfile"}),
    ({"copy_file_range": False, "sendfile": False}, set()),  # through a buffer: preadv, then pwrite
])
def test_every_copy_path_gives_the_same_bytes(toy_src, toy_reference, tmp_path, monkeypatch, available, expected_calls):
    calls = set()
    monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False)  # other files: shutil would call sendfile too
    for name in ("copy_file_range", "sendfile"):
        real = getattr(write.os, name)
        monkeypatch.setattr(write.os, name, lambda *args, _name=name, _real=real: calls.add(_name) or _real(*args))
        monkeypatch.setitem(write._in_kernel_copy, name, available[name])
    dst = tmp_path / "out"
    result = run_cli("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    assert result.exit_code == 0, result.output
    assert calls == expected_calls
    assert tree_digest(dst) == tree_digest(toy_reference)


def test_small_stripes_are_read_ahead_together_within_one_shard_and_the_group_bound():
    from types import SimpleNamespace

    from converter import stripes
    from converter.reader import DIRECT_ALIGN

    def item(shard, offset, nbytes):
        return (0, SimpleNamespace(shard=shard, offset=offset), 0, 1, nbytes, nbytes)

    small = 64 * 1024
    room = small + 2 * DIRECT_ALIGN
    per_group = stripes.READ_GROUP_BYTES // room
    scattered = ([item("a", 10 * small * k, small) for k in range(per_group + 2)]
                 + [item("b", 10 * small * k, small) for k in range(2)] + [item("b", 0, stripes.READ_GROUP_BYTES)])
    groups, largest = stripes._read_groups(scattered, spans=True)
    # apart in the file: a run each; the bound, then shard a's rest, shard b, the large one
    assert [len(g) for g in groups] == [per_group, 2, 2, 1]
    assert all(len(run) == 1 for g in groups for run in g)
    assert [i for g in groups for run in g for i in run] == list(range(len(scattered)))
    assert largest == stripes.READ_GROUP_BYTES + 2 * DIRECT_ALIGN

    # stripes that follow each other (with a norm's bytes between two): one read per group's span
    gap = stripes.READ_GAP_BYTES
    packed = [item("a", 0, small), item("a", small, small), item("a", 2 * small + gap, small),
              item("a", 5 * small + gap, small)]  # the last is past a gap larger than READ_GAP_BYTES
    groups, largest = stripes._read_groups(packed, spans=True)
    assert groups == [[[0, 1, 2], [3]]]
    assert largest == stripes._room(3 * small + gap) + room
    # a reader that reads each tensor on its own (an FP8 source decoded on the way): a run per stripe
    assert stripes._read_groups(packed, spans=False)[0] == [[[0], [1], [2], [3]]]
    # a run never grows past the group bound
    many = [item("a", k * small, small) for k in range(2 * per_group)]
    groups, largest = stripes._read_groups(many, spans=True)
    assert all(len(g) == 1 for g in groups) and largest <= stripes.READ_GROUP_BYTES
    assert [i for g in groups for run in g for i in run] == list(range(len(many)))
