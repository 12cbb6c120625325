"""GPU check: the builtin FP8 kernel on real shapes, and tiny + real-shape Gemma-4 conversions and a tiny
sentence-transformers BERT encoder validated with transformers' FP8Linear on the GPU; then the tiny Gemma-4
output served by vLLM (`validate --engine vllm`, under CONVERT_FP8_VLLM_PYTHON or this Python; a row saying
vLLM is not installed where it is not). Prints one table; writes gpu_check.json (to $OUT when set).

    python bench/gpu_check.py [--device cuda] [--kernel builtin|hub|local:PATH] [--vocab 262144] [--skip-slice]

Runs in about 3-5 minutes on one H100/H200. With --device cpu (and TRITON_INTERPRET=1) it runs the same steps on
small shapes, to check the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from converter.configs import ConvertOptions  # noqa: E402
from converter.convert import convert  # noqa: E402
from converter.demo import build_gemma4_checkpoint, build_sentence_encoder  # noqa: E402
from converter.presets import load_preset  # noqa: E402
from converter.validate import validate  # noqa: E402

RESULTS: dict = {}


def stage(name):
    def wrap(func):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                RESULTS[name] = func(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a failed stage is reported and the rest still run
                RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            RESULTS[name] = dict(RESULTS[name] or {}, seconds=round(time.perf_counter() - start, 1))
            print(f"[{name}] {json.dumps(RESULTS[name])[:600]}", flush=True)
        return run
    return wrap


@stage("environment")
def environment(device):
    import importlib.metadata as md

    info = {"python": sys.version.split()[0], "torch": torch.__version__}
    for pkg in ("transformers", "triton", "kernels", "safetensors"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


@stage("kernel")
def kernel_accuracy(device):
    from converter.kernels.check import REAL_SHAPES, SMALL_SHAPES, check_fp8linear, check_shape

    shapes = REAL_SHAPES if device == "cuda" else SMALL_SHAPES
    return {"shapes": [check_shape(*s, device=device) for s in shapes], "fp8linear": check_fp8linear(device)}


def convert_and_validate(src: Path, dst: Path, device: str, kernel: str, tokens: int,
                         preset: str = "gemma-4-31b-it") -> dict:
    options = ConvertOptions(src=src, dst=dst, preset=load_preset(preset), overwrite=True)
    summary = convert(options)
    report = validate(dst, src, device=device, kernel=kernel, max_new_tokens=tokens)
    return {
        "ok": report.ok,
        "convert_s": round(summary.seconds, 1),
        "convert_gb": round(summary.bytes_in / 1e9, 2),
        "kind": (report.kind or {}).get("kind"),
        "fp8_path": report.fp8_path,
        "checks": {c.name: ("ok " if c.ok else "FAIL ") + c.detail for c in report.checks},
        "first_non_finite": report.first_non_finite,
        "logits": report.logits,
        "embeddings": report.embeddings,
        "tokens_per_s": (report.generation or {}).get("tokens_per_s"),
        "text": (report.generation or {}).get("text"),
        "peak_gpu_gib": round(report.peak_gpu_memory_bytes / 2**30, 2) if report.peak_gpu_memory_bytes else None,
    }


@stage("tiny_gemma4")
def tiny(work: Path, device: str, kernel: str):
    src = build_gemma4_checkpoint(work / "tiny")
    return convert_and_validate(src, work / "tiny-FP8", device, kernel, tokens=20)


@stage("tiny_gemma4_moe")
def tiny_moe(work: Path, device: str, kernel: str):
    """The MoE sibling's structure: on a GPU transformers builds FP8Experts; does it load the experts' scales
    (and leave router.scale alone) so that the logits agree with BF16?"""
    from converter.demo import build_checkpoint, gemma4_moe_config

    src = build_checkpoint(work / "moe", gemma4_moe_config())
    return convert_and_validate(src, work / "moe-FP8", device, kernel, tokens=10, preset="gemma-4-26b-a4b-it")


@stage("tiny_encoder")
def tiny_encoder(work: Path, device: str, kernel: str):
    """A BERT encoder in the sentence-transformers layout: FP8Linear with biases, GELU and LayerNorm around it,
    judged by its mean-pooled, normalized sentence embeddings."""
    src = build_sentence_encoder(work / "encoder", hidden_size=256)
    return convert_and_validate(src, work / "encoder-FP8", device, kernel, tokens=0, preset="default")


@stage("vllm_tiny_gemma4")
def vllm_tiny(work: Path, device: str):
    """The tiny Gemma-4 output (64x64 blocks) in vLLM, against transformers on it and the source in vLLM."""
    report = validate(work / "tiny-FP8", work / "tiny", device=device, max_new_tokens=10, engine="vllm")
    return {"ok": report.ok, "checks": {c.name: ("ok " if c.ok else "FAIL ") + c.detail for c in report.checks},
            "engine_results": report.engine_results}


def build_slice(path: Path, vocab: int, device: str) -> Path:
    """Two text layers of gemma-4-31B (one sliding, one full attention) at their real widths, a small vision
    tower (excluded anyway), random N(0, 0.02) weights, saved in 2 GB shards."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    config = Gemma4Config(
        text_config=dict(vocab_size=vocab, hidden_size=5376, intermediate_size=21504, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=16, head_dim=256, global_head_dim=512,
                         num_global_key_value_heads=4, attention_k_eq_v=True, hidden_size_per_layer_input=0,
                         layer_types=["sliding_attention", "full_attention"], sliding_window=1024,
                         final_logit_softcapping=30.0, tie_word_embeddings=True),
        vision_config=dict(hidden_size=64, intermediate_size=100, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=32, position_embedding_size=64, standardize=True),
        tie_word_embeddings=True)
    with torch.device(device):
        torch.manual_seed(0)
        model = Gemma4ForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2GB")
    from converter.demo import _save_tokenizer

    _save_tokenizer(path, min(vocab, 4096))
    del model
    return path


