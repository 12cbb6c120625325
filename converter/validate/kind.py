"""What kind of model a checkpoint is, as transformers' auto classes name it, and so what `validate` feeds it and
compares: a prompt for generative models, sentences for encoders and other heads (`model_kind`, `inputs`,
`sentence_inputs`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..configs import CONFIG_NAME, FP8_DTYPE_NAME
from ..errors import SourceError, UsageError

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


def checkpoint_fp8_tensors(dst: Path) -> dict[str, str]:
    """FP8 weight name -> shard, from the output's index and headers."""
    from ..source import open_source

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


def _tokenizer(dst: Path):
    from transformers import AutoTokenizer

    # without these, transformers builds an empty tokenizer from the config that maps every word to unknown
    if not any((dst / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(dst)
    except Exception:  # noqa: BLE001 - no usable tokenizer: fall back to fixed ids
        return None


def inputs(dst: Path, prompt: str, device: str):
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


def sentence_inputs(dst: Path, config, device: str) -> tuple[list[dict], str]:
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
