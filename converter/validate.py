"""Validation of a converted checkpoint by running it: load with transformers, confirm the FP8 path is taken,
find the first module whose output is not finite, compare logits with the BF16 source, and generate.

On a GPU (compute capability 8.9+) transformers runs FP8 matmuls through the `finegrained-fp8` kernel; on a CPU it
dequantizes on load, which this checks too (every FP8 module's weight must equal its dequantized blocks), so the
same command runs end to end without a GPU.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .configs import CONFIG_NAME, FP8_DTYPE_NAME, SCALE_SUFFIX
from .kernels.loading import package_version, prepare_kernel
from .plan import module_of

REPORT_NAME = "convert-fp8-validate.json"
DEFAULT_PROMPT = "Say hello in one short sentence."
RAW_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class Thresholds:
    """Agreement with the BF16 source that a conversion must reach (means over prompt positions)."""

    min_cosine: float = 0.98
    min_top1: float = 0.80
    max_kl: float = 0.05


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class ValidateReport:
    dst: str
    src: str | None
    device: str
    kernel: str
    versions: dict = field(default_factory=dict)
    fp8_path: str | None = None  # "fp8-kernel" or "dequantized"
    checks: list[Check] = field(default_factory=list)
    first_non_finite: str | None = None
    non_finite_modules: list[str] = field(default_factory=list)
    logits: dict | None = None
    generation: dict | None = None
    peak_gpu_memory_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    def to_json(self) -> str:
        data = asdict(self)
        data["ok"] = self.ok
        return json.dumps(data, indent=2) + "\n"


def checkpoint_fp8_tensors(dst: Path) -> dict[str, str]:
    """FP8 weight name -> shard, from the output's index and headers."""
    from .source import open_source

    return {name: info.shard for name, info in open_source(dst).tensors.items() if info.dtype == FP8_DTYPE_NAME}


