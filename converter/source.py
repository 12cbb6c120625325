"""The source checkpoint: headers into a `SourceIndex`, then one tensor (or stripe of rows) at a time.

Only safetensors headers are parsed up front; data is read on demand with `os.pread`, from at most one open
shard, so memory never depends on the size of the model or of its shards.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


from .configs import CARD_NAME, CONFIG_NAME, DTYPE_SIZES, INDEX_NAME
from .errors import SourceError, os_reason

SINGLE_FILE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit

# Files that hold weights in another container, at any depth (Llama repositories carry the whole model again as
# `original/consolidated.00.pth`): copying them would ship the unquantized model, often tens of GB, beside the
# FP8 one, and some loaders would pick them up.
_OTHER_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt", ".onnx",
                          ".onnx_data", ".ot", ".tflite")
_NEVER_COPIED_DIRS = {".git", ".cache", ".huggingface"}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor's bytes are: shard file, absolute offset and length, with its dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardHeader:
    """One parsed safetensors header."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


class ShardProvider(Protocol):
    """Where a remote source's files come from (`hub.HubRepo`): this module reads through it and never imports
    it, so the Hub client depends on the source reader and not the other way."""

    repo_id: str
    commit: str | None  # set by `config()`, which resolves the requested revision once
    snapshot: Path | None
    warnings: list[str]

    def config(self) -> dict: ...

    def shard_names(self) -> tuple[list[str], dict | None]: ...

    def header(self, shard: str) -> ShardHeader: ...

    def other_files(self) -> list[str]: ...

    def fetch(self, filename: str) -> Path: ...

    def ensure(self, shard: str) -> Path: ...

    def prefetch_after(self, shard: str) -> None: ...


@dataclass(frozen=True)
class SourceIndex:
    """A source checkpoint as read from its headers, index and config; no tensor data.

    `tensors` is in read order: shard by shard (sorted names), then by offset within each shard.
    """

    root: Path
    config: dict
    tensors: dict[str, TensorInfo]
    shards: tuple[str, ...]
    files_to_copy: tuple[str, ...]  # relative paths, copied unchanged
    files_skipped: tuple[tuple[str, str], ...] = ()  # (relative path, why)
    warnings: tuple[str, ...] = field(default=())
    provider: ShardProvider | None = None  # a HubRepo when the shards are fetched on demand
    name: str | None = None  # the Hub repo id, for a Hub source
    commit: str | None = None  # the Hub commit every file is read at (resolved once); None for a local folder

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def stored_nbytes(self, name: str) -> int:
        """The bytes a tensor is read from (a decoded view's FP8 weight: its codes and scales)."""
        return self.tensors[name].nbytes

    @property
    def stored(self) -> SourceIndex:
        """The checkpoint as its files hold it (a decoded view's FP8 checkpoint)."""
        return self


