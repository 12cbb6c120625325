"""Long runs: resume after SIGKILL, refusal of another run's leftovers, partitioned runs, Hub sources."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from converter.manifest import BOOT_ID, Manifest

from .conftest import run_cli, tree_digest

HERE = Path(__file__).parent


def killed_run(*args, mode=("pieces", "17")):
    env = dict(os.environ, CONVERT_FP8_NO_PROGRESS="1")
    done = subprocess.run([sys.executable, str(HERE / "kill_after.py"), *mode, *map(str, args)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-2000:])


def test_sigkill_then_same_command_gives_the_same_bytes(toy_src, toy_reference, tmp_path):
    dst = tmp_path / "out"
    args = ("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    killed_run(*args)
    staging = dst / ".convert-fp8.partial"
    recorded = Manifest(staging / "manifest-part-1-of-1.jsonl").load()
    assert len(recorded) == 17 and not (dst / "config.json").exists()
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "resumed: kept" in result.output
    assert tree_digest(dst) == tree_digest(toy_reference)
    assert not staging.exists()


def test_a_damaged_piece_is_written_again(toy_src, toy_reference, tmp_path):
    dst = tmp_path / "out"
    args = ("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    killed_run(*args, mode=("pieces", "12"))
    staging = dst / ".convert-fp8.partial"
    piece = next(iter(Manifest(staging / "manifest-part-1-of-1.jsonl").load().values()))
    from converter.source import read_header

    info = read_header(staging / piece.shard).tensors[piece.tensor]
    with open(staging / piece.shard, "r+b") as f:  # as if the page never reached the disk
        f.seek(info.offset + piece.start)
        f.write(b"\0" * min(piece.length, 4096))
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert tree_digest(dst) == tree_digest(toy_reference)


def test_damage_in_the_middle_of_a_piece_is_found_and_written_again(toy_src, toy_reference, tmp_path):
    """A rerun on the same boot reads back every byte of each piece it keeps: the middle MiB of a 4 MiB FP8 stripe
    zeroed (as a write-back that failed leaves it) is written again, not kept."""
    dst = tmp_path / "out"
    args = ("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    killed_run(*args, mode=("pieces", "12"))
    staging = dst / ".convert-fp8.partial"
    pieces = Manifest(staging / "manifest-part-1-of-1.jsonl").load()
    stripes = [p for p in pieces.values() if p.tensor.endswith("_proj.weight")
               and (p.shard, p.tensor + "_scale_inv", 0) in pieces]  # whole stripes, which a rerun may keep
    piece = max(stripes, key=lambda p: p.length)
    assert piece.length >= 2 * 2**20
    from converter.source import read_header

    info = read_header(staging / piece.shard).tensors[piece.tensor]
    middle = info.offset + piece.start + piece.length // 2 - 2**19
    with open(staging / piece.shard, "r+b") as f:
        f.seek(middle)
        f.write(b"\0" * 2**20)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert tree_digest(dst) == tree_digest(toy_reference)


def test_pieces_of_an_earlier_version_manifest_are_read_and_checked_in_full(toy_src, toy_reference, tmp_path):
    """Manifests written before every byte was checked carry a sampled CRC and a boot id: still read, and kept
    only when every byte matches."""
    dst = tmp_path / "out"
    args = ("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    killed_run(*args, mode=("pieces", "12"))
    manifest = dst / ".convert-fp8.partial" / "manifest-part-1-of-1.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps(dict(line, sample=0, boot=BOOT_ID)) + "\n" for line in lines))
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "resumed: kept" in result.output
    assert tree_digest(dst) == tree_digest(toy_reference)


def test_ctrl_c_stops_both_lanes_at_once_and_keeps_the_work(toy_src, toy_reference, tmp_path):
    dst, marker = tmp_path / "out", tmp_path / "interrupted-at"
    args = ("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    env = dict(os.environ, CONVERT_FP8_NO_PROGRESS="1")
    done = subprocess.run([sys.executable, str(HERE / "kill_after.py"), "interrupt", "6", str(marker),
                           *map(str, args)], capture_output=True, text=True, env=env)
    exited = time.time()
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.startswith("convert-fp8: interrupted; the same command resumes the conversion")
    assert exited - float(marker.read_text()) < 2.0
    staging = dst / ".convert-fp8.partial"
    recorded = Manifest(staging / "manifest-part-1-of-1.jsonl").load()
    # 28 pieces in the whole run; those of a shard still being written are recorded as its write-back confirms them
    assert 6 <= len(recorded) < 28 and not (dst / "config.json").exists()
    assert not (staging / "part-1-of-1.lock").exists()  # released for the rerun
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "resumed: kept" in result.output
    assert tree_digest(dst) == tree_digest(toy_reference)


def test_a_source_changed_between_kill_and_rerun_is_refused(toy_src, tmp_path):
    changing = Path(shutil.copytree(toy_src, tmp_path / "src"))
    dst = tmp_path / "out"
    args = ("--src", changing, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    killed_run(*args, mode=("pieces", "12"))
    from converter.source import read_header

    shard = changing / "model-00002-of-00003.safetensors"
    header = read_header(shard)
    with open(shard, "r+b") as f:  # same headers, other values
        f.seek(header.data_start)
        data = f.read(4096)
        f.seek(header.data_start)
        f.write(bytes(b ^ 0x01 for b in data))
    result = run_cli(*args)
    assert result.exit_code == 2
    assert result.stderr == (
        f"convert-fp8: error: {dst}: holds the partial output of a conversion of {changing.resolve()}, whose "
        "model-00002-of-00003.safetensors changed since; its bytes would mix with the new ones: pass --overwrite "
        "to start over\n")
    result = run_cli(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "resumed" not in result.output
    fresh = tmp_path / "fresh"
    assert run_cli("--src", changing, "--dst", fresh, "--max-shard-size", "20MB", "--no-arch-check").exit_code == 0
    assert tree_digest(dst) == tree_digest(fresh)


def test_free_space_on_resume_counts_the_blocks_on_disk(toy_src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    args = ("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    killed_run(*args, mode=("writes", "2"))
    staging = dst / ".convert-fp8.partial"
    shards = sorted(staging.glob("*.safetensors"))
    lengths = sum(p.stat().st_size for p in shards)
    on_disk = sum(p.stat().st_blocks * 512 for p in shards)
    assert on_disk < lengths / 2  # sized in full, mostly holes
    import converter.output_dir as output_dir

    free = lengths // 2  # enough if the staged lengths were written data, not enough for what is missing
    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    result = run_cli(*args)
    assert result.exit_code == 1
    assert f"{dst}: disk full: the output needs" in result.stderr and f"has {free:,} free" in result.stderr
    assert (staging / "run.json").exists() and all(p.exists() for p in shards)  # the earlier run's work is kept


def test_leftovers_of_another_conversion_are_refused(toy_src, tmp_path):
    dst = tmp_path / "out"
    killed_run("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    result = run_cli("--src", toy_src, "--dst", dst, "--max-shard-size", "30MB", "--no-arch-check")
    assert result.exit_code == 2
    assert "holds the partial output of a different conversion" in result.stderr
    assert "pass --overwrite to discard it" in result.stderr
    result = run_cli("--src", toy_src, "--dst", dst, "--max-shard-size", "30MB", "--no-arch-check", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "resumed" not in result.output


def test_parts_in_separate_processes_match_a_single_run(toy_src, toy_reference, tmp_path):
    dst = tmp_path / "out"
    env = dict(os.environ, CONVERT_FP8_NO_PROGRESS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "converter.cli", "--src", str(toy_src), "--dst", str(dst),
                               "--max-shard-size", "20MB", "--no-arch-check", "--part", f"{i}/3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in (1, 2, 3)]
    outputs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    finished = [out for out, _ in outputs if "wrote " in out]
    assert len(finished) == 1  # exactly one part completed the checkpoint
    assert tree_digest(dst) == tree_digest(toy_reference)


def test_finalize_after_the_last_part_died(toy_src, toy_reference, tmp_path):
    dst = tmp_path / "out"
    common = ("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    result = run_cli(*common, "--part", "1/2")
    assert result.exit_code == 0 and "part 1/2 of" in result.output and "done; waiting for part(s) 2/2" in result.output
    result = run_cli("finalize", "--dst", dst)
    assert result.exit_code == 2 and "waiting for part(s) 2/2" in result.stderr
    killed_run(*common, "--part", "2/2", mode=("finalize",))
    assert not (dst / "config.json").exists()
    result = run_cli("finalize", "--dst", dst)
    assert result.exit_code == 0, result.output
    assert tree_digest(dst) == tree_digest(toy_reference)


def test_finalize_after_the_last_part_died_with_a_relative_preset_file(toy_src, toy_reference, tmp_path):
    """`--config ./mypreset.json` given in one folder; `finalize` run from another finds the same preset."""
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "mypreset.json").write_text(json.dumps({"block_size": 64, "modules_to_not_convert": []}))
    dst = tmp_path / "out"
    common = ("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check",
              "--config", "./mypreset.json")
    env = dict(os.environ, CONVERT_FP8_NO_PROGRESS="1")
    part = subprocess.run([sys.executable, "-m", "converter.cli", *map(str, common), "--part", "1/2"],
                          cwd=tmp_path / "here", env=env, capture_output=True, text=True)
    assert part.returncode == 0, part.stderr
    died = subprocess.run([sys.executable, str(HERE / "kill_after.py"), "finalize", *map(str, common), "--part",
                           "2/2"], cwd=tmp_path / "here", env=env, capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr
    result = run_cli("finalize", "--dst", dst)  # from the tests' folder
    assert result.exit_code == 0, result.output
    reference = tmp_path / "reference"
    result = run_cli(*common[:3], reference, *common[4:-1], tmp_path / "here" / "mypreset.json")
    assert result.exit_code == 0, result.output
    assert tree_digest(dst) == tree_digest(reference)


def test_killed_while_moving_the_output_into_place_then_the_same_command(toy_src, toy_reference, tmp_path):
    """Killed after some finished files were moved into DST: the same command takes them for its own output (not
    files of the user's to refuse) and ends with the same bytes; so does a run killed holding the finalize lock."""
    dst = tmp_path / "out"
    args = ("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    killed_run(*args, mode=("moving", "2"))
    assert (dst / ".convert-fp8.partial" / "finalize.lock").exists() and not (dst / "config.json").exists()
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and tree_digest(dst) == tree_digest(toy_reference)


def test_killed_while_removing_the_staging_folder_then_the_same_command(toy_src, toy_reference, tmp_path):
    """Killed after the whole output was moved into place, while its staging folder was being removed: the marker
    of the moves goes last, so the same command still knows the files for its own and completes the output."""
    dst = tmp_path / "out"
    args = ("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    killed_run(*args, mode=("cleanup",))
    assert (dst / ".convert-fp8.partial" / "moving.json").exists() and (dst / "config.json").exists()
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and tree_digest(dst) == tree_digest(toy_reference)


def test_bad_part_argument(toy_src, tmp_path):
    result = run_cli("--src", toy_src, "--dst", tmp_path / "o", "--part", "4/3")
    assert result.exit_code == 2 and "expected I/N with 1 <= I <= N" in result.output


def hub_cache(root: Path, repo: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay out `folder` as huggingface_hub's cache holds a downloaded repository revision."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    blobs = repo_dir / "blobs"
    blobs.mkdir()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = path.relative_to(folder)
            blob = blobs / f"blob{len(list(blobs.iterdir()))}"
            shutil.copyfile(path, blob)
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, (snapshot / rel).parent), snapshot / rel)
    return root


def hub_run(cache: Path, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), CONVERT_FP8_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "converter.cli", *map(str, args)], capture_output=True,
                          text=True, env=env)


