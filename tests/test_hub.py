"""Hub sources against a local stand-in for the Hub: the revision resolved to one commit, every file read at it,
and each kind of Hub failure as its own one-line message."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from converter.configs import INDEX_NAME

from .fake_hub import COMMIT, FakeHub

SNIPPET = """
import json, sys
from converter.errors import ConvertError
from converter.hub import HubRepo
from converter.source import open_hub_source
try:
    source = open_hub_source(HubRepo(sys.argv[1], sys.argv[2] or None))
    for name in sys.argv[3:]:
        source.provider.fetch(name)
except ConvertError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"commit": source.commit, "copy": source.files_to_copy, "skipped": source.files_skipped,
                      "shards": source.shards, "root": str(source.root), "warnings": source.warnings}))
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A small sharded checkpoint laid out as Llama repositories are, with the weights again under original/."""
    path = tmp_path_factory.mktemp("hub-repo")
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, name in enumerate(["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({name: torch.randn(64, 64, generator=gen).to(torch.bfloat16)}, path / shard)
        weight_map[name] = shard
    (path / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    (path / "tokenizer.json").write_text("{}")
    (path / "README.md").write_text("---\nlicense: llama3.2\n---\n# toy\n")
    (path / "original").mkdir()
    (path / "original" / "consolidated.00.pth").write_bytes(b"\0" * 4096)
    (path / "original" / "params.json").write_text("{}")
    return path


def open_via_hub(hub: FakeHub, cache: Path, repo_id: str = "acme/toy", revision: str = "", offline: bool = False,
                 fetch: tuple[str, ...] = ()):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_XET="1")
    env.pop("HF_TOKEN", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-c", SNIPPET, repo_id, revision, *fetch], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_the_revision_is_resolved_once_and_every_file_read_at_its_commit(repo, tmp_path):
    with FakeHub("acme/toy", repo) as hub:
        got = open_via_hub(hub, tmp_path / "hub")
    assert got["commit"] == COMMIT
    # the revision (main) is asked for once, with the config; every other request names the commit
    at_main = [(m, p) for m, p, r in hub.requests if "acme/toy" in p and f"/{COMMIT}" not in p]
    assert {p for m, p in at_main} == {"/acme/toy/resolve/main/config.json"}
    assert len([p for m, p, r in hub.requests if "/tree/" in p]) == 1
    assert got["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert got["copy"] == ["original/params.json", "tokenizer.json"]
    assert got["skipped"] == [["README.md", "replaced by the FP8 model card"],
                              ["original/consolidated.00.pth", "another copy of the unquantized weights"]]
    assert Path(got["root"]).name == COMMIT
    # nothing of original/consolidated.00.pth was fetched
    assert not [p for m, p, r in hub.requests if p.endswith(".pth")]


def test_a_branch_is_resolved_to_its_commit_and_offline_from_the_cache(repo, tmp_path):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    with FakeHub("acme/toy", repo) as hub:
        online = open_via_hub(hub, tmp_path / "hub", revision="main", fetch=(*shards, "tokenizer.json"))
        assert online["commit"] == COMMIT and online["warnings"] == []
        assert ("HEAD", "/acme/toy/resolve/main/config.json", None) in hub.requests
        count = len(hub.requests)
        offline = open_via_hub(hub, tmp_path / "hub", offline=True)
        assert len(hub.requests) == count  # offline: not one request
    assert offline["commit"] == COMMIT and offline["shards"] == shards
    assert offline["copy"] == ["tokenizer.json"]  # original/params.json was never downloaded: offline, it is unknown
    assert offline["warnings"] == ["offline (HF_HUB_OFFLINE is set): the files copied besides the weights are those "
                                   "the local Hugging Face cache holds for acme/toy"]


@pytest.mark.parametrize("kind, repo_id, revision, message", [
    ("gated", "acme/toy", "", "acme/toy: gated repository: open {url}/acme/toy logged in, accept its conditions and "
                              "wait for access to be granted, then set HF_TOKEN to a token of that account (or run "
                              "`hf auth login`)"),
    ("plain", "acme/other", "", "acme/other: repository not found, or private and HF_TOKEN is not set to a token "
                                "with access to it"),
    ("plain", "acme/toy", "v9", "acme/toy@v9: revision 'v9' not found (give a branch, tag or commit of the "
                                "repository)"),
    ("fail_listing", "acme/toy", "", "acme/toy: the Hub answered HTTP 403 for the file listing"),
])
def test_hub_failures_are_told_apart(repo, tmp_path, kind, repo_id, revision, message):
    with FakeHub("acme/toy", repo, gated=kind == "gated", fail_listing=403 if kind == "fail_listing" else None) as hub:
        got = open_via_hub(hub, tmp_path / "hub", repo_id=repo_id, revision=revision)
    assert got == {"error": message.format(url=hub.url)}


def test_a_repository_without_safetensors_weights(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "config.json").write_text("{}")
    (tmp_path / "repo" / "pytorch_model.bin").write_bytes(b"\0")
    with FakeHub("acme/toy", tmp_path / "repo") as hub:
        got = open_via_hub(hub, tmp_path / "hub")
    assert got == {"error": f"acme/toy: no {INDEX_NAME} and no model.safetensors in it: not a safetensors checkpoint"}


def convert_from_hub(repo: Path, tmp_path: Path, *args: str) -> None:
    """`convert-fp8 --src acme/toy --dst tmp_path/out ARGS` in a process, online against the stand-in Hub."""
    with FakeHub("acme/toy", repo) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_DISABLE_XET="1",
                   CONVERT_FP8_NO_PROGRESS="1")
        env.pop("HF_HUB_OFFLINE", None)
        done = subprocess.run([sys.executable, "-m", "converter.cli", "--src", "acme/toy", "--dst",
                               str(tmp_path / "out"), "--no-arch-check", "-q", *args], capture_output=True,
                              text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_converted_hub_repository_names_its_base_and_commit_in_the_card(repo, tmp_path):
    convert_from_hub(repo, tmp_path)
    card = (tmp_path / "out" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {"license": "llama3.2", "base_model": "acme/toy", "base_model_relation": "quantized",
                    "tags": ["fp8", "convert-fp8"]}
    assert f"version of `acme/toy` at commit `{COMMIT}`" in card
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) == [
        "README.md", "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json",
        "original/params.json", "tokenizer.json"]


def test_an_index_naming_a_shard_outside_the_top_level_is_refused(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "config.json").write_text("{}")
    (tmp_path / "repo" / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": "../../x.safetensors"}}))
    with FakeHub("acme/toy", tmp_path / "repo") as hub:
        got = open_via_hub(hub, tmp_path / "hub")
    assert got == {"error": f"acme/toy: {INDEX_NAME} names shard '../../x.safetensors', which is not a .safetensors "
                            "file at the top of the repository"}


def test_the_run_record_holds_the_resolved_commit(repo, tmp_path):
    """A resume or a later part must read the same commit: run.json records it, and it is part of the identity."""
    convert_from_hub(repo, tmp_path, "--max-shard-size", "6000", "--part", "1/2")
    record = json.loads((tmp_path / "out" / ".convert-fp8.partial" / "run.json").read_text())
    assert record["source_stamp"] == {"commit": COMMIT} and record["src"] == "acme/toy"
