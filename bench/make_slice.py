"""Build a synthetic slice of gemma-4-31B-it with the real tensor shapes, for benchmarks.

    python bench/make_slice.py OUT_DIR [--layers 0,1,2,5] [--seed 0]
    python bench/make_slice.py OUT_DIR --model qwen3-30b-a3b [--layers 4]
    python bench/make_slice.py OUT_DIR --model deepseek-v3-count --shard-size 20000000

From ../shared/reference/gemma-4-31b-it.tensors.json (or --tensors PATH): the 262144x5376 embedding, the text
layers named (default three sliding, 0-2, and one full attention, 5; renumbered 0..n-1 so that the config is a
consistent model) and the vision projection: about 6.4 GiB of N(0, 0.02) BF16 in 2 GB shards, with a config whose
text model has those layers. Written tensor by tensor (one tensor in memory at a time). `--model qwen3-30b-a3b`
builds a per-expert MoE of Qwen3-30B-A3B's real widths instead: 1,536 expert Linears of 768x2048 / 2048x768 in
4 layers, as its checkpoint stores them (6.2 GB). `--model deepseek-v3-count` builds DeepSeek-V3's names and
tensor count (61 layers, 256 routed experts: 45,395 tensors in about 160 shards with `--shard-size 20000000`) at
narrow widths, 3.1 GB: where a conversion's cost is its tensors' count.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converter.configs import SHARD_NAME  # noqa: E402
from converter.plan import COPY, ShardPlan, TensorPlan  # noqa: E402
from converter.write import ShardWriter  # noqa: E402

DEFAULT_TENSORS = Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "gemma-4-31b-it.tensors.json"
LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.*)$")


def select(inventory: dict, layers: list[int]) -> list[tuple[str, list[int]]]:
    renumber = {old: new for new, old in enumerate(layers)}
    chosen = []
    for t in inventory["tensors"]:
        name = t["name"]
        match = LAYER.match(name)
        if match:
            if int(match.group(1)) in renumber:
                chosen.append((f"model.language_model.layers.{renumber[int(match.group(1))]}.{match.group(2)}", t["shape"]))
        elif name in ("model.language_model.embed_tokens.weight", "model.embed_vision.embedding_projection.weight",
                      "model.language_model.norm.weight"):
            chosen.append((name, t["shape"]))
    return chosen


def slice_config(inventory: dict, layers: list[int]) -> dict:
    config = copy.deepcopy(inventory["config"])
    text = config["text_config"]
    text["layer_types"] = [text["layer_types"][i] for i in layers]
    text["num_hidden_layers"] = len(layers)
    per_layer = text.pop("per_layer_config", None) or {}
    text["global_head_dim"] = 512
    text["num_global_key_value_heads"] = 4
    del per_layer
    return config


# Qwen3-30B-A3B as its checkpoint stores it: 128 experts per layer, each a gate/up/down Linear of 768 x 2048
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, max_position_embeddings=40960, tie_word_embeddings=False)


def qwen3_moe_tensors(layers: int) -> list[tuple[str, list[int]]]:
    """Every tensor of a Qwen3-30B-A3B-shaped checkpoint with `layers` layers, named as it is stored."""
    c = QWEN3_30B_A3B
    h, heads, kv, d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    tensors = [("model.embed_tokens.weight", [c["vocab_size"], h])]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]),
                    (p + "self_attn.q_proj.weight", [heads * d, h]), (p + "self_attn.k_proj.weight", [kv * d, h]),
                    (p + "self_attn.v_proj.weight", [kv * d, h]), (p + "self_attn.o_proj.weight", [h, heads * d]),
                    (p + "self_attn.q_norm.weight", [d]), (p + "self_attn.k_norm.weight", [d]),
                    (p + "mlp.gate.weight", [c["num_experts"], h])]
        for e in range(c["num_experts"]):
            m = c["moe_intermediate_size"]
            tensors += [(f"{p}mlp.experts.{e}.gate_proj.weight", [m, h]), (f"{p}mlp.experts.{e}.up_proj.weight", [m, h]),
                        (f"{p}mlp.experts.{e}.down_proj.weight", [h, m])]
    return tensors + [("model.norm.weight", [h]), ("lm_head.weight", [c["vocab_size"], h])]


def qwen3_moe_config(layers: int) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen3_moe", num_hidden_layers=layers, **QWEN3_30B_A3B).to_dict()
    config.update(architectures=["Qwen3MoeForCausalLM"], dtype="bfloat16")
    return config


# DeepSeek-V3's names and counts (61 layers, the first 3 dense, 256 routed experts and one shared expert in each
# MoE layer: 45,395 tensors as its BF16 checkpoint stores them, less the MTP layer) at narrow widths (about 3 GB):
# a checkpoint whose cost is its tensors' count, not their bytes
DEEPSEEK_V3_COUNT = dict(vocab_size=129280, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                         num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1,
                         num_experts_per_tok=8, n_group=8, topk_group=4, num_attention_heads=4, num_key_value_heads=4,
                         q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                         tie_word_embeddings=False)


def deepseek_v3_tensors(layers: int) -> list[tuple[str, list[int]]]:
    """Every tensor of a DeepSeek-V3-shaped checkpoint (`DEEPSEEK_V3_COUNT`'s widths), named as it is stored."""
    c = DEEPSEEK_V3_COUNT
    h, heads, q_lora, kv_lora = c["hidden_size"], c["num_attention_heads"], c["q_lora_rank"], c["kv_lora_rank"]
    qk_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    tensors = [("model.embed_tokens.weight", [c["vocab_size"], h])]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]),
                    (p + "self_attn.q_a_proj.weight", [q_lora, h]), (p + "self_attn.q_a_layernorm.weight", [q_lora]),
                    (p + "self_attn.q_b_proj.weight", [heads * qk_head, q_lora]),
                    (p + "self_attn.kv_a_proj_with_mqa.weight", [kv_lora + c["qk_rope_head_dim"], h]),
                    (p + "self_attn.kv_a_layernorm.weight", [kv_lora]),
                    (p + "self_attn.kv_b_proj.weight", [heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), kv_lora]),
                    (p + "self_attn.o_proj.weight", [h, heads * c["v_head_dim"]])]
        if i < c["first_k_dense_replace"]:
            m = c["intermediate_size"]
            tensors += [(p + "mlp.gate_proj.weight", [m, h]), (p + "mlp.up_proj.weight", [m, h]),
                        (p + "mlp.down_proj.weight", [h, m])]
            continue
        m = c["moe_intermediate_size"]
        tensors += [(p + "mlp.gate.weight", [c["n_routed_experts"], h]),
                    (p + "mlp.gate.e_score_correction_bias", [c["n_routed_experts"]])]
        for e in range(c["n_routed_experts"]):
            tensors += [(f"{p}mlp.experts.{e}.gate_proj.weight", [m, h]), (f"{p}mlp.experts.{e}.up_proj.weight", [m, h]),
                        (f"{p}mlp.experts.{e}.down_proj.weight", [h, m])]
        s = m * c["n_shared_experts"]
        tensors += [(p + "mlp.shared_experts.gate_proj.weight", [s, h]), (p + "mlp.shared_experts.up_proj.weight", [s, h]),
                    (p + "mlp.shared_experts.down_proj.weight", [h, s])]
    return tensors + [("model.norm.weight", [h]), ("lm_head.weight", [c["vocab_size"], h])]