def test_hub_repo_id_from_the_cache_gives_the_same_shards(toy_src, toy_reference, tmp_path):
    cache = hub_cache(tmp_path / "hub", "acme/toy", toy_src)
    done = hub_run(cache, "--src", "acme/toy", "--dst", tmp_path / "out", "--max-shard-size", "20MB",
                   "--no-arch-check")
    assert done.returncode == 0, done.stderr
    got, want = tree_digest(tmp_path / "out"), tree_digest(toy_reference)
    assert {k: v for k, v in got.items() if k != "README.md"} == {k: v for k, v in want.items() if k != "README.md"}
    assert "base_model: acme/toy" in (tmp_path / "out" / "README.md").read_text()


def test_hub_offline_with_an_empty_cache_is_one_line(tmp_path):
    done = hub_run(tmp_path / "empty", "--src", "acme/missing", "--dst", tmp_path / "out")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "convert-fp8: error: acme/missing: config.json is not in the local Hugging Face cache and cannot be "
        "downloaded (offline: HF_HUB_OFFLINE is set or there is no network)"]
    assert not (tmp_path / "out").exists()


def test_low_disk_deletes_only_what_this_run_downloaded(toy_src, tmp_path, monkeypatch):
    cache = hub_cache(tmp_path / "hub", "acme/toy", toy_src)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    from converter.hub import HubRepo

    repo = HubRepo("acme/toy", low_disk=True)
    shard = "model-00001-of-00003.safetensors"
    local = repo.cached(shard)
    assert local is not None
    repo.release(shard)  # cached before this run: kept
    assert local.exists()
    repo._downloaded.add(shard)  # as if this run had fetched it
    blob = local.resolve()
    repo.release(shard)
    assert not local.exists() and not blob.exists()


