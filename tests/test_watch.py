"""The driver's watcher interface (`watch.OutputWatcher`): what a destination beside the local folder is told of
the shards as they are written, and what it may refuse."""

import threading

import pytest

from converter.configs import STAGING_NAME, ConvertOptions
from converter.convert import convert
from converter.errors import ConvertError
from converter.watch import OutputWatcher

from .conftest import tree_digest


class Recording(OutputWatcher):
    """Follows every shard and records what it sees when each is complete."""

    follows_shards = True

    def __init__(self):
        self.closed: dict[str, int] = {}  # shard name -> its size on disk when announced
        self.lock = threading.Lock()

    def shard_closed(self, path, shard):
        with self.lock:
            assert shard.name not in self.closed, "announced twice"
            self.closed[shard.name] = path.stat().st_size


def _options(src, dst, **kw):
    return ConvertOptions(src=src, dst=dst, arch_check=False, max_shard_size=20 * 10**6, **kw)


def test_a_watcher_is_told_of_every_shard_once_complete_and_the_bytes_are_a_plain_runs(toy_src, toy_reference,
                                                                                      tmp_path):
    watcher = Recording()
    summary = convert(_options(toy_src, tmp_path / "out"), watcher=watcher)
    assert summary.finalized
    written = {p.name: p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors")}
    assert watcher.closed == written  # each shard whole when announced, and none left out
    assert len(written) == 2
    shards = {k: v for k, v in tree_digest(tmp_path / "out").items() if k.endswith(".safetensors")}
    assert shards == {k: v for k, v in tree_digest(toy_reference).items() if k.endswith(".safetensors")}


def test_a_watcher_that_refuses_a_write_stops_the_run_with_its_error_and_nothing_is_left(toy_src, tmp_path):
    class Refusing(OutputWatcher):
        holds_back_writes = True

        def may_write(self, name, stop):
            raise ConvertError(f"no room for {name}")

    with pytest.raises(ConvertError, match=r"^no room for model-0000\d-of-00002\.safetensors$"):
        convert(_options(toy_src, tmp_path / "out"), watcher=Refusing())
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / STAGING_NAME).exists()


def test_shards_a_watcher_holds_elsewhere_are_not_written(toy_src, tmp_path):
    class HoldsFirst(OutputWatcher):
        def resume(self, run, done, shards, staging):
            self.first = shards[0].name
            return {self.first}

        def all_written(self, staging, shards):
            assert self.first not in {s.name for s in shards}
            return {self.first}

    watcher = HoldsFirst()
    summary = convert(_options(toy_src, tmp_path / "out"), watcher=watcher)
    names = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert watcher.first not in names and len(names) == 1
    assert summary.finalized
