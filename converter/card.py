"""The model card (README.md) of an output: pure text from the plan and the source's own card.

The front matter keeps what still holds for the FP8 copy (licence, languages, task, library, gating prompts,
tags) so that the card can be uploaded as is, and names the source as its quantized base model. A dequantized
checkpoint's card (`decoded_card`) keeps the same keys.
"""

from __future__ import annotations

from pathlib import Path

from . import __version__
from .configs import format_size
from .dialects.decoded import CONFIG_DTYPE_NAMES
from .plan import DECODE, Plan

# Source front-matter keys that hold for a quantized copy as well, in the order they are written. `base_model`
# (the source's own base), `model-index` (its evaluation results) and the rest describe the source only.
KEPT_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag", "library_name")
GATED_PREFIX = "extra_gated_"
OWN_TAGS = ("fp8", "convert-fp8")


class UnreadableFrontMatter(ValueError):
    """The source card's front matter is not a YAML mapping."""


def source_front_matter(card: str | None) -> dict:
    """The YAML front matter of a model card (`---` lines around it, at the very top), as a dict.

    Raises:
        UnreadableFrontMatter: it is there but is not valid YAML, or not a mapping.
    """
    import yaml

    if not card:
        return {}
    lines = card.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise UnreadableFrontMatter("no closing '---' line") from None
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as exc:
        raise UnreadableFrontMatter(str(exc).splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UnreadableFrontMatter("not a mapping")
    return data


def card_front_matter(source: dict, base_model_id: str | None) -> dict:
    """What the FP8 card's front matter holds: the kept source keys, the base model and the tags."""
    out = {key: source[key] for key in KEPT_KEYS if key in source}
    if base_model_id:
        out["base_model"] = base_model_id
        out["base_model_relation"] = "quantized"
    tags = source.get("tags")
    tags = [tags] if isinstance(tags, str) else list(tags) if isinstance(tags, list) else []
    out["tags"] = list(dict.fromkeys([*tags, *OWN_TAGS]))
    out.update({key: value for key, value in source.items() if str(key).startswith(GATED_PREFIX)})
    return out


def model_card(plan: Plan, base_model: str, repo_name: str, source_card: str | None = None,
               base_model_id: str | None = None, commit: str | None = None,
               requantized_from: str | None = None) -> str:
    """The README.md of the FP8 checkpoint.

    Args:
        plan (`Plan`): the conversion.
        base_model (`str`): the source's name, as the text shows it.
        repo_name (`str`): the FP8 checkpoint's name, for the loading example.
        source_card (`str`, *optional*): the source's README.md; its front matter that still holds is kept.
        base_model_id (`str`, *optional*): the source's Hub id, written as `base_model` (left out when unknown:
            the Hub refuses a card whose `base_model` is not a model id).
        commit (`str`, *optional*): the Hub commit the source was read at.
        requantized_from (`str`, *optional*): what the source is when it is an FP8 checkpoint itself, re-quantized.
    """
    import yaml

    try:
        source_meta, unreadable = source_front_matter(source_card), None
    except UnreadableFrontMatter as exc:
        source_meta, unreadable = {}, str(exc)
    front = yaml.safe_dump(card_front_matter(source_meta, base_model_id), sort_keys=False, allow_unicode=True,
                           default_flow_style=False, width=1000)
    dialect = plan.dialect
    archs = plan.config.get("architectures") or ["(unknown architecture)"]
    excluded = _items(f"`{m}`" for m in plan.modules_to_not_convert)
    kept = _items(sorted(set(plan.kept_linears.values())))
    origin = f"`{base_model}`" + (f" at commit `{commit}`" if commit else "")
    warning = (f"\n> The source card's metadata could not be read ({unreadable}): copy its licence into the front "
               "matter above before publishing.\n" if unreadable else "")
    if requantized_from:
        warning += (f"\n> Re-quantized from an FP8 checkpoint, {origin}: {requantized_from}.\n> Its weights were "
                    "decoded to BF16 (as `convert-fp8 dequantize` decodes them) and quantized again. This is a\n> "
                    "lossy step on top of the source's own quantization: the values are not those a conversion of "
                    "the\n> original BF16 weights gives.\n")
    return f"""---
{front}---
# {repo_name}

{dialect.card_title} version of {origin} ({archs[0]}), converted offline by
convert-fp8 {__version__} without loading the model.
{warning}
- {dialect.card_weights(len(plan.fp8_modules))}
- Dialect: {dialect.label}; loaded by {dialect.servers}.
- Tensor data: {format_size(plan.source_nbytes)} in the source, {format_size(plan.output_nbytes)} here.

## Why these settings
- {dialect.card_why()}
- Kept in the source dtype, by module path (`{dialect.exclusion_key}`):
{excluded}
- Why Linears were kept:
{kept}
- {dialect.card_ignored}

## Usage
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_name}", dtype="auto", device_map="auto")
tok = AutoTokenizer.from_pretrained("{repo_name}")
```
(Use the auto class that matches `{archs[0]}`, e.g. `AutoModelForImageTextToText` for vision-language models.)
{dialect.card_loading}
"""


def _items(texts) -> str:
    """A sub-list under a list item: indented to the item's text, or Markdown renders it as the outer list."""
    return "\n".join(f"  - {t}" for t in texts) or "  - (none)"


def decoded_card(plan: Plan, values_text: str, base_model: str, source_card: str | None = None,
                 base_model_id: str | None = None, commit: str | None = None) -> str:
    """The model card of a dequantized checkpoint: where it comes from and how it was made. The front matter of
    the source's card that still holds (licence, language, task, library, tags, gating prompts) is kept, as the
    conversion keeps it; `base_model` is written only when the source's Hub id is known. `values_text` says
    how the source dialect's scales read (its reader's `values_text`)."""
    import yaml

    try:
        meta, unreadable = source_front_matter(source_card), None
    except UnreadableFrontMatter as exc:
        meta, unreadable = {}, str(exc)
    decoded = [t for t in plan.tensors if t.action == DECODE]
    dtype = CONFIG_DTYPE_NAMES[decoded[0].dtype] if decoded else "bfloat16"
    front = {key: meta[key] for key in KEPT_KEYS if key in meta}
    if base_model_id:
        front["base_model"] = base_model_id
    tags = meta.get("tags")
    tags = [tags] if isinstance(tags, str) else list(tags) if isinstance(tags, list) else []
    front["tags"] = list(dict.fromkeys([*(t for t in tags if t != "fp8"), dtype, "convert-fp8"]))
    front.update({key: value for key, value in meta.items() if str(key).startswith(GATED_PREFIX)})
    front_text = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    archs = plan.config.get("architectures") or ["(unknown architecture)"]
    origin = f"`{base_model}`" + (f" at commit `{commit}`" if commit else "")
    warning = (f"\n> The source card's metadata could not be read ({unreadable}): copy its licence into the front "
               "matter above before publishing.\n" if unreadable else "")
    return f"""---
{front_text}---
# {Path(base_model).name}, dequantized to {dtype}

{origin} ({archs[0]}) with its FP8 weights dequantized to {dtype} by `convert-fp8 dequantize` {__version__},
streaming, without loading the model.
{warning}
- Source: {plan.decoded_from}.
- {len(decoded)} FP8 weights dequantized: each E4M3 value times its block's scale in float32,
  rounded once to {dtype}, {values_text}.
  The scale tensors are dropped and `quantization_config` is removed from the config.
- Every other tensor and file is copied unchanged.
- Tensor data: {format_size(plan.source_nbytes)} in the source, {format_size(plan.output_nbytes)} here.

The values are those of the FP8 checkpoint: dequantizing does not restore what quantization lost.
"""
