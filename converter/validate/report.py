"""What `validate` found: each check with its verdict and one line of detail, the figures of the comparisons,
the thresholds they are held to, and the report in words and as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

REPORT_NAME = "convert-fp8-validate.json"


@dataclass(frozen=True)
class Thresholds:
    """Agreement with the BF16 source that a conversion must reach. Logits and head outputs: means over
    positions (rows of the last dimension). Encoders: over the sentences and their pairs."""

    min_cosine: float = 0.98
    min_top1: float = 0.80
    max_kl: float = 0.05
    min_embedding_cosine: float = 0.99
    min_rank_correlation: float = 0.90


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
    engine: str = "transformers"  # what ran it (`validate.engines`)
    engine_results: dict | None = None  # an engine's own figures: vLLM's per-sequence log-prob comparisons

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


def describe_report(report: ValidateReport) -> str:
    lines = [f"validate {report.dst} in {report.engine} on {report.device}"
             + (f" with kernel {report.kernel}" if report.device == "cuda" and report.engine == "transformers" else "")]
    lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in report.checks]
    if report.generation and "text" in report.generation:
        lines.append(f"  generated: {report.generation['text']!r}")
    for k, entry in enumerate((report.engine_results or {}).get("sequences", [])):
        figures = ", ".join(f"{key.replace('_', ' ')} {value:.4f}" for key, value in entry.items()
                            if isinstance(value, float))
        lines.append(f"  sequence {k}: {entry['tokens']} tokens" + (f", {figures}" if figures else ""))
    if report.peak_gpu_memory_bytes:
        lines.append(f"  peak GPU memory: {report.peak_gpu_memory_bytes / 2**30:.2f} GiB")
    lines.append("validate: OK" if report.ok else
                 f"validate: FAILED ({', '.join(c.name for c in report.checks if not c.ok)})")
    return "\n".join(lines)
