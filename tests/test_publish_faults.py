"""`--push-to-hub` when the Hub or the run fails: nothing local is deleted and nothing is recorded as uploaded
until the Hub has answered that it holds it; a failure stops the run at once with one line and keeps the work;
the same command, run again once the fault is gone, ends with the repository holding exactly a plain
conversion's files. Against the stand-in Hub (`fake_hub_upload.UploadHub`), LFS path, the real client.

The fault matrix at the end is `slow` (about 100 runs of a small conversion)."""

import hashlib
import shutil
import signal
import subprocess
import sys

import pytest

from converter.publish import PENDING_RECORD

from .fake_hub_upload import UploadHub
from .test_publish import (assert_holds, local_files, probed, publish, reference,  # noqa: F401 - fixtures
                           shard_names, source, staged_record, wait_for)

REPO = "acme/toy-FP8"
STAGING = ".convert-fp8.partial"


def new_commits(hub) -> list[dict]:
    return [c for c in hub.commits if c["message"] not in ("initial commit", "seed")]


def last_line(done) -> str:
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def bound(sizes: list[int]) -> int:
    """The documented bound on staged shards with --no-keep-output: the two largest (plus a header block for
    each shard, sized in full before its data is written, and a block of small copied tensors)."""
    return sum(sorted(sizes, reverse=True)[:2]) + 4 * 4096 * max(1, len(sizes))


def removed_are_held(out, hub, reference) -> None:
    """No local shard is gone that the Hub does not hold: each shard recorded as removed is an object of the
    repository, of its size."""
    for folder in (out / STAGING, out):
        record = staged_record(out) if folder.name == STAGING else _record(out)
        for name, entry in record.get("uploaded", {}).items():
            if entry.get("removed"):
                assert not (folder / name).exists() or folder == out
                assert hub.objects.get(entry["sha256"]) == entry["size"] == reference[name][0], name


def _record(out) -> dict:
    import json

    try:
        return json.loads((out / PENDING_RECORD).read_text())
    except (OSError, ValueError):
        return {}


# --- 1. what the Hub's ignore rules drop ---------------------------------------------------------------------


def test_shards_the_repository_ignores_are_an_error_before_anything_is_converted(source, reference, tmp_path):
    """A repository whose .gitignore holds `*.safetensors`: the Hub would answer `shouldIgnore` for every shard and
    the client skip its upload. The run stops before converting, naming the file and the rule; no blob, no record
    of one, no shard removed. With the rule gone, the same command publishes."""
    out = tmp_path / "out"
    with UploadHub() as hub:
        hub.seed(REPO, {".gitignore": b"# weights live elsewhere\n*.safetensors\n"})
        done = publish(hub, source, out, "--no-keep-output")
        assert done.returncode == 1
        assert last_line(done) == (
            "convert-fp8: error: acme/toy-FP8: the Hub would not store model-00001-of-00004.safetensors: the "
            "repository's .gitignore ignores it (rule `*.safetensors`); remove that rule, then rerun the same command")
        assert len(done.stderr.strip().splitlines()) == 1
        assert hub.stored == [] and new_commits(hub) == []
        assert staged_record(out).get("uploaded", {}) == {}
        hub.seed(REPO, {".gitignore": b"*.log\n"})
        done = publish(hub, source, out, "--no-keep-output")
        assert done.returncode == 0, done.stderr
        files = hub.files_at(REPO)
    assert_holds({k: v for k, v in files.items() if k != ".gitignore"}, reference)


def test_a_shard_the_client_did_not_upload_is_never_recorded(tmp_path, monkeypatch):
    """`_send` records a blob only when the client says it is uploaded: an ignored shard is an error naming it,
    and stays on disk unrecorded (in the process, the client pointed at the stand-in)."""
    import huggingface_hub.constants
    from huggingface_hub import HfApi

    from converter.errors import PublishError
    from converter.publish import Publisher, PublishOptions

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    staging = tmp_path / "dst" / STAGING
    staging.mkdir(parents=True)
    shard = staging / "model.safetensors"
    shard.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 64)
    with UploadHub() as hub:
        hub.seed(REPO, {".gitignore": b"model*.safetensors\n"})
        publisher = Publisher(PublishOptions(REPO, keep_output=False), tmp_path / "dst", {})
        publisher.api = HfApi(endpoint=hub.url, token="hf_write")
        with pytest.raises(PublishError) as raised:
            publisher._send(shard, "model.safetensors")
        assert str(raised.value) == (
            "acme/toy-FP8: the Hub would not store model.safetensors: the repository's .gitignore ignores it (rule "
            "`model*.safetensors`); remove that rule, then rerun the same command")
        assert publisher.uploaded == {} and hub.stored == [] and shard.is_file()
        assert [r for r in hub.requests if r[0] == "PUT" or "lfs/objects/batch" in r[1]] == []


