"""Completing a conversion: once every part has finished, the index, other files, model card and config are
written, the staged output checked, and everything moved into place."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Collection

from .card import decoded_card, model_card
from .configs import CARD_NAME, CONFIG_NAME, INDEX_NAME, PENDING_RECORD, STAGING_NAME, ConvertOptions
from .dialects.decoded import requantized
from .errors import WriteError
from .manifest import take_lock
from .origin import source_origin
from .plan import Plan
from .source import ShardHeader, SourceIndex, TensorInfo, source_card
from .write import config_json, index_json, read_back_header, shard_header
from .output_dir import OutputDir


def finalize_if_complete(out: OutputDir, plan: Plan, source: SourceIndex, options: ConvertOptions,
                         notes: list[str], removed: Collection[str] = ()) -> bool:
    """When every part has finished, write the index, other files, model card and config (last), check the
    staged output and move it into place. Exactly one process does it (a lock file decides).

    `removed` shards were uploaded to the Hub and removed (`--no-keep-output`): their headers were checked against
    the plan, and their scales, before the upload; the self-check takes their headers from the plan."""
    n = options.part[1]
    missing = [k for k in range(1, n + 1) if not (out.staging / f"part-{k}-of-{n}.done").exists()]
    if missing and not out.staging.exists():  # another part finalized (and removed the staging folder) meanwhile
        notes.append("another part completed the checkpoint")
        return False
    if missing:
        notes.append(f"waiting for part(s) {', '.join(f'{k}/{n}' for k in missing)}; the last part to finish, or "
                     f"`convert-fp8 finalize --dst {options.dst}`, completes the checkpoint")
        return False
    if not take_lock(out.staging / "finalize.lock"):  # or it finished and removed the staging folder
        notes.append("another part is completing the checkpoint")
        return False
    try:
        names = write_last_files(out, plan, source, lambda: output_card(plan, source, options))
        check_written_headers(out.staging, plan, skip=removed)
        if plan.scheme is not None:  # `verify` checks FP8 weights and scales: a 16-bit output has none
            self_check(out.staging, plan, removed)
        names = [n for n in names if n not in removed]
        if (out.staging / PENDING_RECORD).is_file():  # what its commit needs moves into place with the output
            names.append(PENDING_RECORD)
        out.commit(names)
    except BaseException:
        try:
            (out.staging / "finalize.lock").unlink(missing_ok=True)
        except OSError:  # the disk that failed the run: its error is the one to report
            pass
        raise
    return True


def output_card(plan: Plan, source: SourceIndex, options: ConvertOptions) -> str:
    """The model card the run writes: a conversion's, or a dequantized checkpoint's."""
    hub_id, commit = source_origin(source)  # a Hub source, or a snapshot folder of the Hugging Face cache
    base = options.base_model or hub_id or source.root.resolve().name
    if plan.scheme is None:
        return decoded_card(plan, source.reader.values_text, base_model=base, source_card=source_card(source),
                            base_model_id=options.base_model or hub_id, commit=commit)
    return model_card(plan, base_model=base, repo_name=f"{Path(base).name}-FP8", source_card=source_card(source),
                      base_model_id=options.base_model or hub_id, commit=commit, requantized_from=requantized(source))


def finished_output(dst: Path, plan, source: SourceIndex, card: Callable[[], str]) -> str | None:
    """What was checked, when `dst` holds a finished output of this very run (the same source, options and tool
    version, run again: a requeued job, a script run twice); None otherwise, and nothing is read then but what
    it takes to tell.

    Finished and the same means: no staging folder (an unfinished run is resumed instead); exactly the entries
    the run moves into place; the index, config and model card byte for byte what this run writes (the card names
    the tool's version, the source's commit for a Hub source, and the options); every shard's header byte for byte
    its plan's and its size the planned one; every copied file of a local source its size in the source, and no
    source shard changed after the output was finished. The tensors' values are `verify`'s to check.
    """
    dst = Path(dst)
    try:
        if not dst.is_dir() or (dst / STAGING_NAME).exists():
            return None
        generated = {CONFIG_NAME: config_json(plan)}
        if plan.index_needed:
            generated[INDEX_NAME] = index_json(plan)
        names = {s.name for s in plan.shards} | {Path(f).parts[0] for f in plan.files_to_copy} | {CARD_NAME, *generated}
        if {p.name for p in dst.iterdir()} != names:
            return None
        generated[CARD_NAME] = card()
        if any((dst / name).read_bytes() != text.encode() for name, text in generated.items()):
            return None
        if not all(all(read_back_header(dst / shard.name, shard)) for shard in plan.shards):
            return None
        if source.provider is None:
            finished_at = (dst / CONFIG_NAME).stat().st_mtime_ns  # moved into place last
            if any((source.root / s).stat().st_mtime_ns > finished_at for s in source.shards):
                return None
            if any((dst / f).stat().st_size != (source.root / f).stat().st_size for f in plan.files_to_copy):
                return None
    except (OSError, UnicodeDecodeError):
        return None
    checked = f"{len(plan.shards)} shard header(s) and size(s), {len(generated)} written file(s) byte for byte"
    if source.provider is None:
        checked += f", {len(plan.files_to_copy)} copied file size(s), no source shard changed since"
    return checked


def write_last_files(out: OutputDir, plan, source: SourceIndex, card: Callable[[], str]) -> list[str]:
    """Once the shards are written: the index, the source's other files, the model card `card()` gives and the
    config, last (a folder with a config looks complete). `plan` is a conversion's or dequantize's plan.

    Returns:
        The staged names to move into place.
    """
    if plan.index_needed:
        out.write_text(INDEX_NAME, index_json(plan))
    for relative in plan.files_to_copy:
        origin = source.provider.fetch(relative) if source.provider is not None else source.root / relative
        out.copy_file(origin, relative)
    out.write_text(CARD_NAME, card())
    out.write_text(CONFIG_NAME, config_json(plan))
    names = [s.name for s in plan.shards] + ([INDEX_NAME] if plan.index_needed else []) + [CARD_NAME, CONFIG_NAME]
    return names + sorted({Path(f).parts[0] for f in plan.files_to_copy})


def self_check(folder: Path, plan: Plan, removed: Collection[str] = ()) -> None:
    """The cheap structural checks of `verify` (config, index, headers, scale pairs and values, the FP8 set
    against the exclusions) on the staged output, before it is moved into place. The shards' headers are the
    plan's (`check_written_headers` found each written one byte for byte); `removed` shards are no longer on disk
    (their scale values are not read)."""
    from .verify import verify

    headers = {s.name: planned_header(folder / s.name, s) for s in plan.shards}
    report = verify(folder, arch_check=False, data=False, headers=headers,
                    absent={name: headers[name] for name in removed})
    if not report.ok:
        raise WriteError(f"{folder}: the written output fails its own check: {report.problems[0]}")


def planned_header(path: Path, shard) -> ShardHeader:
    """The header a shard of the plan has, as `read_header` would give it, without the file."""
    from .write import data_order

    start = len(shard_header(shard))
    tensors, offset = {}, start
    for t in data_order(shard):
        tensors[t.name] = TensorInfo(name=t.name, dtype=t.dtype, shape=tuple(t.shape), shard=path.name,
                                     offset=offset, nbytes=t.nbytes)
        offset += t.nbytes
    return ShardHeader(tensors={t.name: tensors[t.name] for t in shard.tensors}, metadata={"format": "pt"},
                       data_start=start, file_size=offset)


def check_written_headers(folder: Path, plan: Plan, skip: Collection[str] = ()) -> None:
    """Re-read every written shard's header and compare it byte for byte with the plan's (names, dtypes, shapes
    and offsets), and each file's size."""
    for shard in (s for s in plan.shards if s.name not in skip):
        path = folder / shard.name
        try:
            header_ok, size_ok = read_back_header(path, shard)
        except OSError as exc:
            raise WriteError(f"{path}: cannot read back the written shard: {exc.strerror}") from None
        if not header_ok:
            raise WriteError(f"{path}: written header does not match the plan")
        if not size_ok:
            raise WriteError(f"{path}: {path.stat().st_size} bytes, expected {len(shard_header(shard)) + shard.nbytes}")
