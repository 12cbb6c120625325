"""Hostile safetensors headers and indexes: every one is refused in one line naming the file and what is wrong,
never with an internal exception. A seeded fuzzer mutates a real header in many ways."""

import json
import random
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from converter.errors import SourceError
from converter.source import read_header

from .conftest import run_cli

INTERNAL = re.compile(r"\b\w*(Error|Exception)\b|Traceback|--debug")

HOSTILE_VALUES = [None, True, False, -1, 1.5, "12", "", [], {}, [1, 2, 3], [-1], [1.0, 2.0], 2**70, 10**30,
                  -(2**63), "F8_E4M3", "XX", [[[[]]]], {"dtype": "BF16"}, [2**62, 2**62, 2**62], [0, 2**64]]


def real_header(tmp_path):
    """A small real shard's header (as a dict) and its data bytes."""
    path = tmp_path / "real.safetensors"
    save_file({"a.weight": torch.ones(4, 8, dtype=torch.bfloat16), "b.weight": torch.zeros(8, dtype=torch.float32),
               "c.bias": torch.ones(2, 2, dtype=torch.float16)}, path, metadata={"format": "pt"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def shard_bytes(header_json: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header_json) if length is None else length) + header_json + data


def mutate(rng: random.Random, header: dict, data: bytes) -> bytes:
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    kind = rng.randrange(9)
    if kind == 2 and len(names) < 2:
        kind = 0
    if kind == 0:  # a field replaced by a value of another type or range
        entry = header[rng.choice(names)]
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(HOSTILE_VALUES)
    elif kind == 1:  # a field removed, or the whole entry replaced
        name = rng.choice(names)
        if rng.random() < 0.5:
            del header[name][rng.choice(["dtype", "shape", "data_offsets"])]
        else:
            header[name] = rng.choice(HOSTILE_VALUES)
    elif kind == 2:  # two tensors over the same bytes, or offsets past the end
        a, b = rng.sample(names, 2)
        header[a]["data_offsets"] = list(header[b]["data_offsets"]) if rng.random() < 0.5 else [0, 10**12]
    elif kind == 3:  # metadata of the wrong shape
        header["__metadata__"] = rng.choice([[1], "x", {"format": 1}, {"format": None}, 7])
    elif kind == 4:  # a header that is not an object
        header = rng.choice([[header], "header", 3, None])
    elif kind == 5:  # huge or very many dimensions
        entry = header[rng.choice(names)]
        entry["shape"] = rng.choice([[2**62] * 40, [1] * 100000, [10**300, 10**300], [3] * 5000])
    text = json.dumps(header).encode()
    if kind == 6:  # deep nesting
        depth = rng.choice([1000, 100000])
        text = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == 7:  # bytes cut or flipped
        text = bytearray(text)
        for _ in range(rng.randrange(1, 4)):
            text[rng.randrange(len(text))] = rng.randrange(256)
        text = bytes(text[: rng.randrange(1, len(text) + 1)])
    elif kind == 8:  # a length field that lies
        return shard_bytes(text, data, length=rng.choice([0, 1, len(text) + 1, 2**63, len(text) + len(data) + 9]))
    return shard_bytes(text, data)


def test_a_thousand_mutated_headers_are_each_read_or_refused_in_one_line(tmp_path):
    header, data = real_header(tmp_path)
    rng = random.Random(20261127)
    path = tmp_path / "model.safetensors"
    refused = 0
    for case in range(1000):
        path.write_bytes(mutate(rng, header, data))
        try:
            read_header(path)
        except SourceError as exc:
            message = str(exc)
            refused += 1
            assert message.startswith(f"{path}: "), (case, message)
            assert "\n" not in message and len(message) < 400, (case, message)
            assert not INTERNAL.search(message), (case, message)
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case}: {type(exc).__name__}: {str(exc)[:200]}")
    assert refused > 900  # nearly every mutation breaks the header; the few that do not still parse


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "BF16", "shape": "32", "data_offsets": [0, 64]}, "bad shape or offsets for 'a.weight'"),
    ({"dtype": "BF16", "shape": [4, 8.0], "data_offsets": [0, 64]}, "bad shape or offsets for 'a.weight'"),
    ({"dtype": "BF16", "shape": [4, True], "data_offsets": [0, 64]}, "bad shape or offsets for 'a.weight'"),
    ({"dtype": ["BF16"], "shape": [4, 8], "data_offsets": [0, 64]}, "has dtype \"['BF16']\", which this tool"),
    ({"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64, 1]}, "bad shape or offsets for 'a.weight'"),
    ({"dtype": "BF16", "shape": [2**62] * 40, "data_offsets": [0, 64]}, "is BF16[4611686018427387904, "),
])
def test_each_wrong_type_has_its_message(tmp_path, entry, message):
    header, data = real_header(tmp_path)
    header["a.weight"] = entry
    path = tmp_path / "x.safetensors"
    path.write_bytes(shard_bytes(json.dumps(header).encode(), data))
    with pytest.raises(SourceError) as raised:
        read_header(path)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)


def test_overlapping_tensors_are_refused(tmp_path):
    header, data = real_header(tmp_path)
    header["c.bias"]["data_offsets"] = list(header["a.weight"]["data_offsets"][:1]) + [
        header["a.weight"]["data_offsets"][0] + 8]
    path = tmp_path / "x.safetensors"
    path.write_bytes(shard_bytes(json.dumps(header).encode(), data))
    with pytest.raises(SourceError, match=r"corrupt header: tensors '(a.weight|c.bias)' and '(a.weight|c.bias)' "
                                          r"share bytes$"):
        read_header(path)


@pytest.mark.parametrize("shard_text, cause", [
    ('"../outside.safetensors"', "'../outside.safetensors' is not a .safetensors file name in the source folder"),
    ('["model.safetensors"]', "\"['model.safetensors']\" is not a .safetensors file name in the source folder"),
    ("7", "'7' is not a .safetensors file name in the source folder"),
])
def test_hostile_index_entries_are_refused(gemma_copy, shard_text, cause):
    index = gemma_copy / "model.safetensors.index.json"
    text = json.loads(index.read_text())
    first = next(iter(text["weight_map"]))
    raw = json.dumps(text).replace(f'"{first}": "{text["weight_map"][first]}"', f'"{first}": {shard_text}')
    index.write_text(raw)
    result = run_cli("--src", gemma_copy, "--dst", gemma_copy.parent / "out", "--dry-run")
    assert result.exit_code == 1
    assert result.stderr == f"convert-fp8: error: {index}: corrupt index: {cause}\n"


def test_mutated_headers_through_the_cli_end_in_one_line(gemma_copy, tmp_path):
    """The same fuzzer on one shard of a real checkpoint, through planning: no path ends in an internal error."""
    shard = max(gemma_copy.glob("*.safetensors"), key=lambda p: len(read_header(p).tensors))
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    rng = random.Random(7)
    for case in range(40):
        shard.write_bytes(mutate(rng, header, data))
        result = run_cli("--src", gemma_copy, "--dst", tmp_path / "out", "--dry-run", "--no-arch-check")
        assert result.exit_code in (0, 1), (case, result.output)
        if result.exit_code:
            assert result.stderr.startswith(f"convert-fp8: error: {shard}: "), (case, result.stderr)
            assert result.stderr.count("\n") == 1 and not INTERNAL.search(result.stderr), (case, result.stderr)