def test_a_source_gitignore_is_applied_before_anything_is_committed(source, reference, tmp_path):
    """A source .gitignore is copied into the output, and the commit brings it: the Hub would drop the files it
    names. Those (`train.log`) are left out of the commit with a note, before it is made; the rest is published
    whole. One that would drop the shards is an error before converting."""
    src = tmp_path / "src"
    shutil.copytree(source, src)
    (src / ".gitignore").write_text("*.log\n")
    (src / "train.log").write_text("step 1 loss 2.0\n")
    out = tmp_path / "out"
    with UploadHub() as hub:
        done = publish(hub, src, out)
        assert done.returncode == 0, done.stderr
        files = hub.files_at(REPO)
    assert "note: acme/toy-FP8: left out of the commit, which the Hub would not store (ignored by the output's " \
           ".gitignore): train.log" in done.stderr
    assert (out / "train.log").is_file()  # the local output is the conversion's, whole
    want = {k: v for k, v in local_files(out).items() if k != "train.log"}  # the card names this source folder
    assert want[".gitignore"] == (6, hashlib.sha256(b"*.log\n").hexdigest())
    assert set(want) == set(reference) | {".gitignore"}
    assert_holds(files, want)

    (src / ".gitignore").write_text("*.safetensors\n")
    with UploadHub() as hub:
        done = publish(hub, src, tmp_path / "again")
        assert done.returncode == 1
        assert last_line(done) == (
            "convert-fp8: error: acme/toy-FP8: the Hub would not store model-00001-of-00004.safetensors: the "
            "output's .gitignore (copied from the source) ignores it (rule `*.safetensors`); remove that rule, then "
            "rerun the same command")
        assert hub.stored == [] and new_commits(hub) == []


# --- 2. an upload failure stops the conversion and keeps the work ---------------------------------------------


def test_an_upload_failure_stops_the_conversion_and_keeps_the_work(source, reference, tmp_path):
    """--no-keep-output, a quota with room for 1 shard: the run stops at once, the quota error in its last (and
    only error) line; nothing committed; the staged work and the record stay (no `--dst` removed); each shard
    recorded as removed is held by the Hub; staged shards never exceed two. The same command, once there is room,
    publishes exactly the conversion's files."""
    out = tmp_path / "out"
    sizes = [reference[s][0] for s in shard_names(reference)]
    with UploadHub(quota=300_000) as hub:
        done = publish(hub, source, out, "--no-keep-output", probe=tmp_path / "first.log")
        assert done.returncode == 1
        line = last_line(done)
        assert line.startswith("convert-fp8: error: acme/toy-FP8: the Hub refused the upload while uploading model-")
        assert "storage quota exceeded" in line
        assert [k for k in done.stderr.splitlines() if "quota" in k] == [line]  # not a note before it
        assert new_commits(hub) == []
        assert not (out / "config.json").exists() and (out / STAGING / "run.json").is_file()
        removed_are_held(out, hub, reference)
        hub.quota = None
        done = publish(hub, source, out, "--no-keep-output", probe=tmp_path / "second.log")
        assert done.returncode == 0, done.stderr
        assert_holds(hub.files_at(REPO), reference)
    assert shard_names(p.name for p in out.iterdir()) == []
    for log in ("first.log", "second.log"):
        assert probed(tmp_path / log)[1] <= bound(sizes), log


