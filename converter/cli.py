"""`convert-fp8`: a click group whose bare form converts; subcommands join it.

The only module that imports click or tqdm, prints, or exits.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from . import __version__
from .configs import DEFAULT_MAX_SHARD_SIZE, DEFAULT_PRESET, ConvertOptions, format_size, parse_size
from .console import asked_memory, print_summary, run_command, say_finished, with_progress_bar

EXAMPLES = """
Examples:

  convert-fp8 --src gemma-4-31B-it --dst gemma-4-31B-it-FP8

  convert-fp8 --src model --dst model-FP8 --config gemma-4-31b-it --dry-run

  convert-fp8 --src model --dst model-FP8 --exclude model.multi_modal_projector --max-shard-size 2GB

  convert-fp8 --src model --dst model-FP8-dynamic --format compressed-tensors --scheme fp8-dynamic
"""


def _size(ctx, param, value):
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _publish_options(func):
    """--push-to-hub and its companions, for `convert` and `dequantize`."""
    func = click.option("--commit-message", default=None, help="--push-to-hub: the commit's message.")(func)
    func = click.option("--hub-branch", default=None, metavar="BRANCH",
                        help="--push-to-hub: commit to this branch (created from main if missing), to stage.")(func)
    func = click.option("--private", is_flag=True, help="--push-to-hub: create the repository private.")(func)
    return click.option("--push-to-hub", default=None, metavar="ORG/NAME",
                        help="Upload each shard while converting and commit the whole output at once to this Hub "
                             "model repository, once checked (HF_TOKEN, a write token). See docs/publishing.md.")(func)


@click.group(invoke_without_command=True, epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--src", help="Source checkpoint: a folder (BF16, F16 or F32 safetensors, or an FP8 checkpoint to "
                             "re-quantize into another dialect) or a Hub repo id org/name.")
@click.option("--revision", default=None, help="Hub sources: branch, tag or commit [main].")
@click.option("--low-disk", is_flag=True, help="Hub sources: delete each downloaded shard once it is converted.")
@click.option("--dst", type=click.Path(path_type=Path), help="Output folder for the FP8 checkpoint.")
@click.option("--config", "preset_name", default=DEFAULT_PRESET, show_default=True,
              help="Preset from configs/ by name (default, gemma-4-31b-it, gemma-4-26b-a4b-it, gemma-4-e4b-it, "
                   "gemma-4-e2b-it, llama) or a preset JSON file.")
@click.option("--block-size", default=None, callback=lambda ctx, param, value: _block(value), metavar="N",
              help="Square block edge for the scales, 64 or 128 [preset's, 64].")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Module path to keep unquantized, added to the preset's (repeatable; full dotted paths).")
@click.option("--max-shard-size", default=str(DEFAULT_MAX_SHARD_SIZE), show_default="5GB", callback=_size,
              help="Largest output shard, e.g. 5GB, 500MB, 2GiB.")
@click.option("--dry-run", is_flag=True, help="Print the plan from headers alone; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty --dst.")
@click.option("--no-arch-check", is_flag=True, help="Skip the cross-check against transformers' own module set.")
@click.option("--base-model", default=None, metavar="ORG/NAME",
              help="Hub id of the source, the model card's base_model [a Hub source's repo id; none for a folder].")
@click.option("--allow-external-links", is_flag=True,
              help="Copy files of --src that are links to places outside it (refused by default: the output may "
                   "be published, and a link can point at anything).")
@click.option("--quantizer", type=click.Choice(["auto", "numba", "torch"]), default="auto", show_default=True,
              help="numba: the fused CPU kernel; torch: the reference formula. Same bytes either way.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the torch quantizer runs (cuda: on a GPU, same bytes).")
@click.option("--format", "format", type=click.Choice(["fp8", "compressed-tensors"]), default="fp8", show_default=True,
              help="Output dialect: fp8 (transformers' FineGrainedFP8Config) or compressed-tensors (llm-compressor's, "
                   "vLLM's usual FP8 checkpoints).")
@click.option("--scheme", "quant_scheme", type=click.Choice(["fp8-block", "fp8-dynamic", "mxfp8", "mxfp8a16"]),
              default=None,
              help="compressed-tensors scheme: fp8-block (FP8_BLOCK, 128x128 unless --block-size), fp8-dynamic "
                   "(FP8_DYNAMIC, one scale per output channel), mxfp8 or mxfp8a16 (MXFP8, MXFP8A16: a "
                   "power-of-two scale per 32 columns) [fp8-block].")
@click.option("--scale-fmt", type=click.Choice(["float", "ue8m0"]), default="float", show_default=True,
              help="fp8 format: float32 inverse scales, or ue8m0 (power-of-two scales in one byte, F8_E8M0).")
@click.option("--part", default=None, metavar="I/N", callback=lambda ctx, param, value: _part(value),
              help="Convert only the I-th of N fixed subsets of the output shards (for N machines or jobs).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only errors and the final line.")
@click.option("--debug", is_flag=True, envvar="CONVERT_FP8_DEBUG", help="Show tracebacks of errors.")
@click.option("--no-keep-output", is_flag=True,
              help="--push-to-hub: remove each shard once uploaded, to publish a model larger than the disk (with "
                   "--low-disk); --dst keeps the other files.")
@_publish_options
@click.version_option(__version__, prog_name="convert-fp8")
@click.pass_context
def main(ctx, debug, **opts):
    """Convert a BF16 Hugging Face checkpoint to block-quantized FP8 (E4M3, per-block scales), streaming
    tensor by tensor in bounded memory, byte-identical to transformers' FineGrainedFP8Config.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if ctx.invoked_subcommand is not None:
        return
    if opts["src"] is None or opts["dst"] is None:
        raise click.UsageError("--src and --dst are required (see --help)")
    run_command(debug, _convert, **opts)