def deepseek_v3_config(layers: int) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.for_model("deepseek_v3", **dict(DEEPSEEK_V3_COUNT, num_hidden_layers=layers)).to_dict()
    config.update(architectures=["DeepseekV3ForCausalLM"], dtype="bfloat16")
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", default="0,1,2,5")
    parser.add_argument("--model", choices=["gemma-4-31b-it", "qwen3-30b-a3b", "deepseek-v3-count"],
                        default="gemma-4-31b-it",
                        help="qwen3-30b-a3b: per-expert MoE of real widths, --layers counts its layers (4: 6.2 GB); "
                             "deepseek-v3-count: DeepSeek-V3's names and tensor count at narrow widths (61 layers, "
                             "45,395 tensors, 3.1 GB; --layers counts layers)")
    parser.add_argument("--tensors", type=Path, default=DEFAULT_TENSORS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=2 * 10**9)
    args = parser.parse_args(argv)
    if args.model == "qwen3-30b-a3b":
        n = int(args.layers) if args.layers.isdigit() else 4
        tensors, config = qwen3_moe_tensors(n), qwen3_moe_config(n)
    elif args.model == "deepseek-v3-count":
        n = int(args.layers) if args.layers.isdigit() else DEEPSEEK_V3_COUNT["num_hidden_layers"]
        tensors, config = deepseek_v3_tensors(n), deepseek_v3_config(n)
    else:
        inventory = json.loads(args.tensors.read_text())
        layers = [int(x) for x in args.layers.split(",")]
        tensors, config = select(inventory, layers), slice_config(inventory, layers)
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for name, shape in tensors:
        t = TensorPlan(name, name, COPY, "BF16", tuple(shape), "synthetic")
        if groups[-1] and size + t.nbytes > args.shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    weight_map = {}
    for i, group in enumerate(groups):
        shard = ShardPlan(SHARD_NAME.format(index=i + 1, count=len(groups)), tuple(group))
        writer = ShardWriter(args.out / shard.name, shard)
        writer.open()
        for t in group:
            rows = t.shape[0]
            step = max(1, (64 * 2**20) // (t.nbytes // rows))  # 64 MiB of BF16 at a time
            for first in range(0, rows, step):
                part = torch.randn((min(step, rows - first),) + t.shape[1:], generator=gen) * 0.02
                if len(t.shape) == 1:
                    part = torch.ones_like(part)
                writer.write(t.name, part.to(torch.bfloat16).view(torch.uint8).numpy())
            weight_map[t.name] = shard.name
        writer.close()
    total = sum(TensorPlan(n, n, COPY, "BF16", tuple(s), "").nbytes for n, s in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{args.out}: {len(tensors)} tensors, {total / 2**30:.2f} GiB in {len(groups)} shards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