@stage("real_shape_slice")
def real_slice(work: Path, device: str, kernel: str, vocab: int):
    src = build_slice(work / "slice", vocab, device)
    result = convert_and_validate(src, work / "slice-FP8", device, kernel, tokens=20)
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def table() -> str:
    lines = ["", "| check | result |", "| --- | --- |"]
    env = RESULTS.get("environment", {})
    lines.append(f"| machine | {env.get('gpu', 'cpu')} (cc {env.get('capability', '-')}), torch {env.get('torch')}, "
                 f"transformers {env.get('transformers')}, triton {env.get('triton')} |")
    for r in RESULTS.get("kernel", {}).get("shapes", []):
        tf = f", {r['tflops']:.0f} TFLOP/s" if r.get("tflops") else ""
        lines.append(f"| kernel {'x'.join(map(str, r['shape']))} | rel err {r['rel_err_vs_emulated_f64']:.1e} vs "
                     f"float64 (same act. quant), {r['rel_err_vs_unquantized_f64']:.1e} vs exact activations{tf} |")
    f = RESULTS.get("kernel", {}).get("fp8linear")
    if f:
        lines.append(f"| transformers FP8Linear -> kernel | {f['kernel_calls']} call(s), rel err "
                     f"{f['rel_err_vs_emulated_bf16']:.1e} vs bf16-rounded reference |")
    for name in [n for n in ("tiny_gemma4", "tiny_gemma4_moe", "tiny_encoder", "real_shape_slice",
                              "vllm_tiny_gemma4") if n in RESULTS]:
        r = RESULTS[name]
        if "error" in r:
            lines.append(f"| {name} | ERROR {r['error'][:200]} |")
            continue
        if name.startswith("vllm"):
            lines.append(f"| {name} | {'OK' if r.get('ok') else 'FAILED'}; "
                         + "; ".join(f"{k}: {v}" for k, v in r["checks"].items())[:600] + " |")
            continue
        if r.get("embeddings") is not None:
            e = r["embeddings"]
            lines.append(
                f"| {name} | {'OK' if r.get('ok') else 'FAILED'}; path {r.get('fp8_path')}; embedding cosine "
                f"{e['cosine_mean']:.4f}, similarity ranking {e['rank_correlation']:.3f} over {e['pairs']} pairs; "
                f"first NaN/Inf {r.get('first_non_finite')}; peak {r.get('peak_gpu_gib')} GiB |")
            continue
        lg = r.get("logits") or {}
        tps = r.get("tokens_per_s")
        lines.append(
            f"| {name} | {'OK' if r.get('ok') else 'FAILED'}; path {r.get('fp8_path')}; cosine "
            f"{lg.get('cosine_mean', float('nan')):.4f}, top-1 {lg.get('top1_agreement', float('nan')):.3f}, KL "
            f"{lg.get('kl_mean', float('nan')):.1e}; first NaN/Inf {r.get('first_non_finite')}; "
            f"{tps if tps is None else round(tps, 1)} tok/s; peak {r.get('peak_gpu_gib')} GiB |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernel", default="builtin")
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--skip-slice", action="store_true")
    parser.add_argument("--work", default=None, help="scratch folder [a temporary one]")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    environment(args.device)
    kernel_accuracy(args.device)
    tiny(work, args.device, args.kernel)
    tiny_moe(work, args.device, args.kernel)
    tiny_encoder(work, args.device, args.kernel)
    if "tiny_gemma4" in RESULTS and "error" not in RESULTS["tiny_gemma4"]:
        vllm_tiny(work, args.device)
    if not args.skip_slice:
        real_slice(work, args.device, args.kernel, args.vocab)
    out = Path(os.environ.get("OUT", work))
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2))
    print(table())
    # the MoE stage reports what transformers does with FP8 experts, the vLLM stage what vLLM makes of the output
    # (where it is installed): neither decides the verdict
    ok = all("error" not in r for k, r in RESULTS.items() if k not in ("tiny_gemma4_moe", "vllm_tiny_gemma4")) and all(
        RESULTS[k].get("ok") for k in ("tiny_gemma4", "tiny_encoder", "real_shape_slice") if k in RESULTS)
    print("gpu check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