def _block(text: str | None) -> int | None:
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a number such as 64", param_hint="--block-size") from None
    if len(sizes) == 2 and sizes[0] != sizes[1]:
        raise click.BadParameter(
            f"{text}: non-square blocks are refused: transformers' FP8 loaders and vLLM's kernels take square "
            "weight blocks; give one number", param_hint="--block-size")
    if len(sizes) > 2 or sizes[0] not in (64, 128):
        raise click.BadParameter(f"{text}: expected 64 or 128, the block edges transformers' and vLLM's FP8 kernels "
                                 "take", param_hint="--block-size")
    return sizes[0]


def _part(text: str | None) -> tuple[int, int]:
    if text is None:
        return (1, 1)
    try:
        i, n = (int(v) for v in text.split("/"))
        if not 1 <= i <= n:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected I/N with 1 <= I <= N, e.g. 2/4", param_hint="--part") from None
    return (i, n)


def _convert(src, dst, preset_name, exclude, no_arch_check, part, dry_run, quiet, push_to_hub, private, hub_branch,
             commit_message, no_keep_output, **options):
    from .convert import convert, prepare
    from .errors import UsageError
    from .hub import looks_like_repo_id
    from .plan import describe_plan
    from .presets import load_preset

    if no_keep_output and not push_to_hub:
        raise UsageError("--no-keep-output removes each shard once it is uploaded: it needs --push-to-hub ORG/NAME")
    _check_dialect(options)
    options = ConvertOptions(
        src=src if looks_like_repo_id(src) else Path(src), dst=dst, preset=load_preset(preset_name),
        extra_excludes=tuple(exclude), arch_check=not no_arch_check, part=part, **options,
    )
    if dry_run:
        _, plan, notes = prepare(options)
        click.echo(describe_plan(plan))
        for note in notes:
            click.echo(f"note: {note}")
        click.echo("dry run: nothing written")
        return

    if push_to_hub:
        return _publish(lambda publish: with_progress_bar(lambda *a, **k: convert(*a, **k, watcher=publish),
                                                           options, "convert", quiet),
                        options, push_to_hub, private, hub_branch, commit_message, quiet, part,
                        keep_output=not no_keep_output)
    summary = with_progress_bar(convert, options, "convert", quiet)
    if summary.already_finished:
        return say_finished(summary)
    status = None if summary.finalized else summary.notes.pop()  # who completes the checkpoint
    if not quiet:
        print_summary(summary)
    if status is None:
        click.echo(f"wrote {summary.dst}")
    else:
        click.echo(f"part {part[0]}/{part[1]} of {summary.dst} done; {status}")


