"""`--push-to-hub`: the real huggingface_hub client against the stand-in Hub's upload endpoints
(`fake_hub_upload.UploadHub`), through the LFS path (HF_HUB_DISABLE_XET=1: the stand-in does not serve Xet); one
test has the stand-in keep small shards in git, the path of a repository whose `.gitattributes` says so.

Each conversion runs in a process, as a user runs it: the token comes from HF_TOKEN, the Hub from HF_ENDPOINT."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from converter.configs import INDEX_NAME
from converter.origin import cache_snapshot_origin
from converter.publish import PENDING_RECORD

from .fake_hub_upload import UploadHub

SHARD = "300KB"  # the toy source below makes 4 output shards at this size


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A small BF16 checkpoint in 2 shards, with a tokenizer and a card."""
    path = tmp_path_factory.mktemp("publish-src") / "toy"
    path.mkdir()
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k in range(4):
        shard = f"model-{k // 2 + 1:05d}-of-00002.safetensors"
        tensors = {f"model.layers.{k}.mlp.up_proj.weight": torch.randn(512, 512, generator=gen).to(torch.bfloat16),
                   f"model.layers.{k}.input_layernorm.weight": torch.ones(512, dtype=torch.bfloat16)}
        if (path / shard).exists():
            from safetensors.torch import load_file

            tensors.update(load_file(path / shard))
        save_file(tensors, path / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    (path / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "bfloat16"}))
    (path / "tokenizer.json").write_text("{}")
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# toy\n")
    return path


def publish(hub: UploadHub, src: Path, dst: Path, *args: str, token: str | None = "hf_write", command=(),
            wait: bool = True, extra_env: dict | None = None, repo: str = "acme/toy-FP8", probe: Path | None = None,
            runner: list[str] | None = None):
    """`convert-fp8 [COMMAND] --src SRC --dst DST --push-to-hub acme/toy-FP8 ARGS` in a process; with `probe`,
    through `tests/publish_probe.py`, which logs every sha256 computed and the staged shards' disk use there; with
    `runner` (`["tests/kill_after.py", MODE, ...]`), through that script."""
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", CONVERT_FP8_NO_PROGRESS="1",
               HF_HOME=str(dst.parent / "hf-home"), HF_HUB_DISABLE_PROGRESS_BARS="1",
               CONVERT_FP8_PUBLISH_BACKOFF="0.1")
    env.update(extra_env or {})
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    if probe is not None:
        env["PROBE_LOG"] = str(probe)
    module = "tests.publish_probe" if probe is not None else "converter.cli"
    start = [sys.executable, *runner] if runner is not None else [sys.executable, "-m", module]
    argv = [*start, *command, "--src", str(src), "--dst", str(dst), "--push-to-hub", repo, "-q"]
    if not command:
        argv += ["--no-arch-check", "--max-shard-size", SHARD]
    argv += args
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def local_files(dst: Path) -> dict:
    return {p.relative_to(dst).as_posix(): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(dst.rglob("*")) if p.is_file()}


def probed(log: Path) -> tuple[list[str], int]:
    """What `tests/publish_probe.py` saw: the files hashed, in order, and the most bytes of staged shards."""
    lines = log.read_text().splitlines() if log.exists() else []
    hashed = [line.split(" ", 1)[1] for line in lines if line.startswith("sha256 ")]
    staged = [int(line.split()[1]) for line in lines if line.startswith("staged ")]
    return hashed, max(staged, default=0)


