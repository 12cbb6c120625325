"""The transformers engine of `validate`: load the output with transformers, confirm that every FP8 module took
the FP8 path (FP8Linear with float8 weights on a GPU; weights equal to their dequantized blocks on the CPU), run
the inputs with a hook on every module to find the first non-finite output, load the source the same way,
compare, and generate.

On a GPU (compute capability 8.9+) transformers runs FP8 matmuls through the `finegrained-fp8` kernel; on a CPU it
dequantizes on load, so the same command runs end to end without a GPU.
"""

from __future__ import annotations

import gc
import json
import re
import time
from dataclasses import asdict
from pathlib import Path

from ... import arch
from ...configs import CONFIG_NAME
from ...kernels.loading import package_version, prepare_kernel
from ...plan import module_of
from ..compare import judge, main_output, pool
from ..kind import ENCODER, GENERATIVE, ModelKind, Pooling, checkpoint_fp8_tensors, inputs, model_kind, sentence_inputs
from ..report import Thresholds, ValidateReport

NAME = "transformers"


def preflight(report: ValidateReport, dst: Path, device: str, kernel: str) -> ModelKind | None:
    """Checks that must hold before loading, each failure one exact message in the report; returns the model's
    kind when all hold, else None.

    Raises:
        UsageError, SourceError: from `model_kind`.
    """
    import torch

    try:
        config = json.loads((dst / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        return _failed(report, "config", f"{dst / CONFIG_NAME}: cannot read: {exc}")
    report.versions = {"torch": torch.__version__, "transformers": package_version("transformers"),
                       "kernels": package_version("kernels"), "triton": package_version("triton")}
    try:
        import transformers
    except ImportError:
        return _failed(report, "transformers", "transformers is not installed: pip install 'transformers>=5.10.1'")
    arch = (config.get("architectures") or [None])[0]
    if arch is None or not hasattr(transformers, arch):
        return _failed(report, "architecture",
                       f"transformers {transformers.__version__} does not know the architecture {arch!r}")
    report.add("architecture", True, f"{arch} (transformers {transformers.__version__})")
    if "quantization_config" not in config:
        return _failed(report, "quantization_config", f"{dst / CONFIG_NAME} has no quantization_config")
    kind = model_kind(dst, config)
    report.kind = asdict(kind)
    report.add("kind", True, kind.describe())
    if device == "cpu":
        from ...dialects import writer_from_config

        writer, _ = writer_from_config(config.get("quantization_config") or {})
        how = writer.cpu_load if writer is not None else "transformers dequantizes FP8 weights to BF16 on load"
        report.add("device", True, f"cpu: {how}; no FP8 kernel runs")
        return kind
    if not torch.cuda.is_available():
        return _failed(report, "device", "--device cuda but torch sees no CUDA device; use --device cpu")
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if (major, minor) < (8, 9):
        return _failed(report, "device", f"{name} has compute capability {major}.{minor}; the FP8 kernel needs 8.9+")
    report.add("device", True, f"{name}, compute capability {major}.{minor}")
    return kind if prepare_kernel(report, kernel) else None


def _failed(report: ValidateReport, name: str, detail: str) -> None:
    report.add(name, False, detail)


def _tensors_in(value):
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)


def forward_with_hooks(model, inputs) -> tuple[object, list[str]]:
    """One forward pass with a hook on every module; returns the model's output and, in the order their outputs
    were produced, the modules whose output holds NaN or Inf (the first is where the damage starts)."""
    import torch

    bad: list[str] = []

    def hook(name):
        def check(module, args, output):
            if any(not torch.isfinite(t).all() for t in _tensors_in(output)):
                bad.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            output = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return output, bad


def _model_class(path: Path, kind: ModelKind):
    import transformers

    if kind.auto_model:
        return transformers.AutoModel
    return getattr(transformers, json.loads((path / CONFIG_NAME).read_text())["architectures"][0])


def _load(path: Path, device: str, dtype, kind: ModelKind):
    kwargs = {"dtype": dtype}
    if device == "cuda":
        kwargs["device_map"] = "cuda"
    model, info = _model_class(path, kind).from_pretrained(path, output_loading_info=True, **kwargs)
    # a weight or scale the model expects but the checkpoint lacks loads as garbage (a Linear left out of a
    # compressed-tensors `ignore` loads with no weight_scale and gives zeros): a finding, not a warning
    model.loading_problems = {k: sorted(v) for k, v in info.items()
                              if k in ("missing_keys", "unexpected_keys") and v}
    return model.eval()


def _loaded_names(config: dict, names: list[str], writer) -> dict[str, str]:
    """The parameter transformers' loader puts each checkpoint tensor in (`arch.placement`), for fp8 checkpoints
    whose architecture it knows; empty otherwise."""
    if writer.quant_method != "fp8":
        return {}
    found = arch.placement(config, names)
    return {} if isinstance(found, str) else {n: found.tensors[n][1] for n in names}


_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


def _expert_rows(fused, name: str, shard: str, dst: Path):
    """The rows of a fused experts tensor that hold the per-expert checkpoint tensor `name`: expert `e`'s slice
    (the loader stacks experts in index order), and in it the block of rows equal in count to the checkpoint
    tensor's whose dequantized values match (gate and up are concatenated there), or the first such block."""
    import torch
    from safetensors import safe_open

    match = _EXPERT_INDEX.search(name)
    if match is None or fused.dim() != 3:
        return fused
    with safe_open(dst / shard, "pt") as f:
        rows = f.get_slice(name).get_shape()[0]
    expert = fused[int(match[1])]
    return torch.stack([expert[k:k + rows] for k in range(0, expert.shape[0] - rows + 1, rows)])


def _check_fp8_modules(report: ValidateReport, model, dst: Path, device: str) -> None:
    """Every module the checkpoint stores as FP8 is loaded as such: an FP8Linear holding float8 weights on the
    GPU; on the CPU, a Linear whose weight equals the dequantized blocks (so the scales were applied)."""
    import torch
    from safetensors import safe_open

    from ...dialects import writer_from_config

    expected = checkpoint_fp8_tensors(dst)
    writer, _ = writer_from_config(json.loads((dst / CONFIG_NAME).read_text()).get("quantization_config") or {})
    if writer is None:
        report.add("fp8 path", False, "the quantization_config names no dialect this tool writes")
        return
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") + "."
    wrong = []
    kept_compressed = 0
    targets = _loaded_names(json.loads((dst / CONFIG_NAME).read_text()), list(expected), writer)
    for name, shard in expected.items():
        target = targets.get(name, name)  # a per-expert Linear is loaded into its fused experts tensor
        # a checkpoint saved with its head, loaded as the base model (sentence-transformers), drops the prefix
        module = modules.get(module_of(target)) or modules.get(module_of(target).removeprefix(prefix))
        leaf = target.rpartition(".")[2]  # "weight" for a Linear; "gate_up_proj", "down_proj" for experts
        weight = getattr(module, leaf, None) if module is not None else None
        if weight is not None and target != name:
            weight = _expert_rows(weight, name, shard, dst)
        if weight is None:
            wrong.append(f"{name}: not in the loaded model")
            continue
        if device == "cuda":
            if "FP8" not in type(module).__name__ or weight.dtype != torch.float8_e4m3fn:
                wrong.append(f"{module_of(name)}: {type(module).__name__} with {weight.dtype} {leaf}")
            continue
        try:
            with safe_open(dst / shard, "pt") as f:
                q, s = f.get_tensor(name), f.get_tensor(writer.scale_name(name))
            if weight.dtype == torch.float8_e4m3fn:  # kept compressed (compressed-tensors on the CPU)
                scale = getattr(module, leaf + writer.scale_name(""), None)
                if not (torch.equal(weight.detach().cpu().view(torch.uint8), q.view(torch.uint8))
                        and scale is not None and torch.equal(scale.detach().cpu().float(), s.float())):
                    wrong.append(f"{name}: loaded FP8 weight or scale differs from the checkpoint's")
                kept_compressed += 1
                continue
            # expert tensors as the 2-D stack of their experts' rows (verify checks the scale shapes)
            cols = q.shape[-1]
            want = writer.dequantize(q.reshape(-1, cols), s.reshape(-1, s.shape[-1])).reshape(q.shape)
        except Exception as exc:  # noqa: BLE001 - a weight or scale that cannot be read back is the finding
            wrong.append(f"{name}: cannot dequantize it from {shard}: {type(exc).__name__}: {exc}")
            continue
        got = weight.detach().float().cpu()
        want = want.to(weight.dtype).float()
        same = (got == want) | (got.isnan() & want.isnan())
        if got.dim() == want.dim() + 1:  # the candidate row blocks of a fused expert: one of them must match
            same = same.flatten(1).all(dim=1).any()
        if not bool(same.all()):
            wrong.append(f"{name}: loaded values differ from its dequantized FP8 blocks (transformers did not "
                         "apply the scales)")
    path = "fp8-kernel" if device == "cuda" else "dequantized"
    report.fp8_path = path
    detail = (f"{len(expected)} FP8 modules: " + ("all FP8Linear with float8 weights" if device == "cuda"
              else "all kept as the checkpoint's FP8 weights and scales" if kept_compressed == len(expected)
              else "all dequantized from their FP8 blocks and scales")) if not wrong else (
        f"{len(wrong)} of {len(expected)} FP8 modules wrong, first {wrong[0]}")
    report.add("fp8 path", not wrong, detail)


def run(report: ValidateReport, dst: Path, src: Path | None, device: str, kernel: str, prompt: str,
        max_new_tokens: int, thresholds: Thresholds) -> ValidateReport:
    """Load, run and compare the checkpoint in transformers, adding each check to `report`. Never raises for a
    failed check: see `report.ok`.

    Raises:
        UsageError: a kind of model it cannot judge ("cannot validate this kind: ...").
        SourceError: a sentence-transformers folder whose `modules.json` or pooling config cannot be read.
    """
    import torch

    kind = preflight(report, dst, device, kernel)
    if kind is None:
        return report
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        model = _load(dst, device, torch.bfloat16, kind)
    except Exception as exc:  # noqa: BLE001 - a load failure is the finding
        report.add("load", False, f"transformers cannot load {dst}: {type(exc).__name__}: {exc}")
        return report
    problems = getattr(model, "loading_problems", {})
    report.add("load", not problems, f"{type(model).__name__} loaded" + "".join(
        f"; {len(v)} {k.replace('_', ' ')}, first {v[0]}" for k, v in problems.items()))
    _check_fp8_modules(report, model, dst, device)

    tok = None
    try:
        if kind.kind == GENERATIVE:
            tok, batches, how = inputs(dst, prompt, device)
        else:
            batches, how = sentence_inputs(dst, model.config, device)
    except Exception as exc:  # noqa: BLE001 - a tokenizer or chat template that fails is the finding
        report.add("inputs", False, f"cannot tokenize the inputs with the checkpoint's tokenizer: "
                                    f"{type(exc).__name__}: {exc}")
        return report
    if kind.kind == GENERATIVE:
        extract = _logits
    else:
        extract = (lambda out, batch: _embedding(out, batch, kind.pooling)) if kind.kind == ENCODER else _main
    fp8_results = _run_checked(report, model, batches, extract, how)
    if fp8_results is not None and kind.kind == GENERATIVE:
        report.generation = _generate(model, tok, batches[0], max_new_tokens, how, report)
    if device == "cuda":
        report.peak_gpu_memory_bytes = int(torch.cuda.max_memory_allocated())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    if src is not None and fp8_results is not None:
        ref_results = _reference(report, Path(src), device, kind, batches, extract)
        if ref_results is not None:
            judge(report, kind, fp8_results, ref_results, thresholds)
    return report


def _logits(output, inputs):
    return output.logits.float().cpu()


def _embedding(output, inputs, pooling: Pooling):
    import torch

    _, hidden = main_output(output)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    return pool(hidden, mask, pooling).cpu()


def _main(output, inputs):
    """The main output as rows of its last dimension (a column when that dimension is 1), with its name."""
    name, tensor = main_output(output)
    tensor = tensor.float().cpu()
    return name, tensor.flatten(0, -2) if tensor.shape[-1] > 1 else tensor.reshape(-1, 1)


def _run_checked(report: ValidateReport, model, inputs: list[dict], extract, how: str) -> list | None:
    """The FP8 model on every input, with the NaN/Inf hooks; None (and a failed check) when a forward raises."""
    results, bad = [], []
    for batch in inputs:
        try:
            output, bad_modules = forward_with_hooks(model, batch)
            results.append(extract(output, batch))
        except Exception as exc:  # noqa: BLE001 - a crash in the forward pass is the finding
            report.add("forward", False, f"the forward pass failed ({how}): {type(exc).__name__}: {exc}")
            return None
        bad = bad or bad_modules
    report.non_finite_modules = bad[:50]
    report.first_non_finite = bad[0] if bad else None
    report.add("finite outputs", not bad,
               f"every module's output is finite on {len(inputs)} input(s) ({how})" if not bad else
               f"first module with NaN/Inf output: {bad[0]} ({len(bad)} modules in all)")
    return results


def _reference(report, src: Path, device: str, kind: ModelKind, inputs: list[dict], extract) -> list | None:
    """The BF16 source on the same inputs, loaded only once the FP8 model is gone."""
    import torch

    try:
        reference = _load(src, device, torch.bfloat16, kind)
        with torch.no_grad():
            results = [extract(reference(**batch), batch) for batch in inputs]
    except Exception as exc:  # noqa: BLE001
        report.add("source", False, f"transformers cannot run the source {src}: {type(exc).__name__}: {exc}")
        return None
    del reference
    gc.collect()
    return results


def _generate(model, tok, inputs, max_new_tokens: int, how: str, report: ValidateReport) -> dict:
    import torch

    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    except Exception as exc:  # noqa: BLE001 - a crash in generate is the finding (NaN sampling, say)
        report.add("generate", False, f"generate() failed: {type(exc).__name__}: {exc}")
        return {"error": str(exc)}
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    text = tok.decode(new, skip_special_tokens=True) if tok is not None else " ".join(map(str, new.tolist()))
    result = {"prompt": how, "new_tokens": int(new.numel()), "seconds": seconds,
              "tokens_per_s": new.numel() / seconds if seconds > 0 else None, "text": text}
    report.add("generate", new.numel() > 0, f"{new.numel()} tokens at {result['tokens_per_s']:.1f} tokens/s")
    return result
