"""Tiny random models of many model types, saved by transformers itself as sharded checkpoints: each brings its
own on-disk layout (per-expert MoE Linears, routers, shared experts, Conv1D) as users meet it."""

from __future__ import annotations

from pathlib import Path

import torch

_COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=128)
_MLA = dict(num_key_value_heads=2, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64)

# model_type -> config arguments beyond _COMMON (a layer of each kind: dense first, then MoE, where the family has both)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=64),
    "olmo2": {},
    "granite": {},
    "phi3": dict(pad_token_id=0),
    "gemma3_text": dict(head_dim=64),
    "starcoder2": {},
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                      shared_expert_intermediate_size=128),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, head_dim=64),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, n_shared_experts=1,
                        first_k_dense_replace=1, **_MLA),
    # 64 routed experts: the router is 64x128 and tiles by 64, as DeepSeek-V3's 256x7168 tiles by 128
    "deepseek_v3": dict(n_routed_experts=64, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1, **_MLA),
    "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, n_shared_experts=1,
                     first_k_dense_replace=1, head_dim=64),
    # fused 3-D experts stored under names transformers renames on load (`block_sparse_moe.input_linear.weight`
    # is loaded as `block_sparse_moe.experts.gate_up_proj`)
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt2": dict(n_embd=128, n_layer=2, n_head=2, n_positions=128),
}
PER_EXPERT = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe")
FUSED = ("granitemoe",)


def family_config(model_type: str, **overrides):
    from transformers import AutoConfig

    args = dict(FAMILIES[model_type], **overrides)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=256, **args)
    return AutoConfig.for_model(model_type, **{**_COMMON, **args})


def save_family(model_type: str, path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random causal LM of `model_type` in BF16, saved by `save_pretrained` in ~200 KB shards."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(model_type, **overrides)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200KB")
    return Path(path)