def read_header(path: Path) -> ShardHeader:
    """Parse and check one safetensors header.

    Raises:
        SourceError: the file is missing, truncated, or its header is not a valid safetensors header.
    """
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SourceError(f"{path}: truncated: {file_size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, file_size - 8):
                raise SourceError(
                    f"{path}: corrupt header: its length field says {header_len} bytes but the file has "
                    f"{file_size - 8} after it"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise SourceError(f"{path}: shard not found") from None
    except PermissionError:
        raise SourceError(f"{path}: permission denied reading the shard") from None
    except IsADirectoryError:
        raise SourceError(f"{path}: is a directory, expected a safetensors file") from None
    return parse_header_bytes(path, raw, header_len, file_size)


def parse_header_bytes(path: Path, raw: bytes, header_len: int, file_size: int) -> ShardHeader:
    """Check a header's JSON (`raw`, the `header_len` bytes after the length prefix) against the file size."""
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise SourceError(f"{path}: corrupt header: not valid JSON ({_short(exc)})") from None
    except RecursionError:
        raise SourceError(f"{path}: corrupt header: JSON nested too deeply") from None

    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SourceError(f"{path}: corrupt header: __metadata__ must map names to strings")
    tensors = {}
    shard = path.name  # one string for every tensor of the shard
    for name, entry in header.items():
        tensors[name] = _parse_entry(path, shard, name, entry, data_start, file_size)
    _check_no_overlap(path, tensors)
    return ShardHeader(tensors=tensors, metadata=metadata, data_start=data_start, file_size=file_size)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(path: Path, shard: str, name: str, entry, data_start: int, file_size: int) -> TensorInfo:
    """One tensor's entry, checked as strictly as safetensors itself: a string dtype, a list of non-negative
    integer dimensions, two integer offsets (no floats, booleans or strings standing in for numbers)."""
    shown = _short(name)
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise SourceError(f"{path}: corrupt header: entry for {shown!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SourceError(f"{path}: tensor {shown!r} has dtype {_short(dtype)!r}, which this tool does not know")
    if (not isinstance(shape, list) or not all(map(_is_count, shape)) or not isinstance(offsets, list)
            or len(offsets) != 2 or not all(map(_is_count, offsets)) or offsets[0] > offsets[1]):
        raise SourceError(f"{path}: corrupt header: bad shape or offsets for {shown!r}")
    shape, (begin, end) = tuple(shape), offsets
    expected = _numel_up_to(shape, file_size) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise SourceError(
            f"{path}: corrupt header: {shown!r} is {dtype}{_short(list(shape))} ({_short(expected)} bytes) but spans "
            f"{_short(end - begin)}"
        )
    if data_start + end > file_size:
        raise SourceError(
            f"{path}: truncated: {file_size} bytes on disk, but tensor {shown!r} ends at byte {_short(data_start + end)}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=shape, shard=shard, offset=data_start + begin, nbytes=end - begin)


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    """Two tensors sharing bytes would be read as each other; safetensors refuses such files too."""
    spans = sorted((t.offset, t.offset + t.nbytes, name) for name, t in tensors.items() if t.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise SourceError(f"{path}: corrupt header: tensors {_short(first)!r} and {_short(second)!r} share bytes")


def _numel_up_to(shape: tuple[int, ...], cap: int) -> int:
    """The product of the dimensions, or the first partial product past `cap` (a file of `cap` bytes cannot
    hold more elements): a hostile header's dimensions would otherwise make a number of millions of digits."""
    numel = 1
    for d in shape:
        numel *= d
        if numel > cap:
            return numel
    return numel


def _short(value, limit: int = 80) -> str:
    """A hostile header can hold names and numbers of any length: messages show at most `limit` characters."""
    try:
        text = str(value)
    except ValueError:  # an integer past Python's digit limit for str()
        return f"a {value.bit_length()}-bit number"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def open_source(src: Path, allow_external_links: bool = False) -> SourceIndex:
    """Read a local checkpoint folder's config, index and shard headers.

    Args:
        src (`Path`): the checkpoint folder.
        allow_external_links (`bool`, *optional*, defaults to `False`): copy files that are links resolving
            outside `src` (by default they are refused: a cloned repository can link `tokenizer.model` to a
            private key, and the output may be published). Links into a Hugging Face cache's `blobs/` are fine.

    Raises:
        SourceError: missing folder or config, an index naming a missing shard, a bad header, a truncated shard,
            a file to copy that links outside `src` or to nothing.
    """
    src = Path(src)
    if not src.exists():
        raise SourceError(f"{src}: source folder not found")
    if not src.is_dir():
        raise SourceError(f"{src}: source is not a folder (give the checkpoint folder)")
    config = _read_json(src / CONFIG_NAME, what="config.json")

    index_path = src / INDEX_NAME
    warnings = []
    if index_path.is_file():
        index = _read_json(index_path, what="index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SourceError(f"{index_path}: corrupt index: no 'weight_map'")
        # each name checked once, in the index's order (an MoE maps tens of thousands of tensors to a few hundred
        # shards; a value that is no string, unhashable perhaps, fails as it is); ../x would read outside the source
        named = weight_map.values()
        for shard in dict.fromkeys(named) if all(isinstance(s, str) for s in named) else named:
            if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise SourceError(f"{index_path}: corrupt index: {_short(shard)!r} is not a .safetensors file name "
                                  "in the source folder")
        shards = tuple(sorted(set(weight_map.values())))
        for shard in shards:
            if not (src / shard).is_file():
                raise SourceError(f"{index_path}: names shard {shard!r}, which is not in {src}")
    elif (src / SINGLE_FILE_NAME).is_file():
        weight_map, shards = None, (SINGLE_FILE_NAME,)
    else:
        raise SourceError(f"{src}: no {INDEX_NAME} and no {SINGLE_FILE_NAME}: not a safetensors checkpoint")

    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        header = read_header(src / shard)
        # in the header's order: the order safetensors writes the data in, and the plan order of a checkpoint this
        # tool wrote (whose data lies in `write.data_order`), so that converting a dequantized output plans as the
        # first conversion did
        for info in header.tensors.values():
            if weight_map is not None and weight_map.get(info.name) != shard:
                if info.name not in weight_map:
                    warnings.append(f"{shard}: tensor {info.name} is not in the index; it is left out, as loaders do")
                continue
            if info.name in tensors:
                raise SourceError(f"{src / shard}: tensor {info.name!r} also appears in {tensors[info.name].shard}")
            tensors[info.name] = info
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise SourceError(
                f"{index_path}: {len(missing)} tensor(s) named in the index are not in their shard, "
                f"first {missing[0]!r} (expected in {weight_map[missing[0]]})"
            )

    weight_files = set(shards) | {INDEX_NAME}
    copy, skipped = _other_files(src, weight_files, allow_external_links)
    return SourceIndex(
        root=src,
        config=config,
        tensors=tensors,
        shards=shards,
        files_to_copy=tuple(copy),
        files_skipped=tuple(skipped),
        warnings=tuple(warnings),
    )


def open_hub_source(repo: ShardProvider) -> SourceIndex:
    """A Hub repository as a `SourceIndex`: config, index and shard headers; shards stay remote until read. The
    revision is resolved to its commit first, and every file is read at that commit.

    Raises:
        SourceError: offline with the files not cached, repository gated, not found or revision not found, a
            failed file listing, a bad header.
    """
    config = repo.config()
    shards, weight_map = repo.shard_names()
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        header = repo.header(shard)
        for info in header.tensors.values():  # in the header's order, as `open_source` reads them
            if weight_map is None or weight_map.get(info.name) == shard:
                tensors[info.name] = TensorInfo(info.name, info.dtype, info.shape, shard, info.offset, info.nbytes)
    copy, skipped = classify_files(repo.other_files(), set(shards) | {INDEX_NAME})
    return SourceIndex(root=repo.snapshot, config=config, tensors=tensors, shards=tuple(shards),
                       files_to_copy=tuple(copy), files_skipped=tuple(skipped), warnings=tuple(repo.warnings),
                       provider=repo, name=repo.repo_id, commit=repo.commit)


def _read_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SourceError(f"{path}: no {what} in the source folder") from None
    except PermissionError:
        raise SourceError(f"{path}: permission denied reading the {what}") from None
    except ValueError as exc:  # not UTF-8
        raise SourceError(f"{path}: corrupt {what}: {_short(exc, 200)}") from None
    return json_object(text, str(path), what)


def json_object(text: str, where: str, what: str) -> dict:
    """A JSON file's text that must hold an object (a config, an index); any other content is one line naming
    `where` (a path, or a Hub repo) and `what`."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SourceError(f"{where}: corrupt {what}: {_short(exc, 200)}") from None
    except RecursionError:
        raise SourceError(f"{where}: corrupt {what}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise SourceError(f"{where}: corrupt {what}: expected a JSON object")
    return data


def _other_files(src: Path, weight_files: set[str],
                 allow_external_links: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    relative = []
    chains = {str(src): (src.resolve(),)}  # the real folders above each walked folder, to stop at link loops

    def unreadable(exc: OSError):  # a folder left out would be missing from the output, silently
        raise SourceError(f"{exc.filename}: cannot read this folder of the source: {os_reason(exc)}")

    for root, dirs, files in os.walk(src, followlinks=True, onerror=unreadable):
        chain = chains.pop(root)
        kept = []
        for d in sorted(dirs):
            real = Path(root, d).resolve()
            if d in _NEVER_COPIED_DIRS or real in chain:
                continue
            if not allow_external_links and not _inside(real, src):  # refused before walking whatever it holds
                _refuse_link(Path(root, d))
            kept.append(d)
            chains[os.path.join(root, d)] = (*chain, real)
        dirs[:] = kept
        rel_root = Path(root).relative_to(src)
        relative += [(rel_root / name).as_posix() for name in sorted(files)]
    copy, skipped = classify_files(relative, weight_files)
    for rel in copy:
        if not allow_external_links:
            _check_link(src, rel)
        _check_readable(src / rel)
    return copy, skipped


def _check_readable(path: Path) -> None:
    """A file to copy that cannot be read is an error before anything is written, not after every shard."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read this file of the source: {os_reason(exc)}") from None


def _inside(real: Path, src: Path) -> bool:
    """Whether a resolved path lies in `src`, or, for a Hugging Face cache snapshot, in its repository's
    `blobs/` (where every file of a snapshot links to)."""
    root = src.resolve()
    allowed = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    return any(real == a or a in real.parents for a in allowed)


def _check_link(src: Path, rel: str) -> None:
    """Refuse a file to copy that is, or sits below, a link to nothing or to a place outside `src`."""
    path = src / rel
    real = path.resolve()
    inside = _inside(real, src)
    if inside and real.exists():
        return
    link = next((src / Path(*Path(rel).parts[:k]) for k in range(1, len(Path(rel).parts) + 1)
                 if (src / Path(*Path(rel).parts[:k])).is_symlink()), path)
    if not inside:
        _refuse_link(link)
    raise SourceError(f"{link}: a link to {os.readlink(link) if link.is_symlink() else real}, which does not exist")


def _refuse_link(link: Path) -> None:
    raise SourceError(f"{link}: a link to {os.readlink(link)}, outside the source folder: refusing to copy it into "
                      "the output (replace the link by the file, or pass --allow-external-links)")


def classify_files(relative: list[str], weight_files: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split a checkpoint's files (paths relative to its root) other than its weights and config into those
    copied unchanged and those left out, with why."""
    copy, skipped = [], []
    for rel in relative:
        name = rel.rsplit("/", 1)[-1]
        if rel in weight_files or rel == CONFIG_NAME or rel.split("/")[0] in _NEVER_COPIED_DIRS:
            continue
        if rel == CARD_NAME:
            skipped.append((rel, "replaced by the FP8 model card"))
        elif name.endswith(".index.json") and name[: -len(".index.json")].endswith(_OTHER_WEIGHT_SUFFIXES):
            skipped.append((rel, "the index of weights that are not copied"))
        elif name.endswith(_OTHER_WEIGHT_SUFFIXES) or ".safetensors" in name:
            skipped.append((rel, "another copy of the unquantized weights"))
        else:
            copy.append(rel)
    return copy, skipped


def source_card(source: SourceIndex) -> str | None:
    """The source's model card (README.md) text, or None when it has none or it is not UTF-8."""
    if (CARD_NAME, "replaced by the FP8 model card") not in source.files_skipped:
        return None
    path = source.provider.fetch(CARD_NAME) if source.provider is not None else source.root / CARD_NAME
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