def _publish(run, options, repo_id, private, branch, message, quiet, part=(1, 1), describe=None,
             keep_output=True) -> None:
    """Convert (or dequantize) and publish; print the summary, what was published and where."""
    import dataclasses
    import json

    from .errors import UsageError
    from .publish import PublishOptions, run_and_publish

    if part != (1, 1):
        raise UsageError("--push-to-hub publishes a whole output: run the parts without it, then `convert-fp8 "
                         "finalize`, then publish")
    fields = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("overwrite",)}
    identity = json.loads(json.dumps({"command": type(options).__name__, **fields}, default=str, sort_keys=True))
    target = PublishOptions(repo_id, private, branch, message, options.overwrite, keep_output)
    summary, result = run_and_publish(run, options.dst, target, identity)
    if summary is not None and not quiet:
        (describe or print_summary)(summary)
    if result.already:
        click.echo(f"{target.where} already holds exactly the {result.files} files of {options.dst} (names, sizes "
                   f"and sha256 or git blob ids of its branch compared in {result.seconds:.1f} s): nothing to commit; "
                   f"{result.url}")
        return
    if summary is None:
        click.echo(f"{options.dst}: the output was already complete; only its commit was left to make")
    click.echo(f"published {result.files} files of {options.dst} to {target.where} in one commit "
               f"({result.oid[:12]}; {result.shards_sent} shard(s) pre-uploaded by this run): {result.url}"
               + ("" if result.kept else "; shards not kept locally (--no-keep-output)"))


def _check_dialect(options: dict) -> None:
    """Options of one dialect given with another are contradictions, not silently ignored."""
    from .errors import UsageError

    if options["format"] == "compressed-tensors":
        options["quant_scheme"] = options["quant_scheme"] or "fp8-block"
        if options["scale_fmt"] != "float":
            raise UsageError("--scale-fmt ue8m0 is for --format fp8; compressed-tensors stores its scales in "
                                   "the weight's dtype")
        if options["quant_scheme"] == "fp8-dynamic" and options["block_size"] is not None:
            raise UsageError("--block-size does not apply to --scheme fp8-dynamic (one scale per channel)")
        if options["quant_scheme"].startswith("mx") and options["block_size"] is not None:
            raise UsageError(f"--block-size does not apply to --scheme {options['quant_scheme']} (one scale per 32 "
                             "columns)")
    elif options["quant_scheme"] is not None:
        raise UsageError(f"--scheme {options['quant_scheme']} is a compressed-tensors scheme: add "
                               "--format compressed-tensors")
    else:
        options["quant_scheme"] = "fp8-block"


@main.command("finalize", epilog="""
Example:

  convert-fp8 finalize --dst gemma-4-31B-it-FP8
""")
@click.option("--dst", required=True, type=click.Path(path_type=Path), help="The output folder the parts wrote to.")
@click.pass_context
def finalize_command(ctx, dst):
    """Complete a conversion run in parts (--part I/N) once every part has finished: check the parts, write the
    index, other files, model card and config, and move everything into place."""
    run_command(ctx.obj["debug"], _finalize, dst=dst)


def _finalize(dst):
    from .convert import finalize

    summary = finalize(dst)
    print_summary(summary)
    click.echo(f"wrote {summary.dst}")


