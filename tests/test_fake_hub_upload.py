"""The stand-in Hub's upload endpoints (`fake_hub_upload.UploadHub`) driven by huggingface_hub's own client, in
the process: each behaviour `--push-to-hub` depends on answers as the client expects it to."""

import hashlib

import pytest

from .fake_hub_upload import UploadHub, git_blob_id, gitignored

REPO = "acme/stand-in"


@pytest.fixture
def client(monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import HfApi

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the LFS path
    with UploadHub(chunk_size=1000) as hub:
        api = HfApi(endpoint=hub.url, token="hf_write")
        api.create_repo(REPO)
        yield hub, api


def test_gitignore_rules():
    assert gitignored("train.log", "*.log\n")
    assert gitignored("logs/a.txt", "logs/\n") and not gitignored("logs", "logs/\n")
    assert not gitignored("keep.log", "*.log\n!keep.log\n")
    assert gitignored("a/b.safetensors", "*.safetensors") and not gitignored("b/a.bin", "/a.bin")


def test_preupload_answers_should_ignore_and_the_oid_of_held_files(client):
    from huggingface_hub import CommitOperationAdd

    hub, api = client
    api.upload_file(path_or_fileobj=b"*.log\n", path_in_repo=".gitignore", repo_id=REPO)
    api.upload_file(path_or_fileobj=b"# card\n", path_in_repo="README.md", repo_id=REPO)
    weights = bytes(range(256)) * 10
    api.upload_file(path_or_fileobj=weights, path_in_repo="w.safetensors", repo_id=REPO)
    ops = [CommitOperationAdd(p, c) for p, c in [("train.log", b"x"), ("README.md", b"# card\n"),
                                                  ("w.safetensors", weights), ("new.json", b"{}")]]
    api.preupload_lfs_files(REPO, additions=ops)
    assert [op._should_ignore for op in ops] == [True, False, False, False]
    assert [op._upload_mode for op in ops] == ["regular", "regular", "lfs", "regular"]
    assert ops[1]._remote_oid == git_blob_id(b"# card\n") == ops[1]._local_oid
    assert ops[2]._remote_oid == hashlib.sha256(weights).hexdigest() == ops[2]._local_oid
    assert ops[3]._remote_oid is None
    # the client leaves out of a commit what did not change (here: no commit at all), and what is ignored
    before = len(hub.commits)
    api.create_commit(REPO, [CommitOperationAdd("README.md", b"# card\n")], commit_message="nothing")
    assert len(hub.commits) == before
    api.create_commit(REPO, [CommitOperationAdd("train.log", b"x"), CommitOperationAdd("new.json", b"{}")],
                      commit_message="two")
    assert sorted(hub.files_at(REPO)) == [".gitattributes", ".gitignore", "README.md", "new.json", "w.safetensors"]


def test_large_objects_take_the_multipart_path_and_belong_to_their_repository(client):
    hub, api = client
    data = bytes(range(256)) * 10  # 2560 bytes: 3 parts of at most 1000
    api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id=REPO)
    sha = hashlib.sha256(data).hexdigest()
    assert [p for m, p, _ in hub.requests if m == "PUT"] == [f"/lfs-part/{REPO}/{sha}/{k}" for k in (1, 2, 3)]
    assert [p for m, p, _ in hub.requests if "lfs-complete" in p] == [f"/lfs-complete/{REPO}/{sha}"]
    assert hub.files_at(REPO)["w.safetensors"] == {"size": 2560, "sha256": sha, "content": None}
    tree = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)}
    assert (tree["w.safetensors"].lfs.sha256, tree["w.safetensors"].lfs.size) == (sha, 2560)
    # another repository does not hold it: its batch answer asks for the upload
    from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info

    api.create_repo("acme/other")
    info = UploadInfo(size=2560, sample=b"", sha256=bytes.fromhex(sha))
    held = lambda repo: [a.get("actions") is None for a in post_lfs_batch_info(
        [info], token=None, repo_type="model", repo_id=repo, endpoint=hub.url, headers=api._build_hf_headers())[0]]
    assert held(REPO) == [True] and held("acme/other") == [False]
    api.delete_repo(REPO)  # its objects go with it
    api.create_repo(REPO)
    assert held(REPO) == [False] and hub.objects == {}


def test_a_commit_can_be_made_and_lose_its_answer(client):
    from huggingface_hub import CommitOperationAdd

    hub, api = client
    hub.fault("commit", "lose")
    with pytest.raises(Exception) as raised:
        api.create_commit(REPO, [CommitOperationAdd("config.json", b"{}")], commit_message="lost")
    assert "disconnected" in str(raised.value).lower() or "connection" in type(raised.value).__name__.lower() \
        or raised.value.__class__.__module__.startswith(("httpx", "httpcore", "requests")), repr(raised.value)
    assert hub.files_at(REPO)["config.json"]["content"] == b"{}"  # made all the same
