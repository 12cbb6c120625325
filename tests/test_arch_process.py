"""Transformers asked from a child process: the same answers as in-process, the import's files recorded for the
next child, and a child that dies gives a one-line reason, never a hang."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from converter import arch, arch_process

from .conftest import read_json, tiny_llama
from .model_zoo import save_family

ROOT = Path(__file__).resolve().parent.parent

# a process that never imports transformers itself: the conversion's case
ASK = """
import json, sys
from converter import arch
config, names = json.load(sys.stdin)
found = arch.placement(config, names)
peak = arch.release()
print(json.dumps({"tensors": found.tensors, "unset": found.unset, "imported_here": "transformers" in sys.modules,
                  "child_peak": peak}))
"""


def ask_in_fresh_process(config: dict, names: list[str], cache: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", ASK], input=json.dumps([config, names]), capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, **{arch.CACHE_ENV: str(cache)}), timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def fp8_config(src: Path) -> tuple[dict, list[str]]:
    config = read_json(src / "config.json")
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    names = sorted(read_json(src / "model.safetensors.index.json")["weight_map"])
    return config, names


def test_a_child_answers_as_transformers_does_here_and_records_its_import(tmp_path):
    src = tiny_llama(tmp_path / "llama")
    config, names = fp8_config(src)
    cache = tmp_path / "cache"
    answered = ask_in_fresh_process(config, names, cache)
    assert answered["imported_here"] is False  # asked of the child
    assert answered["child_peak"] > 100 * 2**20  # torch and transformers were imported there
    here = arch._placement(config, names)  # in this process, where transformers is imported
    assert {n: list(v) for n, v in here["tensors"].items()} == answered["tensors"]
    assert answered["tensors"]["model.layers.0.mlp.down_proj.weight"][0] == arch.FP8
    record = list((cache / "imports").glob("*.txt"))
    assert len(record) == 1
    opened = record[0].read_text().splitlines()
    assert any("/transformers/models/llama/" in p for p in opened), opened[:5]
    # the next child (another question, the record read first) answers the same way
    config["num_hidden_layers"] = 1
    again = ask_in_fresh_process(config, [n for n in names if ".layers.1." not in n], cache)
    assert again["tensors"]["model.layers.0.self_attn.q_proj.weight"][0] == arch.FP8
    assert again["unset"] and not [p for p in again["unset"] if ".layers.0." not in p]  # one layer built


@pytest.mark.parametrize("model_type", ["qwen3_moe", "granitemoe", "deepseek_v3", "gpt2"])
def test_the_child_answers_as_this_process_for_experts_routers_and_conv1d(model_type, tmp_path, monkeypatch):
    """The child hides triton from torch (it only compiles GPU kernels): the answers are still transformers' own
    here, for fused and per-expert experts, routers and GPT-2's Conv1D."""
    monkeypatch.setenv(arch.CACHE_ENV, str(tmp_path / "cache"))
    config, names = fp8_config(save_family(model_type, tmp_path / model_type))
    stored = sorted({n.rpartition(".")[0] for n in names})
    per_expert = sorted(m for m in stored if arch._PER_EXPERT_LINEAR.match(m))
    child = arch_process.Child("converter.arch")
    try:
        placed = child.ask("placement", [config, names])
        linears = child.ask("linear-modules", [config, per_expert])
    finally:
        child.close()
    here = arch._placement(config, names)
    assert placed == json.loads(json.dumps(here))
    fp8 = [name for name, (role, _, _) in placed["tensors"].items() if role == arch.FP8]
    assert fp8 if model_type != "gpt2" else not fp8  # GPT-2's Conv1D is not a Linear transformers converts
    assert linears == arch._linear_modules(config, per_expert) and linears["modules"]


def test_a_child_that_ends_without_answering_says_why(tmp_path):
    child = arch_process.Child("converter.no_such_module")
    with pytest.raises(arch_process.ChildGone, match=r"^exit 1: .*No module named converter.no_such_module"):
        child.ask("placement", [{}, []])
    child.kill()


def test_a_child_that_dies_gives_an_unknown_answer_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "transformers", raising=False)  # as in the conversion's process: a child is asked
    monkeypatch.setattr(arch, "_child", arch_process.Child("converter.no_such_module"))
    answer = arch._compute("placement", [{}, []])
    assert answer["cacheable"] is False
    assert answer["unknown"].startswith("the process asking transformers ended without an answer (exit 1:")
    assert arch._child is None


def test_a_failed_run_kills_the_child_mid_import_and_does_not_wait_for_it(tmp_path, monkeypatch):
    monkeypatch.setenv(arch.CACHE_ENV, str(tmp_path / "cache"))
    config, names = fp8_config(tiny_llama(tmp_path / "llama"))
    monkeypatch.delitem(sys.modules, "transformers", raising=False)  # as in the conversion's process
    answers = []
    asking = threading.Thread(target=lambda: answers.append(arch._compute("placement", [config, names])))
    asking.start()
    time.sleep(0.5)  # the child is importing torch (seconds)
    started = time.monotonic()
    arch.release(now=True)
    asking.join(5)
    assert not asking.is_alive() and time.monotonic() - started < 2
    assert answers[0]["unknown"].startswith("the process asking transformers ended without an answer (exit -9")
