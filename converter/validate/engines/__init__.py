"""The engines `validate` runs a checkpoint in, one module each. An engine module has a `NAME` and
`run(report, dst, src, device, kernel, prompt, max_new_tokens, thresholds)`, which loads the output (and the
source, to compare), adds its checks to the report and returns it; it never raises for a failed check. Adding an
engine is adding a module and a row in `ENGINES`."""

from __future__ import annotations

from . import transformers, vllm

ENGINES = {transformers.NAME: transformers, vllm.NAME: vllm}
