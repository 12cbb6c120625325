"""What `verify` found: each problem with the tensor or file at fault, the per-tensor error figures against the
source, and the report in words and as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

REPORT_NAME = "convert-fp8-verify.json"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the output: the tensor and shard where known, and what."""

    what: str
    tensor: str | None = None
    shard: str | None = None

    def __str__(self) -> str:
        where = " ".join(p for p in (self.tensor and f"tensor {self.tensor}", self.shard and f"in {self.shard}") if p)
        return f"{where}: {self.what}" if where else self.what


@dataclass
class TensorStats:
    """Per FP8 weight: tiles, all-zero tiles and, with the source, the reconstruction error."""

    tensor: str
    shard: str
    shape: tuple[int, ...]
    tiles: int
    zero_tiles: int
    relative_error: float | None = None
    max_abs_error: float | None = None


@dataclass
class VerifyReport:
    dst: str
    src: str | None
    block_size: int | None = None
    tensors_checked: int = 0
    fp8_tensors: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    stats: list[TensorStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def worst(self, n: int = 5) -> list[TensorStats]:
        key = (lambda s: -(s.relative_error or 0.0)) if self.src else (lambda s: -s.zero_tiles)
        return sorted(self.stats, key=key)[:n]

    def to_json(self) -> str:
        data = asdict(self)
        data["ok"] = self.ok
        data["problems"] = [dict(asdict(p), message=str(p)) for p in self.problems]
        return json.dumps(data, indent=2) + "\n"


def describe_report(report: VerifyReport, limit: int = 20) -> str:
    """A human summary: what was checked, the worst tensors, every problem (up to `limit`)."""
    lines = [
        f"checked {report.tensors_checked} tensors ({report.fp8_tensors} FP8), "
        f"{report.bytes_checked / 1e9:.3f} GB" + (f" against {report.src}" if report.src else " (no source)")
    ]
    worst = [s for s in report.worst() if s.relative_error is not None]  # none when the source could not be read
    if worst and report.src:
        lines.append("largest relative reconstruction errors:")
        lines += [f"  {s.relative_error:.4%}  max |err| {s.max_abs_error:.3g}  {s.tensor}" for s in worst]
    zero = sum(s.zero_tiles for s in report.stats)
    lines.append(f"all-zero tiles: {zero} of {sum(s.tiles for s in report.stats)}")
    lines += [f"note: {n}" for n in report.notes]
    for p in report.problems[:limit]:
        lines.append(f"problem: {p}")
    if len(report.problems) > limit:
        lines.append(f"... and {len(report.problems) - limit} more problems (see the JSON report)")
    lines.append("verify: OK" if report.ok else f"verify: FAILED with {len(report.problems)} problem(s)")
    return "\n".join(lines)