def test_large_copied_tensors_wait_for_room_on_the_disk(tmp_path):
    """--no-keep-output, each shard a quantized weight and a 256 KB copied tensor: the copy lane, far faster than
    the quantizing one, would copy every shard's large tensor while the first shard is still being written (4
    shards' data on disk when the first upload is held). The lanes write a shard only once every shard but the
    one before it is uploaded and removed: the staged shards stay within the two largest."""
    import json

    import torch
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for k in range(4):
        tensors[f"model.layers.{k}.mlp.up_proj.weight"] = torch.randn(512, 512, generator=gen).to(torch.bfloat16)
        tensors[f"model.layers.{k}.post_attention_layernorm.weight"] = torch.ones(131072, dtype=torch.bfloat16)
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "bfloat16"}))
    out = tmp_path / "out"
    with UploadHub(hold_after=0, abandon_held=False) as hub:
        running = publish(hub, src, out, "--no-keep-output", "--max-shard-size", "600KB", wait=False,
                          probe=tmp_path / "probe.log")
        assert hub.held.wait(120), running.communicate()[1] if running.poll() is not None else "no upload held"
        sizes = [513_000] * 4  # about: each shard a 256 KB FP8 weight, its scales and a 256 KB copy
        wait_for(lambda: probed(tmp_path / "probe.log")[1] > bound(sizes), 5)  # what the copy lane did before
        hub.release.set()
        _, err = running.communicate(timeout=300)
        assert running.returncode == 0, err
        files = hub.files_at(REPO)
    sizes = [files[s]["size"] for s in shard_names(files)]
    assert len(sizes) == 4 and min(sizes) > 500_000
    assert probed(tmp_path / "probe.log")[1] <= bound(sizes)


# --- 3. a blob the Hub lost ------------------------------------------------------------------------------------


def test_a_blob_the_hub_lost_is_sent_again_from_the_local_bytes(source, reference, tmp_path):
    """The commit fails (HTTP 500) with every blob uploaded; the Hub then loses one (garbage-collected). The
    rerun asks the Hub (one LFS batch request) which recorded blobs it holds, sends the lost one again from the
    output's bytes, and commits."""
    out = tmp_path / "out"
    with UploadHub(fail_commit=500) as hub:
        done = publish(hub, source, out)
        assert done.returncode == 1
        assert (out / PENDING_RECORD).is_file() and new_commits(hub) == []
        lost = reference["model-00002-of-00004.safetensors"][1]
        hub.drop_object(REPO, lost)
        hub.fail_commit = None
        puts = len([r for r in hub.requests if r[0] == "PUT"])
        done = publish(hub, source, out)
        assert done.returncode == 0, done.stderr
        assert [r[1] for r in hub.requests if r[0] == "PUT"][puts:] == [f"/lfs-upload/{REPO}/{lost}"]
        assert_holds(hub.files_at(REPO), reference)


def test_removed_shards_whose_blobs_the_hub_lost_are_converted_again(source, reference, tmp_path):
    """--no-keep-output, killed with 2 shards uploaded and removed; the repository is then deleted and created
    again (its LFS objects go with it). The rerun asks the Hub before converting, converts the 2 removed shards
    again (their blobs are gone) with the rest, and publishes exactly the conversion's files."""
    out = tmp_path / "out"
    with UploadHub(hold_after=2) as hub:
        running = publish(hub, source, out, "--no-keep-output", wait=False)
        assert hub.held.wait(120), running.communicate()[1] if running.poll() is not None else "no upload held"
        removed = lambda: sorted(n for n, b in staged_record(out).get("uploaded", {}).items() if b.get("removed"))
        assert wait_for(lambda: len(removed()) == 2)
        running.send_signal(signal.SIGKILL)
        running.wait()
        hub.release.set()
        hub.hold_after = None
        hub.delete_repo(REPO)
        done = publish(hub, source, out, "--no-keep-output", probe=tmp_path / "probe.log")
        assert done.returncode == 0, done.stderr
        assert_holds(hub.files_at(REPO), reference)
    hashed, _ = probed(tmp_path / "probe.log")
    assert sorted(hashed) == shard_names(reference)  # all 4 sent: the 2 removed ones converted again


# --- 4. a commit made whose answer was lost ------------------------------------------------------------------


