"""Validation of a converted checkpoint by running it: load with transformers, confirm the FP8 path is taken,
find the first module whose output is not finite, compare with the BF16 source and, for generative models,
generate.

What is compared follows the model's kind, as transformers' auto classes name it (`model_kind`): causal LMs and
image-text models compare logits (cosine, top-1, KL) and generate; encoders (base models, and
sentence-transformers folders with `modules.json`) compare pooled sentence embeddings by cosine and by the ranking
of their pairwise similarities; other text heads (sequence classification, masked LM, seq2seq, ...) compare their
main output tensor. A kind it cannot judge (vision, audio, multiple choice) is refused before anything loads.

On a GPU (compute capability 8.9+) transformers runs FP8 matmuls through the `finegrained-fp8` kernel; on a CPU it
dequantizes on load, which this checks too (every FP8 module's weight must equal its dequantized blocks), so the
same command runs end to end without a GPU. Every kind takes the same code on either device.
"""

from __future__ import annotations

import gc
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import arch
from .configs import CONFIG_NAME, FP8_DTYPE_NAME
from .errors import SourceError, UsageError
from .kernels.loading import package_version, prepare_kernel
from .plan import module_of

REPORT_NAME = "convert-fp8-validate.json"
DEFAULT_PROMPT = "Say hello in one short sentence."
RAW_PROMPT = "The capital of France is"
# Three topics, two sentences each: a faithful encoder ranks the pairs within a topic as its BF16 source does.
SENTENCES = (
    "A man is playing a guitar on the stage.",
    "Someone plays an acoustic guitar for the crowd.",
    "The stock market fell sharply this morning.",
    "Shares dropped as investors sold their stocks.",
    "Heavy rain is falling over the city tonight.",
    "It has been raining in the town all night.",
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")

GENERATIVE, ENCODER, HEAD = "generative", "encoder", "head"
# transformers' auto-class mappings, by the kind of comparison their models get; the first that lists the
# checkpoint's architecture decides (Gemma 4 is in the causal-LM and the pretraining mappings)
_GENERATIVE_TASKS = ("CAUSAL_LM", "IMAGE_TEXT_TO_TEXT", "MULTIMODAL_LM")
_ENCODER_TASKS = ("TEXT_ENCODING", "")  # "" is MODEL_MAPPING_NAMES: the base models
_HEAD_TASKS = ("SEQUENCE_CLASSIFICATION", "TOKEN_CLASSIFICATION", "MASKED_LM", "QUESTION_ANSWERING",
               "SEQ_TO_SEQ_CAUSAL_LM", "NEXT_SENTENCE_PREDICTION", "PRETRAINING")
# sentence-transformers' pooling modes, in the order its Pooling module concatenates them
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                 "lasttoken")