@main.command("verify", epilog="""
Examples:

  convert-fp8 verify --src gemma-4-31B-it --dst gemma-4-31B-it-FP8

  convert-fp8 verify --dst gemma-4-31B-it-FP8          # the checks that need no source
""")
@click.option("--dst", required=True, type=click.Path(path_type=Path), help="The converted checkpoint folder.")
@click.option("--src", type=click.Path(path_type=Path), default=None,
              help="The source it came from: re-derive every FP8 byte and compare every copied tensor.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Where to write the JSON report [DST/convert-fp8-verify.json].")
@click.option("--no-arch-check", is_flag=True, help="Skip the comparison with transformers' own FP8 module set.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only problems and the verdict.")
@click.pass_context
def verify_command(ctx, dst, src, report_path, no_arch_check, quiet):
    """Check a converted checkpoint tensor by tensor, in bounded memory; exit 1 naming each problem."""
    run_command(ctx.obj["debug"], _verify, dst=dst, src=src, report_path=report_path, arch_check=not no_arch_check,
         quiet=quiet)


def _verify(dst, src, report_path, arch_check, quiet):
    from tqdm import tqdm

    from .verify import REPORT_NAME, describe_report, verify

    total = sum(p.stat().st_size for p in Path(dst).glob("*.safetensors")) if Path(dst).is_dir() else 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", file=sys.stderr,
              disable=quiet or os.environ.get("CONVERT_FP8_NO_PROGRESS") == "1") as bar:
        report = verify(dst, src, progress=bar.update, arch_check=arch_check)
    report_path, refused = _report_path(dst, report_path, REPORT_NAME)
    try:
        if report_path is not None:
            report_path.write_text(report.to_json())
            report.notes.append(f"report written to {report_path}")
        else:
            report.notes.append(refused)
    except OSError as exc:
        report.notes.append(f"report not written: {report_path}: {exc.strerror}")
    text = describe_report(report)
    if quiet:
        text = "\n".join(line for line in text.splitlines() if line.startswith(("problem:", "verify:")))
    click.echo(text)
    if not report.ok:
        sys.exit(1)


def _report_path(dst: Path, asked: Path | None, name: str) -> tuple[Path | None, str]:
    """Where a check's JSON report goes: `--report`, else into DST when it holds a quantized checkpoint. A
    folder without one (a BF16 checkpoint given by mistake, a missing folder) is the user's input, never written
    to: `(None, why)`."""
    if asked is not None:
        return asked, ""
    try:
        quantized = "quantization_config" in json.loads((Path(dst) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        quantized = False
    if quantized:
        return Path(dst) / name, ""
    return None, (f"report not written: {dst} holds no quantized checkpoint (no quantization_config in a "
                  "config.json), and a folder given to check is not written to; --report PATH writes it")


@main.command("dequantize", epilog="""
Examples:

  convert-fp8 dequantize --src gemma-4-31B-it-FP8 --dst gemma-4-31B-it-BF16

  convert-fp8 dequantize --src deepseek-ai/DeepSeek-V3 --dst DeepSeek-V3-BF16 --low-disk

  convert-fp8 dequantize --src model-FP8 --dst model-F32 --dtype f32 --dry-run
""")
@click.option("--src", required=True, help="FP8 checkpoint (transformers fp8 or compressed-tensors): a folder or a Hub "
                                           "repo id org/name.")
@click.option("--dst", required=True, type=click.Path(path_type=Path), help="Output folder for the checkpoint.")
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]), default="bf16", show_default=True,
              help="dtype of the dequantized weights.")
@click.option("--revision", default=None, help="Hub sources: branch, tag or commit [main].")
@click.option("--low-disk", is_flag=True, help="Hub sources: delete each downloaded shard once it is read.")
@click.option("--max-shard-size", default=str(DEFAULT_MAX_SHARD_SIZE), show_default="5GB", callback=_size,
              help="Largest output shard, e.g. 5GB, 500MB, 2GiB.")