def low_disk_run(hub, cache: Path, dst: Path) -> subprocess.CompletedProcess:
    """`convert-fp8 --src acme/toy --low-disk` against the stand-in Hub `hub`, with `cache` as the Hub cache."""
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache), CONVERT_FP8_NO_PROGRESS="1",
               HF_HUB_DISABLE_XET="1")
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "converter.cli", "--src", "acme/toy", "--dst", str(dst),
                           "--max-shard-size", "20MB", "--no-arch-check", "--low-disk"],
                          capture_output=True, text=True, env=env)


def test_low_disk_keeps_the_blobs_an_older_revision_shares(toy_src, toy_reference, tmp_path):
    """An older revision in the cache holds the same shards (same blobs): the new revision's download only links
    them. After a --low-disk run every file of the older revision still resolves."""
    import hashlib

    from .fake_hub import FakeHub

    cache = tmp_path / "hub"
    hub_cache(cache, "acme/toy", toy_src, commit="1111111111111111111111111111111111111111")
    repo_dir = cache / "models--acme--toy"
    for blob in list((repo_dir / "blobs").iterdir()):  # named as huggingface_hub names them: by their sha256
        named = blob.with_name(hashlib.sha256(blob.read_bytes()).hexdigest())
        blob.rename(named)
    old = repo_dir / "snapshots" / "1111111111111111111111111111111111111111"
    for link in old.rglob("*"):
        if link.is_symlink():
            target = Path(os.readlink(link))
            digest = hashlib.sha256((toy_src / link.relative_to(old)).read_bytes()).hexdigest()
            link.unlink()
            os.symlink(target.with_name(digest), link)
    links = [p for p in old.rglob("*") if p.is_symlink()]
    assert links and all(p.exists() for p in links)
    with FakeHub("acme/toy", toy_src) as hub:
        done = low_disk_run(hub, cache, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p for p in links if not p.exists()] == []  # every file of the older revision still resolves
    got, want = tree_digest(tmp_path / "out"), tree_digest(toy_reference)
    assert {k: v for k, v in got.items() if k != "README.md"} == {k: v for k, v in want.items() if k != "README.md"}