@dataclass(frozen=True)
class Thresholds:
    """Agreement with the BF16 source that a conversion must reach. Logits and head outputs: means over
    positions (rows of the last dimension). Encoders: over the sentences and their pairs."""

    min_cosine: float = 0.98
    min_top1: float = 0.80
    max_kl: float = 0.05
    min_embedding_cosine: float = 0.99
    min_rank_correlation: float = 0.90


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence embedding."""

    modes: tuple[str, ...]  # from POOLING_MODES; several are concatenated
    normalize: bool
    origin: str  # the config it was read from, or "default"
    not_applied: tuple[str, ...] = ()  # sentence-transformers modules after pooling that are not reproduced

    def describe(self) -> str:
        text = "+".join(m.removesuffix("_tokens").removesuffix("_token") for m in self.modes) + " pooling"
        text += ", normalized" if self.normalize else ""
        text += f" ({self.origin})"
        if self.not_applied:
            text += f"; not applied: {', '.join(self.not_applied)} (copied unchanged: compared before them)"
        return text


@dataclass(frozen=True)
class ModelKind:
    """What `validate` runs and compares for a checkpoint."""

    kind: str  # GENERATIVE, ENCODER or HEAD
    architecture: str
    task: str  # the auto-class mapping that lists the architecture, in words
    pooling: Pooling | None = None  # encoders
    auto_model: bool = False  # sentence-transformers folders load with AutoModel, as sentence-transformers does

    def describe(self) -> str:
        what = {GENERATIVE: "logits, top-1, KL and generation", ENCODER: "sentence embeddings",
                HEAD: "its main output tensor"}[self.kind]
        text = f"{self.architecture}, {self.task} ({self.kind}): compares {what}"
        return text + (f"; {self.pooling.describe()}" if self.pooling else "")


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
    kind: dict | None = None  # ModelKind as a dict
    fp8_path: str | None = None  # "fp8-kernel" or "dequantized"
    checks: list[Check] = field(default_factory=list)
    first_non_finite: str | None = None
    non_finite_modules: list[str] = field(default_factory=list)
    logits: dict | None = None  # generative models
    embeddings: dict | None = None  # encoders
    head_output: dict | None = None  # other heads: their main output tensor
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


def model_kind(folder: Path, config: dict) -> ModelKind:
    """The kind of model `folder` holds, from its config's architecture and transformers' auto classes, and for
    sentence-transformers folders from `modules.json` and the pooling config.

    Raises:
        UsageError: a kind `validate` cannot judge ("cannot validate this kind: ...").
        SourceError: an unreadable `modules.json` or pooling config.
    """
    import transformers
    from transformers.models.auto import modeling_auto

    folder = Path(folder)
    arch = (config.get("architectures") or [None])[0]
    model_class = getattr(transformers, arch, None) if arch else None
    if model_class is None:
        raise UsageError(f"cannot validate this kind: {folder / CONFIG_NAME} names the architecture {arch!r}, "
                         f"which transformers {transformers.__version__} does not know")
    tasks = [task for task in _all_tasks(modeling_auto) if arch in _architectures(modeling_auto, task)]
    pooling = sentence_transformers_pooling(folder)
    text_input = getattr(model_class, "main_input_name", "input_ids") == "input_ids"
    if pooling is not None and text_input:
        return ModelKind(ENCODER, arch, "sentence-transformers model", pooling, auto_model=True)
    for task in tasks if text_input else ():
        words = _task_words(task)
        if task in _GENERATIVE_TASKS:
            return ModelKind(GENERATIVE, arch, words)
        if task in _ENCODER_TASKS and not config.get("is_encoder_decoder"):
            return ModelKind(ENCODER, arch, words, Pooling(("mean_tokens",), False, "default"))
        if task in _HEAD_TASKS or task in _ENCODER_TASKS:
            return ModelKind(HEAD, arch, words)
    words = _task_words(tasks[0]) if tasks else ""
    what = f"{'an' if words[:1] in tuple('aeiou') else 'a'} {words} model" if tasks else (
        "in none of transformers' auto classes")
    what += f", taking {model_class.main_input_name}" if not text_input else ""
    raise UsageError(f"cannot validate this kind: {arch} ({folder / CONFIG_NAME}) is {what}; validate runs "
                     "text models: causal LMs, image-text models, encoders, and classification, masked-LM, "
                     "question-answering or seq2seq heads")


def _all_tasks(modeling_auto) -> list[str]:
    """Every auto-class mapping's task, e.g. "CAUSAL_LM", with "" for MODEL_MAPPING_NAMES, the handled ones first
    in the order they decide."""
    found = [n[len("MODEL_FOR_"):-len("_MAPPING_NAMES")] for n in dir(modeling_auto)
             if n.startswith("MODEL_FOR_") and n.endswith("_MAPPING_NAMES")]
    handled = _GENERATIVE_TASKS + _ENCODER_TASKS + _HEAD_TASKS
    return [t for t in handled if t in found or t == ""] + sorted(t for t in found if t not in handled)


def _architectures(modeling_auto, task: str) -> set[str]:
    mapping = getattr(modeling_auto, f"MODEL_FOR_{task}_MAPPING_NAMES" if task else "MODEL_MAPPING_NAMES", {})
    names = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def _task_words(task: str) -> str:
    words = {"": "base model", "CAUSAL_LM": "causal LM", "MASKED_LM": "masked LM", "MULTIMODAL_LM": "multimodal LM",
             "SEQ_TO_SEQ_CAUSAL_LM": "seq2seq LM", "TEXT_ENCODING": "text encoder"}
    return words.get(task, task.lower().replace("_", " "))


def sentence_transformers_pooling(folder: Path) -> Pooling | None:
    """The pooling of a sentence-transformers folder (`modules.json`, `1_Pooling/config.json`, a `Normalize`
    module), or None when `folder` is not one.

    Raises:
        SourceError: `modules.json` or the pooling config cannot be read.
        UsageError: the transformer module is not the folder itself (the converted weights would not be it).
    """
    path = Path(folder) / "modules.json"
    if not path.is_file():
        return None
    modules = _read_json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise SourceError(f"{path}: expected a list of modules")
    modes, normalize, origin, not_applied = ("mean_tokens",), False, "modules.json has no Pooling module", []
    for module in modules:
        kind = str(module.get("type", "")).rpartition(".")[2]
        where = module.get("path", "")
        if kind == "Transformer":
            if where not in ("", "."):
                raise UsageError(f"cannot validate this kind: {path} puts the transformer in {where}/, not in the "
                                 "folder that was converted")
        elif kind == "Pooling":
            pooling_path = Path(folder) / where / CONFIG_NAME
            pooling = _read_json(pooling_path)
            if not isinstance(pooling, dict):
                raise SourceError(f"{pooling_path}: expected an object of pooling_mode_* settings")
            modes = tuple(m for m in POOLING_MODES if pooling.get(f"pooling_mode_{m}"))
            if not modes:
                raise UsageError(f"cannot validate this kind: {pooling_path} enables no pooling mode this knows "
                                 f"({', '.join(POOLING_MODES)})")
            origin = f"{Path(where) / CONFIG_NAME}"
        elif kind == "Normalize":
            normalize = True
        else:
            not_applied.append(f"{kind or '?'} ({where or module.get('name', '?')})")
    return Pooling(modes, normalize, origin, tuple(not_applied))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SourceError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot read: {exc}") from None


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
        from .dialects import writer_from_config

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


def main_output(output) -> tuple[str, object]:
    """The first floating-point tensor of a model's output (the logits of a head; the last hidden state of a base
    model), with its name."""
    import torch

    items = output.items() if isinstance(output, dict) else ((f"output[{i}]", v) for i, v in enumerate(output))
    for name, value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return name, value
    raise ValueError(f"no floating-point tensor in the model's output ({type(output).__name__})")


def pool(hidden, attention_mask, pooling: Pooling):
    """One sentence embedding from token states (1, tokens, dim), as sentence-transformers' Pooling and
    Normalize modules compute it."""
    import torch

    h = hidden[0].float()
    mask = attention_mask[0].to(h.device, torch.float32)[:, None]
    count = mask.sum().clamp(min=1)
    parts = []
    for mode in pooling.modes:
        if mode == "cls_token":
            parts.append(h[0])
        elif mode == "max_tokens":
            parts.append(h.masked_fill(mask == 0, float("-inf")).max(0).values)
        elif mode == "mean_tokens":
            parts.append((h * mask).sum(0) / count)
        elif mode == "mean_sqrt_len_tokens":
            parts.append((h * mask).sum(0) / count.sqrt())
        elif mode == "weightedmean_tokens":
            weights = torch.arange(1, h.shape[0] + 1, device=h.device, dtype=h.dtype)[:, None] * mask
            parts.append((h * weights).sum(0) / weights.sum())
        elif mode == "lasttoken":
            parts.append(h[int(mask[:, 0].nonzero().max())])
    embedding = torch.cat(parts)
    return torch.nn.functional.normalize(embedding, dim=0) if pooling.normalize else embedding


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
        "top1_agreement": _top1_agreement(a, b),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "finite": bool(torch.isfinite(a).all()),
    }


def _top1_agreement(a, b) -> float:
    """Share of rows whose largest entry is at the same place; a row with NaN or Inf never agrees (argmax would
    call an all-NaN row's first entry its largest)."""
    import torch

    agree = (a.argmax(-1) == b.argmax(-1)) & torch.isfinite(a).all(-1)
    return float(agree.float().mean())


def compare_embeddings(fp8, ref) -> dict:
    """Sentence embeddings (sentences, dim) against the source's: cosine per sentence, and how the cosine
    similarities of every pair of sentences rank (Spearman correlation) and pick each sentence's nearest one."""
    import torch
    import torch.nn.functional as F

    a, b = fp8.float(), ref.float()
    cosine = F.cosine_similarity(a, b, dim=-1)
    sim_a, sim_b = _pairwise_cosine(a), _pairwise_cosine(b)
    upper = torch.triu_indices(len(a), len(a), offset=1)
    pairs_a, pairs_b = sim_a[upper[0], upper[1]], sim_b[upper[0], upper[1]]
    eye = torch.eye(len(a), dtype=torch.bool)
    nearest_a = sim_a.masked_fill(eye, float("-inf")).argmax(-1)
    nearest_b = sim_b.masked_fill(eye, float("-inf")).argmax(-1)
    return {
        "sentences": int(a.shape[0]),
        "dim": int(a.shape[1]),
        "pairs": int(pairs_a.numel()),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "rank_correlation": spearman(pairs_a, pairs_b),
        "nearest_agreement": float((nearest_a == nearest_b).float().mean()),
        "finite": bool(torch.isfinite(a).all()),
    }


def _pairwise_cosine(x):
    import torch.nn.functional as F

    unit = F.normalize(x, dim=-1)
    return unit @ unit.T


def spearman(x, y) -> float:
    """Spearman rank correlation of two 1-D tensors (NaN when either holds a non-finite value)."""
    import torch

    if not (torch.isfinite(x).all() and torch.isfinite(y).all()) or x.numel() < 2:
        return float("nan")
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def compare_outputs(fp8, ref) -> dict:
    """A head's main output against the source's: cosine per row of the last dimension (the whole tensor as one
    vector when that dimension is 1) and top-1 agreement along it, plus the relative error."""
    import torch
    import torch.nn.functional as F

    a, b = fp8.float(), ref.float()
    if a.shape[-1] > 1:
        a, b = a.flatten(0, -2), b.flatten(0, -2)
    else:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    cosine = F.cosine_similarity(a, b, dim=-1)
    return {
        "rows": int(a.shape[0]),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "top1_agreement": _top1_agreement(a, b) if fp8.shape[-1] > 1 else None,
        "relative_error": float((a - b).norm() / b.norm()) if float(b.norm()) > 0 else float((a - b).norm()),
        "finite": bool(torch.isfinite(a).all()),
    }


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


def _tokenizer(dst: Path):
    from transformers import AutoTokenizer

    # without these, transformers builds an empty tokenizer from the config that maps every word to unknown
    if not any((dst / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(dst)
    except Exception:  # noqa: BLE001 - no usable tokenizer: fall back to fixed ids
        return None


def _inputs(dst: Path, prompt: str, device: str):
    """Tokenized prompts: the chat prompt (with the checkpoint's chat template when it has one) and a raw one."""
    tok = _tokenizer(dst)
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


def _sentence_inputs(dst: Path, config, device: str) -> tuple[list[dict], str]:
    """SENTENCES tokenized one at a time (no padding to get wrong), or fixed ids without a tokenizer; seq2seq
    models get the sentence, shifted right, as decoder input."""
    import torch

    tok = _tokenizer(dst)
    if tok is not None:
        batches = [dict(tok(s, return_tensors="pt")) for s in SENTENCES]
        how = f"{len(SENTENCES)} sentences"
    else:
        vocab = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", 256)
        batches = [{"input_ids": torch.tensor([[(7 + 31 * i + 17 * j) % (vocab - 1) + 1 for j in range(10)]])}
                   for i in range(len(SENTENCES))]
        how = f"no tokenizer in the checkpoint: {len(SENTENCES)} fixed token-id sequences"
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None) or getattr(config, "pad_token_id", None) or 0
        for batch in batches:
            ids = batch["input_ids"]
            batch["decoder_input_ids"] = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)
    return [{k: v.to(device) for k, v in b.items()} for b in batches], how


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

    from .dialects import writer_from_config

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


def validate(dst: Path, src: Path | None = None, device: str = "cpu", kernel: str = "hub",
             prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 20,
             thresholds: Thresholds = Thresholds()) -> ValidateReport:
    """Load, run and compare a converted checkpoint. Never raises for a failed check: see `report.ok`.

    Raises:
        UsageError: a kind of model it cannot judge ("cannot validate this kind: ...").
        SourceError: a sentence-transformers folder whose `modules.json` or pooling config cannot be read.
    """
    import torch

    dst = Path(dst)
    report = ValidateReport(dst=str(dst), src=str(src) if src else None, device=device, kernel=kernel)
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
            tok, inputs, how = _inputs(dst, prompt, device)
        else:
            inputs, how = _sentence_inputs(dst, model.config, device)
    except Exception as exc:  # noqa: BLE001 - a tokenizer or chat template that fails is the finding
        report.add("inputs", False, f"cannot tokenize the inputs with the checkpoint's tokenizer: "
                                    f"{type(exc).__name__}: {exc}")
        return report
    if kind.kind == GENERATIVE:
        extract = _logits
    else:
        extract = (lambda out, batch: _embedding(out, batch, kind.pooling)) if kind.kind == ENCODER else _main
    fp8_results = _run_checked(report, model, inputs, extract, how)
    if fp8_results is not None and kind.kind == GENERATIVE:
        report.generation = _generate(model, tok, inputs[0], max_new_tokens, how, report)
    if device == "cuda":
        report.peak_gpu_memory_bytes = int(torch.cuda.max_memory_allocated())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    if src is not None and fp8_results is not None:
        ref_results = _reference(report, Path(src), device, kind, inputs, extract)
        if ref_results is not None:
            _compare(report, kind, fp8_results, ref_results, thresholds)
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


def _compare(report: ValidateReport, kind: ModelKind, fp8: list, ref: list, thresholds: Thresholds) -> None:
    import torch

    t = thresholds
    if kind.kind == GENERATIVE:
        stats = compare_logits(torch.cat([x.flatten(0, -2) for x in fp8]), torch.cat([x.flatten(0, -2) for x in ref]))
        stats["thresholds"] = {"min_cosine": t.min_cosine, "min_top1": t.min_top1, "max_kl": t.max_kl}
        report.logits = stats
        ok = (stats["finite"] and stats["cosine_mean"] >= t.min_cosine and stats["top1_agreement"] >= t.min_top1
              and stats["kl_mean"] <= t.max_kl)
        report.add("logits vs source", ok,
                   f"cosine {stats['cosine_mean']:.4f} (min {t.min_cosine}), top-1 {stats['top1_agreement']:.3f} "
                   f"(min {t.min_top1}), KL {stats['kl_mean']:.2e} (max {t.max_kl}) over "
                   f"{stats['positions']} positions")
    elif kind.kind == ENCODER:
        stats = compare_embeddings(torch.stack(fp8), torch.stack(ref))
        stats["thresholds"] = {"min_embedding_cosine": t.min_embedding_cosine,
                               "min_rank_correlation": t.min_rank_correlation}
        report.embeddings = stats
        ok = (stats["finite"] and stats["cosine_mean"] >= t.min_embedding_cosine
              and stats["rank_correlation"] >= t.min_rank_correlation)
        report.add("embeddings vs source", ok,
                   f"cosine {stats['cosine_mean']:.4f} (min {t.min_embedding_cosine}; lowest "
                   f"{stats['cosine_min']:.4f}), similarity ranking {stats['rank_correlation']:.3f} (Spearman, min "
                   f"{t.min_rank_correlation}) over {stats['pairs']} pairs of {stats['sentences']} sentences, "
                   f"nearest sentence kept {stats['nearest_agreement']:.2f}")
    else:
        name = fp8[0][0]
        stats = compare_outputs(torch.cat([x for _, x in fp8]), torch.cat([x for _, x in ref]))
        stats["name"] = name
        stats["thresholds"] = {"min_cosine": t.min_cosine, "min_top1": t.min_top1}
        report.head_output = stats
        top1 = stats["top1_agreement"]
        ok = stats["finite"] and stats["cosine_mean"] >= t.min_cosine and (top1 is None or top1 >= t.min_top1)
        report.add(f"{name} vs source", ok,
                   f"cosine {stats['cosine_mean']:.4f} (min {t.min_cosine}), "
                   + (f"top-1 {top1:.3f} (min {t.min_top1}), " if top1 is not None else "")
                   + f"relative error {stats['relative_error']:.2e} over {stats['rows']} rows")


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