@click.option("--base-model", default=None, help="Base model id for the model card [source name].")
@click.option("--allow-external-links", is_flag=True,
              help="Copy files of --src that are links to places outside it (refused by default).")
@click.option("--dry-run", is_flag=True, help="Print the plan from headers alone; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty --dst.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only errors and the final line.")
@_publish_options
@click.pass_context
def dequantize_command(ctx, **opts):
    """Dequantize a block-FP8 checkpoint (transformers fp8, DeepSeek-V3 style) to BF16, F16 or F32, streaming,
    with the values transformers computes when it dequantizes on load."""
    run_command(ctx.obj["debug"], _dequantize, **opts)


def _dequantize(src, dst, dry_run, quiet, push_to_hub, private, hub_branch, commit_message, **options):
    from .convert import convert, prepare
    from .hub import looks_like_repo_id
    from .plan import describe_plan

    options = ConvertOptions(src=src if looks_like_repo_id(src) else Path(src), dst=dst, **options)
    if dry_run:
        _, plan, _ = prepare(options)
        click.echo(describe_plan(plan))
        click.echo("dry run: nothing written")
        return
    if push_to_hub:
        return _publish(lambda publish: with_progress_bar(lambda *a, **k: convert(*a, **k, watcher=publish),
                                                           options, "dequantize", quiet),
                        options, push_to_hub, private, hub_branch, commit_message, quiet,
                        describe=lambda s: click.echo(f"{s.decoded_tensors} tensors dequantized, "
                                                      f"{s.copied_tensors - s.decoded_tensors} copied"))
    summary = with_progress_bar(convert, options, "dequantize", quiet)
    if summary.already_finished:
        return say_finished(summary)
    if not quiet:
        for note in summary.notes:
            click.echo(f"note: {note}")
        if summary.resumed_bytes:
            click.echo(f"resumed: kept {format_size(summary.resumed_bytes)} of source already written by an "
                       "earlier run")
        click.echo(
            f"{summary.decoded_tensors} tensors dequantized, {summary.copied_tensors - summary.decoded_tensors} "
            f"copied, {summary.files_copied} other files; "
            f"{format_size(summary.bytes_in)} in, {format_size(summary.bytes_out)} out in {summary.shards} shard(s); "
            f"{summary.seconds:.1f} s ({format_size(int(summary.bytes_in / max(summary.seconds, 1e-9)))}/s); "
            f"peak memory {format_size(summary.peak_rss_bytes)}{asked_memory(summary)}"
        )
    click.echo(f"wrote {summary.dst}")