def test_hub_download_shard_by_shard_with_low_disk(toy_src, toy_reference, tmp_path):
    """Online, against a local stand-in for the Hub: headers by ranged reads before any shard is downloaded,
    shards fetched as the conversion reaches them, and with --low-disk none of them left in the cache."""
    from .fake_hub import FakeHub

    cache = tmp_path / "hub"
    with FakeHub("acme/toy", toy_src) as hub:
        done = low_disk_run(hub, cache, tmp_path / "out")
        requests = list(hub.requests)
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = tree_digest(tmp_path / "out"), tree_digest(toy_reference)
    assert {k: v for k, v in got.items() if k != "README.md"} == {k: v for k, v in want.items() if k != "README.md"}
    shard_gets = [(i, p) for i, (m, p, r) in enumerate(requests) if m == "GET" and p.endswith(".safetensors") and r is None]
    header_reads = [(i, p) for i, (m, p, r) in enumerate(requests) if m == "GET" and r is not None]
    assert len(header_reads) == 6  # length prefix and header of each of 3 shards
    assert len(shard_gets) == 3 and max(i for i, _ in header_reads) < min(i for i, _ in shard_gets)
    left = [p for p in cache.rglob("*.safetensors")] + [p for p in cache.rglob("blobs/*") if p.stat().st_size > 10**6]
    assert left == []


def test_a_second_process_on_the_same_part_is_refused(toy_src, tmp_path):
    dst = tmp_path / "out"
    args = ("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    killed_run(*args)  # leaves a lock naming a process that no longer exists: taken over below
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = dst / ".convert-fp8.partial" / "part-1-of-1.lock"
        import socket

        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        result = run_cli(*args)
        assert result.exit_code == 2
        assert f"process {sleeper.pid} on this host is already converting part 1/1 into it" in result.stderr
        # the same pid written before the machine last started names an unrelated process now: taken over
        lock.write_text(json.dumps({"host": socket.gethostname(), "boot": "an-earlier-boot", "pid": sleeper.pid}))
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
        assert "resumed: kept" in result.output
    finally:
        sleeper.kill()
        sleeper.wait()
    shutil.rmtree(dst)
    killed_run(*args)
    result = run_cli(*args)  # the holder is gone: the lock is taken over and the run resumes
    assert result.exit_code == 0, result.output
    assert "resumed: kept" in result.output
