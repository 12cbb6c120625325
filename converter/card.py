"""The model card (README.md) of a converted checkpoint. Pure text from the plan."""

from __future__ import annotations

from . import __version__
from .configs import format_size
from .plan import Plan


def model_card(plan: Plan, base_model: str, repo_name: str) -> str:
    block = plan.scheme.block_size
    archs = plan.config.get("architectures") or ["(unknown architecture)"]
    excluded = "\n".join(f"- `{m}`" for m in plan.modules_to_not_convert) or "- (none)"
    kept_reasons = sorted(set(plan.kept_linears.values()))
    kept = "\n".join(f"- {r}" for r in kept_reasons) or "- (none)"
    return f"""---
base_model: {base_model}
tags:
- fp8
- convert-fp8
---
# {repo_name}

Fine-grained FP8 (block-quantized) version of `{base_model}` ({archs[0]}), converted offline by
convert-fp8 {__version__} without loading the model.

- {len(plan.fp8_modules)} Linear weights stored as FP8 E4M3 with per-{block}x{block}-block float32 scales
  (`weight_scale_inv`), byte-identical to transformers' `FineGrainedFP8Config(weight_block_size=({block}, {block}))`
  quantization; activations are quantized at run time (`activation_scheme: dynamic`).
- Tensor data: {format_size(plan.source_nbytes)} in the source, {format_size(plan.output_nbytes)} here.

## Why these settings
- `weight_block_size=({block}, {block})`: finer blocks keep outliers from flattening a whole tile. A block size
  that divides every shape is not proof that it is numerically safe: check output values, not only that the
  model loads.
- Kept in the source dtype, by module path (`modules_to_not_convert`):
{excluded}
- Why Linears were kept:
{kept}
- `ignored_layers` lists every Linear kept unquantized by its full name, for vLLM and SGLang.

## Usage
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_name}", dtype="auto", device_map="auto")
tok = AutoTokenizer.from_pretrained("{repo_name}")
```
(Use the auto class that matches `{archs[0]}`, e.g. `AutoModelForImageTextToText` for vision-language models.)
On a GPU of compute capability 8.9 or newer transformers runs the FP8 kernel (`kernels` package, version matching
your transformers); on a CPU it dequantizes to BF16 on load.
"""
