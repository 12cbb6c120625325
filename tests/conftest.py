"""Shared fixtures: small real checkpoints saved by transformers, and a CLI runner."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from converter.cli import main
from converter.configs import INDEX_NAME
from converter.demo import build_gemma4_checkpoint

# A shell without job control (`cmd &` in a script, some CI runners) starts the tests with SIGINT ignored, and every
# command they start would inherit that and outlive the Ctrl-C the tests send: Ctrl-C is restored here, as in a
# terminal (a handler, unlike SIG_IGN, is reset to the default in each started command).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_cli(*args: str):
    """Run `convert-fp8 ARGS` in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(main, [str(a) for a in args], env={"CONVERT_FP8_NO_PROGRESS": "1"})


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path: to prove a folder was not touched."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def gemma_src(tmp_path_factory) -> Path:
    """Tiny Gemma-4 with the 31B structure, in 23 shards, plus a sub-folder and a model card."""
    path = build_gemma4_checkpoint(tmp_path_factory.mktemp("gemma") / "gemma-4-tiny")
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
    (path / "README.md").write_text("# the source card\n")
    return path


@pytest.fixture(scope="session")
def gemma_dst(gemma_src, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("gemma-out") / "fp8"
    result = run_cli("--src", gemma_src, "--dst", dst, "--max-shard-size", "300KB")
    assert result.exit_code == 0, result.output
    return dst


@pytest.fixture
def gemma_copy(gemma_src, tmp_path) -> Path:
    """A private copy of the Gemma source, to damage."""
    return Path(shutil.copytree(gemma_src, tmp_path / "src"))


def save_model(model, path: Path, max_shard_size: str = "50KB") -> Path:
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def tiny_llama(path: Path, dtype=torch.bfloat16, intermediate_size: int = 192, tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=intermediate_size, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)
    return save_model(LlamaForCausalLM(cfg).to(dtype), path)


def tiny_bert(path: Path, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=64)
    return save_model(BertForMaskedLM(cfg).to(torch.bfloat16), path)


def locate(folder: Path, name: str):
    """(shard path, TensorInfo) of tensor `name` in a checkpoint folder, from the headers."""
    from converter.source import read_header

    for shard in sorted(folder.glob("model-*.safetensors")):
        header = read_header(shard)
        if name in header.tensors:
            return shard, header.tensors[name]
    raise AssertionError(f"{name} is in no shard of {folder}")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own cache of architecture checks (nothing from the user's home)."""
    monkeypatch.setenv("CONVERT_FP8_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def synthetic(path: Path, layers: int = 3, seed: int = 0) -> Path:
    """A Llama-shaped checkpoint of real-looking widths (about 60 MB) in several shards, no architecture."""
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    weight_map = {}
    tensors = {"model.embed_tokens.weight": (4096, 1024)}
    for i in range(layers):
        for name, shape in [("self_attn.q_proj", (1024, 1024)), ("self_attn.o_proj", (1024, 1024)),
                            ("mlp.up_proj", (2816, 1024)), ("mlp.down_proj", (1024, 2816))]:
            tensors[f"model.layers.{i}.{name}.weight"] = shape
        tensors[f"model.layers.{i}.input_layernorm.weight"] = (1024,)
    names = list(tensors)
    for k in range(3):
        shard = f"model-{k + 1:05d}-of-00003.safetensors"
        part = {n: (torch.randn(tensors[n], generator=gen) * 0.02).to(torch.bfloat16) for n in names[k::3]}
        save_file(part, path / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 1024}))
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture(scope="session")
def toy_src(tmp_path_factory) -> Path:
    """The Llama-shaped `synthetic` checkpoint, shared read-only by the long-run and lane tests."""
    return synthetic(tmp_path_factory.mktemp("synthetic") / "toy")


@pytest.fixture(scope="session")
def toy_reference(toy_src, tmp_path_factory) -> Path:
    """An uninterrupted conversion of `toy_src`, in 20 MB shards: what every interrupted run must end up equal to."""
    dst = tmp_path_factory.mktemp("reference") / "out"
    result = run_cli("--src", toy_src, "--dst", dst, "--max-shard-size", "20MB", "--no-arch-check")
    assert result.exit_code == 0, result.output
    return dst


def pytest_terminal_summary(terminalreporter):
    """The family x dialect matrix, when its test ran (tests/test_matrix.py)."""
    import sys

    matrix = sys.modules.get("tests.test_matrix")
    lines = matrix.format_matrix() if matrix is not None else []
    if lines:
        terminalreporter.section("every family in every dialect")
        for line in lines:
            terminalreporter.write_line(line)
