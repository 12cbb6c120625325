"""The model card: the source's front matter that still holds, the base model, and lists that render nested."""

import pytest
import yaml
from markdown_it import MarkdownIt

from converter.card import model_card
from converter.configs import FP8Scheme
from converter.plan import make_plan
from converter.presets import load_preset
from converter.source import open_source

from .conftest import run_cli

GEMMA_CARD = """---
license: gemma
library_name: transformers
pipeline_tag: image-text-to-text
extra_gated_heading: Access Gemma on Hugging Face
extra_gated_prompt: >-
  To access Gemma on Hugging Face, you're required to review and agree to
  Google's usage license.
extra_gated_button_content: Acknowledge license
base_model: google/gemma-4-31b-pt
tags:
- gemma
model-index:
- name: gemma-4-31b-it
  results: []
---
# Gemma 4 31B IT

The source's own text.
"""


@pytest.fixture(scope="module")
def plan(gemma_src):
    preset = load_preset("default")
    return make_plan(open_source(gemma_src), FP8Scheme(preset.block_size), preset.modules_to_not_convert, 5 * 10**9)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:card.index("\n---\n", 4)])


def test_the_source_front_matter_that_holds_is_kept(plan):
    card = model_card(plan, base_model="google/gemma-4-31B-it", repo_name="gemma-4-31B-it-FP8",
                      source_card=GEMMA_CARD, base_model_id="google/gemma-4-31B-it", commit="a" * 40)
    assert front_matter(card) == {
        "license": "gemma",
        "pipeline_tag": "image-text-to-text",
        "library_name": "transformers",
        "base_model": "google/gemma-4-31B-it",
        "base_model_relation": "quantized",
        "tags": ["gemma", "fp8", "convert-fp8"],
        "extra_gated_heading": "Access Gemma on Hugging Face",
        "extra_gated_prompt": "To access Gemma on Hugging Face, you're required to review and agree to Google's "
                              "usage license.",
        "extra_gated_button_content": "Acknowledge license",
    }
    assert f"version of `google/gemma-4-31B-it` at commit `{'a' * 40}`" in card
    assert "The source's own text" not in card


def test_a_local_source_without_a_hub_id_names_no_base_model(plan):
    card = model_card(plan, base_model="gemma-4-tiny", repo_name="gemma-4-tiny-FP8", source_card="# no metadata\n")
    assert front_matter(card) == {"tags": ["fp8", "convert-fp8"]}
    assert "version of `gemma-4-tiny` (" in card


def test_unreadable_source_metadata_is_said_in_the_card(plan):
    card = model_card(plan, base_model="x", repo_name="x-FP8", source_card="---\nlicense: [gemma\n---\n")
    assert front_matter(card) == {"tags": ["fp8", "convert-fp8"]}
    assert "> The source card's metadata could not be read (" in card


def nested_items(card: str) -> dict[str, list[str]]:
    """Each top-level list item's text -> the texts of the items of the list nested in it, as Markdown renders."""
    tokens = MarkdownIt("commonmark").parse(card)
    out, depth, parent = {}, 0, None
    for tok in tokens:
        if tok.type == "bullet_list_open":
            depth += 1
        elif tok.type == "bullet_list_close":
            depth -= 1
        elif tok.type == "inline" and depth == 1:
            parent = tok.content
            out[parent] = []
        elif tok.type == "inline" and depth == 2:
            out[parent].append(tok.content)
    return out


def test_the_kept_lists_render_as_sub_lists(plan):
    card = model_card(plan, base_model="x", repo_name="x-FP8")
    items = nested_items(card)
    assert items["Kept in the source dtype, by module path (`modules_to_not_convert`):"] == [
        f"`{m}`" for m in plan.modules_to_not_convert]
    assert items["Why Linears were kept:"] == sorted(set(plan.kept_linears.values()))
    assert plan.modules_to_not_convert and plan.kept_linears  # the sub-lists checked are not empty
    assert items["`ignored_layers` lists every Linear kept unquantized by its full name, for vLLM and SGLang."] == []


def test_the_written_card_keeps_the_gemma_licence(gemma_copy, tmp_path):
    (gemma_copy / "README.md").write_text(GEMMA_CARD)
    dst = tmp_path / "out"
    result = run_cli("--src", gemma_copy, "--dst", dst, "--no-arch-check", "--base-model", "google/gemma-4-31B-it")
    assert result.exit_code == 0, result.output
    card = (dst / "README.md").read_text()
    meta = front_matter(card)
    assert (meta["license"], meta["base_model"], meta["base_model_relation"]) == (
        "gemma", "google/gemma-4-31B-it", "quantized")
    assert "# gemma-4-31B-it-FP8" in card
