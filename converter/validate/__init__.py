"""Validation of an output by running it: load it in an engine, confirm the FP8 path is taken, find the first
module whose output is not finite, compare with the BF16 source and, for generative models, generate.

What is compared follows the model's kind, as transformers' auto classes name it (`kind.model_kind`): causal LMs
and image-text models compare logits (cosine, top-1, KL) and generate; encoders (base models, and
sentence-transformers folders with `modules.json`) compare pooled sentence embeddings by cosine and by the ranking
of their pairwise similarities; other text heads (sequence classification, masked LM, seq2seq, ...) compare their
main output tensor. A kind it cannot judge (vision, audio, multiple choice) is refused before anything loads.

The package: `kind` (what the model is, and its inputs), `engines` (what runs it: transformers), `compare` (the
comparisons and their verdicts), `report` (what was found).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .engines import ENGINES
from .kind import DEFAULT_PROMPT, SENTENCES
from .report import REPORT_NAME, Thresholds, ValidateReport, describe_report

__all__ = ["DEFAULT_PROMPT", "ENGINES", "REPORT_NAME", "SENTENCES", "Thresholds", "ValidateReport", "describe_report",
           "validate"]


def validate(dst: Path, src: Path | None = None, device: str = "cpu", kernel: str = "hub",
             prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 20, thresholds: Thresholds = Thresholds(),
             engine: str = "transformers") -> ValidateReport:
    """Load, run and compare an output in `engine`. Never raises for a failed check: see `report.ok`.

    Raises:
        UsageError: an engine this tool does not know, or a kind of model it cannot judge ("cannot validate this
            kind: ...").
        SourceError: a sentence-transformers folder whose `modules.json` or pooling config cannot be read.
    """
    runner = ENGINES.get(engine)
    if runner is None:
        raise UsageError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    dst = Path(dst)
    report = ValidateReport(dst=str(dst), src=str(src) if src else None, device=device, kernel=kernel)
    return runner.run(report, dst, src, device, kernel, prompt, max_new_tokens, thresholds)
