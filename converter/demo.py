"""A small random checkpoint with the structure of gemma-4-31B-it, for `make convert` and the tests.

Text and vision towers, tied lm_head, sliding and full attention layers (full ones without v_proj, as in the
31B), a vision MLP width (100) that does not tile by 64, and planted values: an all-zero tile, an outlier and a
tile of tiny values. Saved by transformers itself in many shards, with a word-level tokenizer and a chat
template, so that every file kind of a real checkpoint is there.

    python -m converter.demo OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PLANTED_ZERO_TILE = "model.language_model.layers.0.mlp.gate_proj.weight"
PLANTED_OUTLIER = "model.language_model.layers.1.self_attn.o_proj.weight"
PLANTED_TINY_TILE = "model.language_model.layers.2.mlp.down_proj.weight"

CHAT_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _gemma4(vocab_size: int, text: dict, vision_layers: int, audio: dict | None = None):
    """A small Gemma4Config: the shared text and vision settings, with `text` overriding."""
    from transformers import Gemma4Config

    two = ["sliding_attention", "full_attention"]
    text_config = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, global_head_dim=128, layer_types=two, sliding_window=16,
        hidden_size_per_layer_input=0, tie_word_embeddings=True,
    )
    text_config.update(text)
    vision_config = dict(
        hidden_size=64, intermediate_size=100, num_hidden_layers=vision_layers, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, position_embedding_size=64, standardize=True,
    )
    return Gemma4Config(text_config=text_config, vision_config=vision_config, audio_config=audio,
                        tie_word_embeddings=True)


def gemma4_config(vocab_size: int = 512):
    """gemma-4-31B's structure, small: 4 layers, full-attention ones sharing keys and values (no v_proj)."""
    return _gemma4(vocab_size, dict(
        num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_global_key_value_heads=1,
        attention_k_eq_v=True, final_logit_softcapping=30.0), vision_layers=2)


def gemma4_moe_config(vocab_size: int = 512):
    """gemma-4-26B-A4B's structure, small: 4 experts, widths 192 (tile by 64, not by 128)."""
    return _gemma4(vocab_size, dict(
        hidden_size=192, num_global_key_value_heads=1, attention_k_eq_v=True, enable_moe_block=True,
        num_experts=4, top_k_experts=2, moe_intermediate_size=192), vision_layers=1)


def gemma4_small_config(vocab_size: int = 512):
    """gemma-4-E2B/E4B's structure, small: per-layer embeddings, audio and vision towers."""
    return _gemma4(vocab_size, dict(hidden_size_per_layer_input=64, vocab_size_per_layer_input=vocab_size),
                   vision_layers=1, audio=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                               subsampling_conv_channels=[16, 8], output_proj_dims=128))


def build_checkpoint(path: Path, config, seed: int = 0, max_shard_size: str = "100KB") -> Path:
    """Save a random Gemma-4 of `config` in `path`, with random router scales (their init is all ones)."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("router.scale", "router.per_expert_scale")):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    _save_tokenizer(Path(path), config.text_config.vocab_size)
    return Path(path)


def build_gemma4_checkpoint(path: Path, seed: int = 0, max_shard_size: str = "100KB", dtype=None) -> Path:
    """Save a random tiny Gemma-4 (31B structure) checkpoint in `path` and return it."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    dtype = dtype or torch.bfloat16
    path = Path(path)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(gemma4_config()).to(dtype).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        params[PLANTED_ZERO_TILE][:64, :64] = 0
        params[PLANTED_OUTLIER][3, 5] = 60.0
        params[PLANTED_TINY_TILE][64:128, 0:64] *= 1e-6
    model.save_pretrained(path, max_shard_size=max_shard_size)
    _save_tokenizer(path, model.config.text_config.vocab_size)
    return path


def _save_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


# sentence-transformers' files for a mean-pooled, normalized encoder (what `validate` reads of them)
SENTENCE_TRANSFORMERS_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def build_sentence_encoder(path: Path, seed: int = 0, hidden_size: int = 128, layers: int = 2,
                           sentence_transformers: bool = True, head=None) -> Path:
    """Save a random BERT encoder as a sentence-embedding model is published: one `model.safetensors`, a
    WordPiece tokenizer whose words cover `validate`'s sentences and, with `sentence_transformers`, the
    `modules.json` layout with mean pooling and a Normalize module. `head` (a BERT class name such as
    "BertForSequenceClassification", with three labels) saves that head instead of the bare encoder."""
    import torch
    import transformers

    from .validate.kind import SENTENCES

    words = sorted({w.strip(".,").lower() for s in SENTENCES for w in s.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + words
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                     num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=64,
                                     num_labels=3)
    torch.manual_seed(seed)
    model = getattr(transformers, head or "BertModel")(config).to(torch.bfloat16).eval()
    path = Path(path)
    model.save_pretrained(path)
    _save_wordpiece_tokenizer(path, vocab)
    if sentence_transformers:
        (path / "modules.json").write_text(json.dumps(SENTENCE_TRANSFORMERS_MODULES, indent=2) + "\n")
        (path / "sentence_bert_config.json").write_text('{"max_seq_length": 64, "do_lower_case": false}\n')
        (path / "1_Pooling").mkdir(exist_ok=True)
        pooling = {"word_embedding_dimension": hidden_size, "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                   "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                   "pooling_mode_lasttoken": False, "include_prompt": True}
        (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    return path


def _save_wordpiece_tokenizer(path: Path, vocab: list[str]) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {tok: i for i, tok in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(path)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    out = build_gemma4_checkpoint(Path(argv[0]))
    files = sorted(p.name for p in out.iterdir())
    print(f"demo checkpoint: {out} ({len(files)} files: {', '.join(files[:4])}, ...)")
    print(json.dumps({"architectures": json.loads((out / "config.json").read_text())["architectures"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
