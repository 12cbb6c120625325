"""`--push-to-hub`: the real huggingface_hub client against the stand-in Hub's upload endpoints
(`fake_hub_upload.UploadHub`), through the LFS path (HF_HUB_DISABLE_XET=1: the stand-in does not serve Xet).

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
from converter.publish import PENDING_RECORD, cache_snapshot_origin

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
            wait: bool = True, extra_env: dict | None = None, repo: str = "acme/toy-FP8"):
    """`convert-fp8 [COMMAND] --src SRC --dst DST --push-to-hub acme/toy-FP8 ARGS` in a process."""
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", CONVERT_FP8_NO_PROGRESS="1",
               HF_HOME=str(dst.parent / "hf-home"), HF_HUB_DISABLE_PROGRESS_BARS="1",
               CONVERT_FP8_PUBLISH_BACKOFF="0.1", **(extra_env or {}))
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    argv = [sys.executable, "-m", "converter.cli", *command, "--src", str(src), "--dst", str(dst),
            "--push-to-hub", repo, "-q"]
    if not command:
        argv += ["--no-arch-check", "--max-shard-size", SHARD]
    argv += args
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def local_files(dst: Path) -> dict:
    return {p.relative_to(dst).as_posix(): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(dst.rglob("*")) if p.is_file()}


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
    with UploadHub(hold_after=2) as hub:
        running = publish(hub, source, tmp_path / "out", wait=False)
        assert hub.held.wait(120), running.communicate()[1] if running.poll() is not None else "no upload held"
        running.send_signal(signal.SIGKILL)
        running.wait()
        hub.release.set()
        time.sleep(0.2)
        assert len(hub.stored) == 2
        assert set(hub.files_at("acme/toy-FP8")) == {".gitattributes"}  # nothing visible
        hub.hold_after = None
        before = len(hub.stored)
        puts_before = len([r for r in hub.requests if r[0] == "PUT"])
        done = publish(hub, source, tmp_path / "out")
        assert done.returncode == 0, done.stderr
        puts = len([r for r in hub.requests if r[0] == "PUT"]) - puts_before
        files = hub.files_at("acme/toy-FP8")
    assert puts == 2 and len(hub.stored) - before == 2  # 4 shards: the 2 the Hub lacked
    assert {f: v["size"] for f, v in files.items() if f.endswith(".safetensors")} == \
        {f: s for f, (s, _) in local_files(tmp_path / "out").items() if f.endswith(".safetensors")}


def test_a_failure_before_the_commit_leaves_the_repository_without_a_new_file(source, tmp_path):
    with UploadHub(quota=700_000) as hub:  # room for 2 of the 4 shards
        done = publish(hub, source, tmp_path / "out")
        assert done.returncode == 1
        assert set(hub.files_at("acme/toy-FP8")) == {".gitattributes"}
        assert [c for c in hub.commits if c["message"] != "initial commit"] == []
        assert len(hub.stored) == 2
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith("convert-fp8: error: acme/toy-FP8: the Hub refused the upload while uploading model-")
        assert "storage quota exceeded" in line
        # the conversion is complete and kept; the same command, once there is room, sends the 2 missing blobs
        # and commits, without converting again
        assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / PENDING_RECORD).is_file()
        hub.quota = None
        puts = len([r for r in hub.requests if r[0] == "PUT"])
        done = publish(hub, source, tmp_path / "out")
        assert done.returncode == 0, done.stderr
        assert "only its commit was left to make" in done.stdout
        assert len(hub.files_at("acme/toy-FP8")) == 9
        assert len([r for r in hub.requests if r[0] == "PUT"]) - puts == 2 and len(hub.stored) == 4
    assert not (tmp_path / "out" / PENDING_RECORD).exists()


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
    assert re.fullmatch(
        f"convert-fp8: error: acme/toy-FP8: cannot reach the Hub at {re.escape(hub.url)} while uploading "
        r"model-0000\d-of-00004\.safetensors, after 6 tries with backoff; the uploaded blobs stay on the Hub: rerun "
        "the same command to resume the upload", line), line
    assert (tmp_path / "again" / PENDING_RECORD).is_file()


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