def test_a_commit_whose_reply_is_lost_is_found_made(source, reference, tmp_path):
    """The Hub makes the commit and the connection drops before its answer: the client's retry is refused (HTTP
    412, the branch moved); the branch's tree holds exactly the output, so the run says it is published."""
    with UploadHub() as hub:
        hub.fault("commit", "lose")
        done = publish(hub, source, tmp_path / "out")
        assert done.returncode == 0, done.stderr
        assert ("commit", "lose") in hub.faulted
        assert len(new_commits(hub)) == 1
        assert_holds(hub.files_at(REPO), reference)
    assert not (tmp_path / "out" / PENDING_RECORD).exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
@pytest.mark.parametrize("keep", [True, False])
def test_a_run_stopped_during_its_commit_is_done_on_rerun(source, reference, tmp_path, sig, keep):
    """Killed (or Ctrl-C) while the Hub makes the commit: the rerun compares the branch's tree with the output and
    the record, finds them equal, says so and exits 0, committing nothing."""
    out = tmp_path / "out"
    args = () if keep else ("--no-keep-output",)
    with UploadHub(hold_commit=True) as hub:
        running = publish(hub, source, out, *args, wait=False)
        assert hub.held.wait(120), running.communicate()[1] if running.poll() is not None else "no commit held"
        running.send_signal(sig)
        running.wait(60)
        hub.hold_commit = False
        hub.release.set()
        assert running.returncode == (-9 if sig == signal.SIGKILL else 130)
        assert (out / PENDING_RECORD).is_file()
        done = publish(hub, source, out, *args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1].startswith(
            f"acme/toy-FP8 already holds exactly the 8 files of {out} (names, sizes and sha256 or git blob ids of its "
            "branch compared in ")
        assert len(new_commits(hub)) == 1
        assert_holds(hub.files_at(REPO), reference)
    assert not (out / PENDING_RECORD).exists()
    assert shard_names(p.name for p in out.iterdir()) == (shard_names(reference) if keep else [])


@pytest.mark.parametrize("keep", [True, False])
def test_a_finished_publish_run_again_exits_0(source, reference, tmp_path, keep):
    """The same command after it finished: the repository holds exactly this output, so it says so and exits 0,
    with no new commit; another output in --dst is still refused."""
    out = tmp_path / "out"
    args = () if keep else ("--no-keep-output",)
    with UploadHub() as hub:
        assert publish(hub, source, out, *args).returncode == 0
        done = publish(hub, source, out, *args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1].startswith(f"acme/toy-FP8 already holds exactly the {8 if keep else 4} "
                                                       f"files of {out} ")
        assert len(new_commits(hub)) == 1
        (out / "config.json").write_text("{}")
        done = publish(hub, source, out, *args)
        assert done.returncode == 1
        assert last_line(done).startswith("convert-fp8: error: acme/toy-FP8: the repository already holds 8 file(s)")


# --- 6. messages -----------------------------------------------------------------------------------------------


def test_a_refusal_of_the_lfs_batch_endpoint_says_its_reason(source, tmp_path):
    """The batch endpoint refuses an object (a size limit): its own reason, and no advice to rerun as is."""
    with UploadHub() as hub:
        hub.fault("batch", "refuse", times=100)
        done = publish(hub, source, tmp_path / "out")
    assert done.returncode == 1
    line = last_line(done)
    assert line.startswith("convert-fp8: error: acme/toy-FP8: the Hub refused the upload while uploading model-")
    assert line.endswith(".safetensors: File exceeds the maximum size allowed by the stand-in"), line


def test_an_unreachable_hub_before_any_upload_does_not_speak_of_uploaded_blobs(tmp_path):
    from converter.publish import Publisher, PublishOptions

    publisher = Publisher(PublishOptions(REPO), tmp_path / "dst", {})
    message = str(publisher._error(ConnectionRefusedError("refused"), "checking the token", tries=1))
    assert message.startswith("acme/toy-FP8: cannot reach the Hub at ")
    assert message.endswith(" while checking the token, after 6 tries with backoff; nothing was uploaded yet: rerun "
                            "the same command")
    publisher.uploaded["model.safetensors"] = {"sha256": "0" * 64, "size": 1}
    assert str(publisher._error(ConnectionRefusedError("refused"), "uploading model.safetensors")).endswith(
        "; the uploaded blobs stay on the Hub: rerun the same command to resume the upload")