def preflight(report: ValidateReport, dst: Path, device: str, kernel: str) -> bool:
    """Checks that must hold before loading; each failure is one exact message in the report."""
    import torch

    try:
        config = json.loads((dst / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        return report.add("config", False, f"{dst / CONFIG_NAME}: cannot read: {exc}")
    report.versions = {"torch": torch.__version__, "transformers": package_version("transformers"),
                       "kernels": package_version("kernels"), "triton": package_version("triton")}
    try:
        import transformers
    except ImportError:
        return report.add("transformers", False, "transformers is not installed: pip install 'transformers>=5.10.1'")
    arch = (config.get("architectures") or [None])[0]
    if arch is None or not hasattr(transformers, arch):
        return report.add("architecture", False,
                          f"transformers {transformers.__version__} does not know the architecture {arch!r}")
    report.add("architecture", True, f"{arch} (transformers {transformers.__version__})")
    if "quantization_config" not in config:
        return report.add("quantization_config", False, f"{dst / CONFIG_NAME} has no quantization_config")
    if device == "cpu":
        report.add("device", True, "cpu: transformers dequantizes FP8 weights to BF16 on load; no FP8 kernel runs")
        return True
    if not torch.cuda.is_available():
        return report.add("device", False, "--device cuda but torch sees no CUDA device; use --device cpu")
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if (major, minor) < (8, 9):
        return report.add("device", False, f"{name} has compute capability {major}.{minor}; the FP8 kernel needs 8.9+")
    report.add("device", True, f"{name}, compute capability {major}.{minor}")
    return prepare_kernel(report, kernel)


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
    """One forward pass with a hook on every module; returns the logits and, in the order their outputs were
    produced, the modules whose output holds NaN or Inf (the first is where the damage starts)."""
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
            logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return logits, bad


def compare_logits(fp8_logits, ref_logits) -> dict:
    """Mean cosine, top-1 agreement and KL(ref || fp8) over every position of every prompt."""
    import torch
    import torch.nn.functional as F

    a, b = fp8_logits.float().flatten(0, -2), ref_logits.float().flatten(0, -2)
    cosine = F.cosine_similarity(a, b, dim=-1)
    kl = F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {
        "positions": int(a.shape[0]),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "finite": bool(torch.isfinite(a).all()),
    }


def _load(path: Path, device: str, dtype):
    import transformers

    config = json.loads((path / CONFIG_NAME).read_text())
    model_class = getattr(transformers, config["architectures"][0])
    kwargs = {"dtype": dtype}
    if device == "cuda":
        kwargs["device_map"] = "cuda"
    return model_class.from_pretrained(path, **kwargs).eval()


def _inputs(dst: Path, prompt: str, device: str):
    """Tokenized prompts: the chat prompt (with the checkpoint's chat template when it has one) and a raw one."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(dst)
    except Exception:  # noqa: BLE001 - no usable tokenizer: fall back to fixed ids
        tok = None
    if tok is None:
        import torch

        ids = torch.tensor([[2, 10, 20, 30, 40, 50, 60, 70]], device=device)
        return None, [{"input_ids": ids}], "no tokenizer in the checkpoint: fixed token ids"
    prompts = []
    if getattr(tok, "chat_template", None):
        chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
        prompts.append({k: v.to(device) for k, v in chat.items()})
        how = "chat template"
    else:
        prompts.append({k: v.to(device) for k, v in tok(prompt, return_tensors="pt").items()})
        how = "no chat template: plain text"
    prompts.append({k: v.to(device) for k, v in tok(RAW_PROMPT, return_tensors="pt").items()})
    return tok, prompts, how


def _check_fp8_modules(report: ValidateReport, model, dst: Path, device: str) -> None:
    """Every module the checkpoint stores as FP8 is loaded as such: an FP8Linear holding float8 weights on the
    GPU; on the CPU, a Linear whose weight equals the dequantized blocks (so the scales were applied)."""
    import torch
    from safetensors import safe_open

    from .quantize import dequantize_blocks

    expected = checkpoint_fp8_tensors(dst)
    modules = dict(model.named_modules())
    wrong = []
    for name, shard in expected.items():
        module = modules.get(module_of(name))
        leaf = name.rpartition(".")[2]  # "weight" for a Linear; "gate_up_proj", "down_proj" for experts
        weight = getattr(module, leaf, None) if module is not None else None
        if weight is None:
            wrong.append(f"{name}: not in the loaded model")
            continue
        if device == "cuda":
            if "FP8" not in type(module).__name__ or weight.dtype != torch.float8_e4m3fn:
                wrong.append(f"{module_of(name)}: {type(module).__name__} with {weight.dtype} {leaf}")
            continue
        with safe_open(dst / shard, "pt") as f:
            q, s = f.get_tensor(name), f.get_tensor(name + SCALE_SUFFIX)
        cols = q.shape[-1]
        block = cols // s.shape[-1]  # square blocks (verify checks the scale shapes)
        want = dequantize_blocks(q.reshape(-1, cols), s.reshape(-1, s.shape[-1]), block).reshape(q.shape)
        got = weight.detach().float().cpu()
        want = want.to(weight.dtype).float()
        same = (got == want) | (got.isnan() & want.isnan())
        if not bool(same.all()):
            wrong.append(f"{name}: loaded values differ from its dequantized FP8 blocks (transformers did not "
                         "apply the scales)")
    path = "fp8-kernel" if device == "cuda" else "dequantized"
    report.fp8_path = path
    detail = (f"{len(expected)} FP8 modules: " + ("all FP8Linear with float8 weights" if device == "cuda"
              else "all dequantized from their FP8 blocks and scales")) if not wrong else (
        f"{len(wrong)} of {len(expected)} FP8 modules wrong, first {wrong[0]}")
    report.add("fp8 path", not wrong, detail)


def validate(dst: Path, src: Path | None = None, device: str = "cpu", kernel: str = "hub",
             prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 20,
             thresholds: Thresholds = Thresholds()) -> ValidateReport:
    """Load, run and compare a converted checkpoint. Never raises for a failed check: see `report.ok`."""
    import torch

    dst = Path(dst)
    report = ValidateReport(dst=str(dst), src=str(src) if src else None, device=device, kernel=kernel)
    if not preflight(report, dst, device, kernel):
        return report
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        model = _load(dst, device, torch.bfloat16)
    except Exception as exc:  # noqa: BLE001 - a load failure is the finding
        report.add("load", False, f"transformers cannot load {dst}: {type(exc).__name__}: {exc}")
        return report
    report.add("load", True, f"{type(model).__name__} loaded")
    _check_fp8_modules(report, model, dst, device)
    tok, prompts, how = _inputs(dst, prompt, device)

    fp8_logits, bad = [], []
    for inputs in prompts:
        logits, bad_modules = forward_with_hooks(model, inputs)
        fp8_logits.append(logits.float().cpu())
        bad = bad or bad_modules
    report.non_finite_modules = bad[:50]
    report.first_non_finite = bad[0] if bad else None
    report.add("finite outputs", not bad,
               f"every module's output is finite on {len(prompts)} prompt(s)" if not bad else
               f"first module with NaN/Inf output: {bad[0]} ({len(bad)} modules in all)")

    report.generation = _generate(model, tok, prompts[0], max_new_tokens, how, report)
    if device == "cuda":
        report.peak_gpu_memory_bytes = int(torch.cuda.max_memory_allocated())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    if src is not None:
        _compare_with_source(report, Path(src), device, prompts, fp8_logits, thresholds)
    return report


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


def _compare_with_source(report, src: Path, device: str, prompts, fp8_logits, thresholds: Thresholds) -> None:
    import torch

    try:
        reference = _load(src, device, torch.bfloat16)
    except Exception as exc:  # noqa: BLE001
        report.add("source", False, f"transformers cannot load the source {src}: {type(exc).__name__}: {exc}")
        return
    ref_logits = []
    with torch.no_grad():
        for inputs in prompts:
            ref_logits.append(reference(**inputs).logits.float().cpu())
    del reference
    gc.collect()
    stats = compare_logits(torch.cat([x.flatten(0, -2) for x in fp8_logits]),
                           torch.cat([x.flatten(0, -2) for x in ref_logits]))
    stats["thresholds"] = asdict(thresholds)
    report.logits = stats
    ok = (stats["finite"] and stats["cosine_mean"] >= thresholds.min_cosine
          and stats["top1_agreement"] >= thresholds.min_top1 and stats["kl_mean"] <= thresholds.max_kl)
    report.add("logits vs source", ok,
               f"cosine {stats['cosine_mean']:.4f} (min {thresholds.min_cosine}), top-1 {stats['top1_agreement']:.3f} "
               f"(min {thresholds.min_top1}), KL {stats['kl_mean']:.2e} (max {thresholds.max_kl}) over "
               f"{stats['positions']} positions")


def describe_report(report: ValidateReport) -> str:
    lines = [f"validate {report.dst} on {report.device}" + (f" with kernel {report.kernel}" if report.device == "cuda" else "")]
    lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in report.checks]
    if report.generation and "text" in report.generation:
        lines.append(f"  generated: {report.generation['text']!r}")
    if report.peak_gpu_memory_bytes:
        lines.append(f"  peak GPU memory: {report.peak_gpu_memory_bytes / 2**30:.2f} GiB")
    lines.append("validate: OK" if report.ok else
                 f"validate: FAILED ({', '.join(c.name for c in report.checks if not c.ok)})")
    return "\n".join(lines)