def staged_record(dst: Path) -> dict:
    """The upload record of a run stopped while converting, in its staging folder."""
    path = dst / ".convert-fp8.partial" / PENDING_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def wait_for(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> dict:
    """The files of the same conversion without publishing: name -> (size, sha256)."""
    dst = tmp_path_factory.mktemp("publish-reference") / "out"
    done = subprocess.run([sys.executable, "-m", "converter.cli", "--src", str(source), "--dst", str(dst),
                           "--no-arch-check", "-q", "--max-shard-size", SHARD], capture_output=True, text=True,
                          env=dict(os.environ, CONVERT_FP8_NO_PROGRESS="1"), timeout=300)
    assert done.returncode == 0, done.stderr
    return local_files(dst)


def test_a_conversion_is_published_whole_in_one_commit(source, tmp_path):
    with UploadHub() as hub:
        done = publish(hub, source, tmp_path / "out", "--commit-message", "FP8 of toy", "--private")
        assert done.returncode == 0, done.stderr
        assert hub.repos["acme/toy-FP8"]["private"]
        files = hub.files_at("acme/toy-FP8")
        commits = [c for c in hub.commits if c["message"] != "initial commit"]
    local = local_files(tmp_path / "out")
    shards = sorted(f for f in local if f.endswith(".safetensors"))
    assert len(shards) == 4
    assert len(commits) == 1 and commits[0]["message"] == "FP8 of toy"  # one commit holds everything
    assert set(files) == set(local) | {".gitattributes"}
    for name, (size, sha) in local.items():
        assert files[name]["size"] == size
        if name in shards:  # the weights are LFS blobs, by the sha256 of the written file
            assert files[name]["sha256"] == sha
        else:
            assert hashlib.sha256(files[name]["content"]).hexdigest() == sha
    assert len(hub.stored) == 4
    # shards went up while converting: every blob is stored before the commit's preupload of the small files
    order = [(m, p) for m, p, _ in hub.requests if m in ("PUT", "POST")]
    puts = [k for k, (m, p) in enumerate(order) if m == "PUT"]
    assert max(puts) < min(k for k, (m, p) in enumerate(order) if p.endswith("/commit/main"))
    assert "published 8 files of" in done.stdout and "4 shard(s) pre-uploaded by this run" in done.stdout
    assert not (tmp_path / "out" / PENDING_RECORD).exists()
    meta = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---\n")[1])
    assert meta["license"] == "apache-2.0"


def test_shards_are_converted_while_the_first_is_uploading(source, tmp_path):
    """The first shard's upload is held by the stand-in: meanwhile every other shard is written in full (the
    same bytes as a conversion without publishing), then the upload goes on and one commit follows."""
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "converter.cli", "--src", str(source), "--dst", str(reference),
                           "--no-arch-check", "-q", "--max-shard-size", SHARD], capture_output=True, text=True,
                          env=dict(os.environ, CONVERT_FP8_NO_PROGRESS="1"), timeout=300)
    assert done.returncode == 0, done.stderr
    want = {f: v for f, v in local_files(reference).items() if f.endswith(".safetensors")}
    staging = tmp_path / "out" / ".convert-fp8.partial"
    with UploadHub(hold_after=0, abandon_held=False) as hub:
        running = publish(hub, source, tmp_path / "out", wait=False)
        assert hub.held.wait(120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            staged = {f: v for f, v in local_files(staging).items() if f in want} if staging.is_dir() else {}
            if staged == want:
                break
            time.sleep(0.1)
        assert staged == want, "the other shards were not written while the first one was uploading"
        assert hub.stored == [] and not (tmp_path / "out" / "config.json").exists()
        hub.release.set()
        out, err = running.communicate(timeout=300)
        assert running.returncode == 0, err
        assert len(hub.stored) == 4


def test_a_dequantized_checkpoint_is_published(source, tmp_path):
    fp8 = tmp_path / "fp8"
    done = subprocess.run([sys.executable, "-m", "converter.cli", "--src", str(source), "--dst", str(fp8),
                           "--no-arch-check", "-q"], capture_output=True, text=True,
                          env=dict(os.environ, CONVERT_FP8_NO_PROGRESS="1"), timeout=300)
    assert done.returncode == 0, done.stderr
    with UploadHub() as hub:
        done = publish(hub, fp8, tmp_path / "bf16", command=("dequantize",), extra_env={})
        assert done.returncode == 0, done.stderr
        files = hub.files_at("acme/toy-FP8")
    local = local_files(tmp_path / "bf16")
    assert set(files) == set(local) | {".gitattributes"}
    assert all(files[f]["sha256"] == sha for f, (_, sha) in local.items() if f.endswith(".safetensors"))


def test_a_run_killed_during_upload_reruns_uploading_only_the_missing_blobs(source, tmp_path):
    """The rerun sends the 2 blobs the Hub lacks, and hashes only those 2 shards: the 2 uploaded ones are taken
    from the upload record (their size, modification time and manifest CRCs still match)."""
    with UploadHub(hold_after=2) as hub:
        running = publish(hub, source, tmp_path / "out", wait=False)
        assert hub.held.wait(120), running.communicate()[1] if running.poll() is not None else "no upload held"
        assert wait_for(lambda: len(staged_record(tmp_path / "out").get("uploaded", {})) == 2)
        running.send_signal(signal.SIGKILL)
        running.wait()
        hub.release.set()
        time.sleep(0.2)
        assert len(hub.stored) == 2
        assert set(hub.files_at("acme/toy-FP8")) == {".gitattributes"}  # nothing visible
        hub.hold_after = None
        before = len(hub.stored)
        puts_before = len([r for r in hub.requests if r[0] == "PUT"])
        recorded = sorted(staged_record(tmp_path / "out")["uploaded"])
        done = publish(hub, source, tmp_path / "out", probe=tmp_path / "probe.log")
        assert done.returncode == 0, done.stderr
        puts = len([r for r in hub.requests if r[0] == "PUT"]) - puts_before
        files = hub.files_at("acme/toy-FP8")
    assert puts == 2 and len(hub.stored) - before == 2  # 4 shards: the 2 the Hub lacked
    hashed, _ = probed(tmp_path / "probe.log")
    shards = [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    assert sorted(hashed) == sorted(set(shards) - set(recorded)) and len(hashed) == 2
    assert {f: v["size"] for f, v in files.items() if f.endswith(".safetensors")} == \
        {f: s for f, (s, _) in local_files(tmp_path / "out").items() if f.endswith(".safetensors")}


def test_a_failure_before_the_commit_leaves_the_repository_without_a_new_file(source, reference, tmp_path):
    """A quota with room for 2 of the 4 shards stops the run at once: nothing is committed, the staged work and
    the record of the blobs the Hub confirmed stay; the same command, once there is room, converts what is left,
    sends the blobs the Hub lacks (hashing none of the recorded shards again) and commits. How many blobs reached
    the Hub before the run stopped depends on the two upload threads: only the bounds are asserted."""
    out = tmp_path / "out"
    with UploadHub(quota=700_000) as hub:  # room for 2 of the 4 shards
        done = publish(hub, source, out)
        assert done.returncode == 1
        assert set(hub.files_at("acme/toy-FP8")) == {".gitattributes"}
        assert [c for c in hub.commits if c["message"] != "initial commit"] == []
        assert len(hub.stored) <= 2
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith("convert-fp8: error: acme/toy-FP8: the Hub refused the upload while uploading model-")
        assert "storage quota exceeded" in line
        assert not (out / "config.json").exists()  # stopped before the output was complete
        record = staged_record(out)["uploaded"]
        assert {e["sha256"] for e in record.values()} <= set(hub.stored)  # recorded only once the Hub held it
        assert all(reference[n] == (e["size"], e["sha256"]) for n, e in record.items())
        hub.quota = None
        puts = len([r for r in hub.requests if r[0] == "PUT"])
        stored = set(hub.stored)
        done = publish(hub, source, out, probe=tmp_path / "probe.log")
        assert done.returncode == 0, done.stderr
        files = hub.files_at("acme/toy-FP8")
        assert len([r for r in hub.requests if r[0] == "PUT"]) - puts == 4 - len(stored)  # only what it lacked
    assert_holds(files, reference)
    assert not (out / PENDING_RECORD).exists()
    hashed, _ = probed(tmp_path / "probe.log")  # the recorded blobs are not hashed again
    assert not set(hashed) & set(record)


def assert_holds(files: dict, reference: dict) -> None:
    """The repository's files are exactly a plain conversion's: names, sizes, and sha256 (LFS) or bytes (git)."""
    assert set(files) == set(reference) | {".gitattributes"}
    for name, (size, sha) in reference.items():
        assert files[name]["size"] == size, name
        got = files[name]["sha256"] or hashlib.sha256(files[name]["content"]).hexdigest()
        assert got == sha, name


def test_network_failures_are_retried_then_told_in_one_line(source, tmp_path):
    """huggingface_hub tries an upload 6 times; convert-fp8 tries the whole pre-upload again after a wait. Past
    those, one line says that the same command resumes the upload; the conversion is kept."""
    with UploadHub(drop_puts=6) as hub:  # the client's 6 tries of the first shard fail; the retry goes through
        done = publish(hub, source, tmp_path / "out")
        assert done.returncode == 0, done.stderr
        assert len(hub.stored) == 4
    with UploadHub(drop_puts=6) as hub:
        done = publish(hub, source, tmp_path / "again", extra_env={"CONVERT_FP8_PUBLISH_RETRIES": "0"})
        assert done.returncode == 1
        assert set(hub.files_at("acme/toy-FP8")) == {".gitattributes"}
        line = done.stderr.strip().splitlines()[-1]
        # whether the other upload thread had a blob confirmed by then depends on it: either ending is right
        assert re.fullmatch(
            f"convert-fp8: error: acme/toy-FP8: cannot reach the Hub at {re.escape(hub.url)} while uploading "
            r"model-0000\d-of-00004\.safetensors, after 6 tries with backoff; (the uploaded blobs stay on the Hub: "
            "rerun the same command to resume the upload|nothing was uploaded yet: rerun the same command)", line), line
        assert (tmp_path / "again" / ".convert-fp8.partial" / PENDING_RECORD).is_file()  # the work is kept
        done = publish(hub, source, tmp_path / "again")
        assert done.returncode == 0, done.stderr
        assert len(shard_names(hub.files_at("acme/toy-FP8"))) == 4


@pytest.mark.parametrize("token, message", [
    (None, "convert-fp8: error: --push-to-hub acme/toy-FP8: no Hugging Face token: set HF_TOKEN to a write token, "
           "or run `hf auth login`"),
    ("hf_read", "convert-fp8: error: acme/toy-FP8: the token of tester is read-only; --push-to-hub needs a token "
                "with write access"),
    ("hf_wrong", "convert-fp8: error: acme/toy-FP8: the Hub refused the token (HTTP 401) while checking the token: "
                 "check HF_TOKEN"),
])
def test_token_problems_are_one_line_before_anything_is_converted(source, tmp_path, token, message):
    with UploadHub() as hub:
        done = publish(hub, source, tmp_path / "out", token=token)
    assert done.returncode == 1
    assert done.stderr.strip() == message
    assert not (tmp_path / "out").exists()


def test_no_write_access_to_the_namespace_is_one_line(source, tmp_path):
    with UploadHub() as hub:
        done = publish(hub, source, tmp_path / "out", repo="other/toy-FP8")
    message = ("convert-fp8: error: other/toy-FP8: no write access (HTTP 403) while creating the repository: the "
               "token's account cannot write to other")
    assert done.returncode == 1
    assert done.stderr.strip() == message
    assert not (tmp_path / "out").exists()


def test_a_repository_holding_a_model_is_refused_unless_overwrite_or_a_branch(source, tmp_path):
    with UploadHub() as hub:
        assert publish(hub, source, tmp_path / "one").returncode == 0
        again = publish(hub, source, tmp_path / "two")
        assert again.returncode == 1
        assert again.stderr.strip() == (
            "convert-fp8: error: acme/toy-FP8: the repository already holds 8 file(s) (README.md, ...); pass "
            "--overwrite to replace them in one commit, or --hub-branch to stage on a branch")
        assert not (tmp_path / "two").exists()
        staged = publish(hub, source, tmp_path / "three", "--hub-branch", "fp8-staging")
        assert staged.returncode == 0, staged.stderr
        assert "acme/toy-FP8@fp8-staging" in staged.stdout
        assert len(hub.stored) == 4  # the same bytes: the blobs were on the Hub already
        assert hub.files_at("acme/toy-FP8", "fp8-staging") == hub.files_at("acme/toy-FP8")
        # --overwrite replaces the model in one commit: files the new output lacks are deleted in it
        replaced = publish(hub, source, tmp_path / "four", "--overwrite", "--max-shard-size", "5GB")
        assert replaced.returncode == 0, replaced.stderr
        files = hub.files_at("acme/toy-FP8")
    assert sorted(f for f in files if f.endswith(".safetensors")) == ["model-00001-of-00001.safetensors"]
    assert set(files) == set(local_files(tmp_path / "four")) | {".gitattributes"}


def test_a_cache_snapshot_source_names_its_hub_id_and_commit(source, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--acme--toy" / "snapshots" / commit
    snapshot.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(source, snapshot)
    assert cache_snapshot_origin(snapshot) == ("acme/toy", commit)
    with UploadHub() as hub:
        done = publish(hub, snapshot, tmp_path / "out")
        assert done.returncode == 0, done.stderr
        card = hub.files_at("acme/toy-FP8")["README.md"]["content"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "acme/toy" and meta["base_model_relation"] == "quantized"
    assert f"at commit `{commit}`" in card


def test_no_keep_output_is_refused_without_push_to_hub(source, tmp_path):
    done = subprocess.run([sys.executable, "-m", "converter.cli", "--src", str(source), "--dst", str(tmp_path / "out"),
                           "--no-keep-output"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("convert-fp8: error: --no-keep-output removes each shard once it is uploaded: it "
                                   "needs --push-to-hub ORG/NAME")
    assert not (tmp_path / "out").exists()


def shard_names(files) -> list[str]:
    return sorted(f for f in files if f.endswith(".safetensors"))


def test_no_keep_output_removes_each_shard_once_uploaded_and_resumes_without_them(source, reference, tmp_path):
    """--no-keep-output (LFS path): each shard is removed once its blob is on the Hub, and the conversion does not
    go past a completed shard while an earlier one is still on disk, so at most 2 shards' bytes are ever staged.
    Killed (SIGKILL) with 2 blobs uploaded, the same command converts only what it lacks (the 2 removed shards are
    taken as written), uploads the 2 missing blobs, and one commit names all 4 shards by sha256 and size;
    --dst then holds every file but the shards."""
    out = tmp_path / "out"
    shards = shard_names(reference)
    largest = max(reference[s][0] for s in shards)
    with UploadHub(hold_after=2) as hub:
        running = publish(hub, source, out, "--no-keep-output", wait=False, probe=tmp_path / "first.log")
        assert hub.held.wait(120), running.communicate()[1] if running.poll() is not None else "no upload held"
        removed = lambda: sorted(n for n, b in staged_record(out).get("uploaded", {}).items() if b.get("removed"))
        assert wait_for(lambda: len(removed()) == 2)
        running.send_signal(signal.SIGKILL)
        running.wait()
        hub.release.set()
        staged = sorted(p.name for p in (out / ".convert-fp8.partial").glob("*.safetensors"))
        assert len(hub.stored) == 2 and staged == sorted(set(shards) - set(removed()))
        record = staged_record(out)["uploaded"]
        for name in removed():  # what the commit needs of a removed shard
            assert (record[name]["size"], record[name]["sha256"]) == reference[name]
        assert set(hub.files_at("acme/toy-FP8")) == {".gitattributes"}
        hub.hold_after = None
        puts = len([r for r in hub.requests if r[0] == "PUT"])
        done = publish(hub, source, out, "--no-keep-output", probe=tmp_path / "second.log")
        assert done.returncode == 0, done.stderr
        assert len([r for r in hub.requests if r[0] == "PUT"]) - puts == 2 and len(hub.stored) == 4
        files = hub.files_at("acme/toy-FP8")
        commits = [c for c in hub.commits if c["message"] != "initial commit"]
    assert len(commits) == 1
    assert set(files) == set(reference) | {".gitattributes"}
    for name, (size, sha) in reference.items():  # the same repository content as the conversion's files
        assert files[name]["size"] == size
        assert (files[name]["sha256"] if name in shards else hashlib.sha256(files[name]["content"]).hexdigest()) == sha
    assert sorted(local_files(out)) == sorted(set(reference) - set(shards))  # no shard, no record
    assert done.stdout.strip().endswith("; shards not kept locally (--no-keep-output)")
    assert "published 8 files of" in done.stdout and "2 shard(s) pre-uploaded by this run" in done.stdout
    _, most_first = probed(tmp_path / "first.log")
    again, most_again = probed(tmp_path / "second.log")
    assert sorted(again) == staged  # the removed shards were neither written nor hashed again
    # 4 shards of `largest` bytes at most: never more than 2 of them on disk (plus the small copied tensors of
    # the shards not begun, a block each)
    assert max(most_first, most_again) <= 2 * largest + 4 * 4096, (most_first, most_again, largest)


def test_a_hub_source_is_published_with_low_disk_and_no_keep_output(source, reference, tmp_path):
    """--low-disk --no-keep-output with a Hub source (the stand-in serves it too): the downloaded source shards
    and the output shards are both gone at the end, and the commit holds the 4 shards of the local conversion."""
    with UploadHub(source=("acme/toy", source)) as hub:
        done = publish(hub, "acme/toy", tmp_path / "out", "--low-disk", "--no-keep-output")
        assert done.returncode == 0, done.stderr
        files = hub.files_at("acme/toy-FP8")
    shards = shard_names(reference)
    assert {s: (files[s]["size"], files[s]["sha256"]) for s in shard_names(files)} == {s: reference[s] for s in shards}
    assert shard_names(local_files(tmp_path / "out")) == []
    snapshots = list((tmp_path / "hf-home" / "hub" / "models--acme--toy" / "snapshots").iterdir())
    assert len(snapshots) == 1 and (snapshots[0] / "config.json").is_file()  # the source came through the cache
    assert [p.name for p in snapshots[0].iterdir() if p.name.endswith(".safetensors") and p.exists()] == []
    assert done.stdout.strip().endswith("; shards not kept locally (--no-keep-output)")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sending", "waiting to retry"])
def test_ctrl_c_during_upload_stops_within_a_second(source, tmp_path, stage):
    """Ctrl-C while a shard is being sent (the stand-in takes 20 kB/s: 13 s a shard), or while convert-fp8 waits
    60 s before trying a failed upload again: the process exits at once with one line, nothing is committed, and
    the same command then publishes the whole output."""
    hub_options = {"upload_rate": 20_000} if stage == "sending" else {"drop_puts": 6}
    with UploadHub(**hub_options) as hub:
        running = publish(hub, source, tmp_path / "out", wait=False,
                          extra_env={"CONVERT_FP8_PUBLISH_BACKOFF": "60", "CONVERT_FP8_PUBLISH_RETRIES": "1"})
        puts = lambda: len([r for r in hub.requests if r[0] == "PUT"])
        assert wait_for(lambda: puts() >= (1 if stage == "sending" else 6), 120), running.communicate()[1]
        time.sleep(0.5)  # well inside the send, or the wait
        running.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        out, err = running.communicate(timeout=30)
        took = time.monotonic() - signalled
        print(f"{stage}: exited {took:.2f} s after SIGINT")
        assert running.returncode == 130
        assert took < 3, took
        line = ("convert-fp8: interrupted; the same command resumes the conversion (--overwrite with other options "
                "discards it)")
        if stage == "sending":
            assert err.splitlines() == [line]
        else:  # before the signal, huggingface_hub logged its own 6 tries (`Retrying in 1s [Retry 1/5].`)
            assert [k for k in err.splitlines() if k.startswith(("convert-fp8", "note:"))] == [line]
            assert err.splitlines()[-1] == line
        assert [c for c in hub.commits if c["message"] != "initial commit"] == []
        assert (tmp_path / "out" / ".convert-fp8.partial").is_dir()  # resumable
        hub.upload_rate, hub.drop_puts = None, 0
        done = publish(hub, source, tmp_path / "out")
        assert done.returncode == 0, done.stderr
        files = hub.files_at("acme/toy-FP8")
    assert len(shard_names(files)) == 4 and len(files) == 9


def test_shards_the_hub_keeps_in_git_are_asked_about_once(source, reference, tmp_path):
    """A repository whose .gitattributes does not send small weights to LFS keeps the shards in git: each is named
    in one preupload request only (the commit carries its bytes), and with --no-keep-output it is removed from
    --dst only after the commit."""
    with UploadHub(lfs_suffixes=()) as hub:
        done = publish(hub, source, tmp_path / "out", "--no-keep-output")
        assert done.returncode == 0, done.stderr
        files = hub.files_at("acme/toy-FP8")
        asked = sorted(path for path, size in hub.preuploaded if size)  # not the empty probes of the ignore rules
    shards = shard_names(reference)
    assert hub.stored == []  # no LFS blob
    assert [n for n in asked if n.endswith(".safetensors")] == shards  # once each
    for name in shards:
        assert files[name]["sha256"] is None
        assert (files[name]["size"], hashlib.sha256(files[name]["content"]).hexdigest()) == reference[name]
    assert sorted(local_files(tmp_path / "out")) == sorted(set(reference) - set(shards))
    assert "0 shard(s) pre-uploaded by this run" in done.stdout