@main.command("validate", epilog="""
Examples:

  convert-fp8 validate --dst gemma-4-31B-it-FP8 --src gemma-4-31B-it --device cuda

  convert-fp8 validate --dst model-FP8 --device cuda --kernel local:/models/finegrained-fp8/build/torch-universal

  convert-fp8 validate --dst model-FP8 --src model --device cpu     # transformers' dequantize path

  convert-fp8 validate --dst model-FP8 --src model --engine vllm    # served by vLLM, beside transformers
""")
@click.option("--dst", required=True, type=click.Path(path_type=Path), help="The converted checkpoint folder.")
@click.option("--src", type=click.Path(path_type=Path), default=None, help="The BF16 source, to compare outputs.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="auto: cuda when a GPU is visible, else cpu.")
@click.option("--engine", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True,
              help="What runs the checkpoint: transformers, or vLLM (its log-probs held to transformers' and the "
                   "source's; a Python with vLLM from CONVERT_FP8_VLLM_PYTHON, else this one).")
@click.option("--kernel", default="hub", show_default=True, metavar="hub|local:PATH|builtin",
              help="Where the FP8 matmul kernel comes from (GPU only).")
@click.option("--prompt", default=None, help="Chat prompt for the forward pass and generation.")
@click.option("--max-new-tokens", type=int, default=20, show_default=True)
@click.option("--min-cosine", type=float, default=None,
              help="Mean cosine of the logits (or a head's main output) required [0.98].")
@click.option("--min-top1", type=float, default=None, help="Top-1 agreement with the source required [0.80].")
@click.option("--max-kl", type=float, default=None, help="Mean KL(source || FP8) allowed [0.05].")
@click.option("--min-embedding-cosine", type=float, default=None,
              help="Encoders: mean cosine of the sentence embeddings required [0.99].")
@click.option("--min-rank-correlation", type=float, default=None,
              help="Encoders: Spearman correlation of the pairwise sentence similarities required [0.90].")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Where to write the JSON report [DST/convert-fp8-validate.json].")
@click.pass_context
def validate_command(ctx, dst, src, device, engine, kernel, prompt, max_new_tokens, min_cosine, min_top1, max_kl,
                     min_embedding_cosine, min_rank_correlation, report_path):
    """Run the checkpoint in transformers (or vLLM), confirm the FP8 path, find NaN/Inf, compare with BF16,
    generate."""
    run_command(ctx.obj["debug"], _validate, dst=dst, src=src, device=device, engine=engine, kernel=kernel,
                prompt=prompt, max_new_tokens=max_new_tokens, min_cosine=min_cosine, min_top1=min_top1,
                max_kl=max_kl, min_embedding_cosine=min_embedding_cosine, min_rank_correlation=min_rank_correlation,
                report_path=report_path)


def _validate(dst, src, device, engine, kernel, prompt, max_new_tokens, min_cosine, min_top1, max_kl, min_embedding_cosine,
              min_rank_correlation, report_path):
    from .errors import UsageError
    from .validate import DEFAULT_PROMPT, REPORT_NAME, Thresholds, describe_report, validate

    if kernel not in ("hub", "builtin") and not kernel.startswith("local:"):
        raise UsageError(f"--kernel {kernel!r}: expected hub, builtin or local:PATH")
    if not Path(dst).is_dir():
        raise UsageError(f"{dst}: output folder not found")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = Thresholds()
    thresholds = Thresholds(
        min_cosine=defaults.min_cosine if min_cosine is None else min_cosine,
        min_top1=defaults.min_top1 if min_top1 is None else min_top1,
        max_kl=defaults.max_kl if max_kl is None else max_kl,
        min_embedding_cosine=defaults.min_embedding_cosine if min_embedding_cosine is None else min_embedding_cosine,
        min_rank_correlation=defaults.min_rank_correlation if min_rank_correlation is None else min_rank_correlation,
    )
    report = validate(dst, src, device=device, kernel=kernel, prompt=prompt or DEFAULT_PROMPT,
                      max_new_tokens=max_new_tokens, thresholds=thresholds, engine=engine)
    report_path, refused = _report_path(dst, report_path, REPORT_NAME)
    text = describe_report(report)
    try:
        if report_path is None:
            text += f"\n{refused}"
        else:
            report_path.write_text(report.to_json())
            text += f"\nreport: {report_path}"
    except OSError as exc:
        text += f"\nreport not written: {report_path}: {exc.strerror}"
    click.echo(text)
    if not report.ok:
        sys.exit(1)


@main.command("doctor", epilog="""
Examples:

  convert-fp8 doctor

  convert-fp8 doctor --dst /data/gemma-4-31B-it-FP8      # with the free disk where the output would go
""")
@click.option("--dst", type=click.Path(path_type=Path), default=None,
              help="An output folder (it need not exist yet): print the free disk space there.")
@click.pass_context
def doctor_command(ctx, dst):
    """Print what a bug report needs: versions of the tool, Python and its packages, whether numba can cache its
    kernels, CPU features, GPUs and their compute capability, free disk at --dst. Uses no network."""
    run_command(ctx.obj["debug"], _doctor, dst=dst)


def _doctor(dst):
    from .doctor import describe, report

    click.echo(describe(report(dst)))


if __name__ == "__main__":
    main()