# --- the fault matrix ----------------------------------------------------------------------------------------

KINDS = ("whoami", "create", "info", "preupload", "batch", "put", "part", "complete", "verify", "tree", "commit")
HOWS = ("refuse", "quota", "drop", "lose")


def settles(hub, source, reference, out, tmp_path, args, first) -> None:
    """The invariant after a run that met a fault or a stop: either it published exactly the conversion, or it
    exited non-zero with its error as its last line, nothing committed, every shard recorded as removed held by
    the Hub; and the same command, run again without the fault, publishes exactly the conversion, in one commit."""
    if first.returncode != 0:
        assert first.returncode in (1, 130, -9), first.stderr
        if first.returncode == 1:
            line = last_line(first)
            assert line.startswith("convert-fp8: error: acme/toy-FP8") and "Traceback" not in first.stderr, line
        removed_are_held(out, hub, reference)
        hub.faults.clear()
        again = publish(hub, source, out, *args, probe=tmp_path / "again.log")
        assert again.returncode == 0, (last_line(first), again.stderr)
    assert_holds(hub.files_at(REPO), reference)
    assert len(new_commits(hub)) == 1
    assert not (out / PENDING_RECORD).exists() and not (out / STAGING).exists()
    assert shard_names(p.name for p in out.iterdir()) == (shard_names(reference) if not args else [])
    if args:  # --no-keep-output: the bound on staged shards, in every run
        sizes = [reference[s][0] for s in shard_names(reference)]
        for log in ("first.log", "again.log"):
            assert probed(tmp_path / log)[1] <= bound(sizes), log


@pytest.mark.slow
@pytest.mark.parametrize("keep", [True, False], ids=["keep", "no-keep"])
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_fault_of_each_hub_request(source, reference, tmp_path, kind, how, keep):
    """Each kind of Hub request meets each fault: refused (HTTP 400; an object error in a batch answer) and over
    quota (HTTP 402; an object error) until the fault is lifted; a dropped connection and a lost reply once
    (`part` and `complete` with multipart uploads)."""
    out = tmp_path / "out"
    args = () if keep else ("--no-keep-output",)
    with UploadHub(chunk_size=100_000 if kind in ("part", "complete") else None) as hub:
        hub.fault(kind, how, times=1000 if how in ("refuse", "quota") else 1)
        first = publish(hub, source, out, *args, probe=tmp_path / "first.log")
        assert hub.faulted and hub.faulted[0] == (kind, how)  # the fault was met
        settles(hub, source, reference, out, tmp_path, args, first)


@pytest.mark.slow
@pytest.mark.parametrize("keep", [True, False], ids=["keep", "no-keep"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("phase", ["converting", "uploading", "committing"])
def test_a_stop_in_each_phase(source, reference, tmp_path, phase, sig, keep):
    """SIGKILL or Ctrl-C while converting (after the 3rd piece is recorded), while a blob is being uploaded (the
    stand-in holds the second upload) and while the Hub makes the commit (it holds its answer)."""
    out = tmp_path / "out"
    args = () if keep else ("--no-keep-output",)
    hub_options = {"uploading": {"hold_after": 1}, "committing": {"hold_commit": True}}.get(phase, {})
    with UploadHub(**hub_options) as hub:
        if phase == "converting":
            mode = ["pieces", "3"] if sig == signal.SIGKILL else ["interrupt", "3", str(tmp_path / "marker")]
            first = publish(hub, source, out, *args, runner=["tests/kill_after.py", *mode])
        else:
            running = publish(hub, source, out, *args, wait=False)
            assert hub.held.wait(120), running.communicate()[1] if running.poll() is not None else "nothing held"
            running.send_signal(sig)
            _, err = running.communicate(timeout=60)
            first = subprocess.CompletedProcess(running.args, running.returncode, "", err)
            hub.hold_after, hub.hold_commit = None, False
            hub.release.set()
        assert first.returncode == (-9 if sig == signal.SIGKILL else 130), first.stderr
        (tmp_path / "first.log").touch()
        settles(hub, source, reference, out, tmp_path, args, first)
