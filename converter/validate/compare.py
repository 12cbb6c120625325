"""The comparisons of an FP8 model's outputs with its BF16 source's: logits (cosine, top-1, KL), sentence
embeddings (cosine, ranking of pairwise similarities) and a head's main output; pure functions of tensors, and
`judge`, which holds their figures to the thresholds and adds the verdict to the report."""

from __future__ import annotations

from .kind import ENCODER, GENERATIVE, Pooling
from .report import Thresholds, ValidateReport

def main_output(output) -> tuple[str, object]:
    """The first floating-point tensor of a model's output (the logits of a head; the last hidden state of a base
    model), with its name."""
    import torch

    items = output.items() if isinstance(output, dict) else ((f"output[{i}]", v) for i, v in enumerate(output))
    for name, value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return name, value
    raise ValueError(f"no floating-point tensor in the model's output ({type(output).__name__})")


def pool(hidden, attention_mask, pooling: Pooling):
    """One sentence embedding from token states (1, tokens, dim), as sentence-transformers' Pooling and
    Normalize modules compute it."""
    import torch

    h = hidden[0].float()
    mask = attention_mask[0].to(h.device, torch.float32)[:, None]
    count = mask.sum().clamp(min=1)
    parts = []
    for mode in pooling.modes:
        if mode == "cls_token":
            parts.append(h[0])
        elif mode == "max_tokens":
            parts.append(h.masked_fill(mask == 0, float("-inf")).max(0).values)
        elif mode == "mean_tokens":
            parts.append((h * mask).sum(0) / count)
        elif mode == "mean_sqrt_len_tokens":
            parts.append((h * mask).sum(0) / count.sqrt())
        elif mode == "weightedmean_tokens":
            weights = torch.arange(1, h.shape[0] + 1, device=h.device, dtype=h.dtype)[:, None] * mask
            parts.append((h * weights).sum(0) / weights.sum())
        elif mode == "lasttoken":
            parts.append(h[int(mask[:, 0].nonzero().max())])
    embedding = torch.cat(parts)
    return torch.nn.functional.normalize(embedding, dim=0) if pooling.normalize else embedding


def compare_logits(fp8_logits, ref_logits) -> dict:
    """Mean cosine, top-1 agreement and KL(ref || fp8) over every position of every prompt."""
    import torch
    import torch.nn.functional as F

    a, b = fp8_logits.float().flatten(0, -2), ref_logits.float().flatten(0, -2)
    cosine = F.cosine_similarity(a, b, dim=-1)
    kl = F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {
        "positions": int(a.shape[0]),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "top1_agreement": _top1_agreement(a, b),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "finite": bool(torch.isfinite(a).all()),
    }


def _top1_agreement(a, b) -> float:
    """Share of rows whose largest entry is at the same place; a row with NaN or Inf never agrees (argmax would
    call an all-NaN row's first entry its largest)."""
    import torch

    agree = (a.argmax(-1) == b.argmax(-1)) & torch.isfinite(a).all(-1)
    return float(agree.float().mean())


def compare_embeddings(fp8, ref) -> dict:
    """Sentence embeddings (sentences, dim) against the source's: cosine per sentence, and how the cosine
    similarities of every pair of sentences rank (Spearman correlation) and pick each sentence's nearest one."""
    import torch
    import torch.nn.functional as F

    a, b = fp8.float(), ref.float()
    cosine = F.cosine_similarity(a, b, dim=-1)
    sim_a, sim_b = _pairwise_cosine(a), _pairwise_cosine(b)
    upper = torch.triu_indices(len(a), len(a), offset=1)
    pairs_a, pairs_b = sim_a[upper[0], upper[1]], sim_b[upper[0], upper[1]]
    eye = torch.eye(len(a), dtype=torch.bool)
    nearest_a = sim_a.masked_fill(eye, float("-inf")).argmax(-1)
    nearest_b = sim_b.masked_fill(eye, float("-inf")).argmax(-1)
    return {
        "sentences": int(a.shape[0]),
        "dim": int(a.shape[1]),
        "pairs": int(pairs_a.numel()),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "rank_correlation": spearman(pairs_a, pairs_b),
        "nearest_agreement": float((nearest_a == nearest_b).float().mean()),
        "finite": bool(torch.isfinite(a).all()),
    }


def _pairwise_cosine(x):
    import torch.nn.functional as F

    unit = F.normalize(x, dim=-1)
    return unit @ unit.T


def spearman(x, y) -> float:
    """Spearman rank correlation of two 1-D tensors (NaN when either holds a non-finite value)."""
    import torch

    if not (torch.isfinite(x).all() and torch.isfinite(y).all()) or x.numel() < 2:
        return float("nan")
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def compare_outputs(fp8, ref) -> dict:
    """A head's main output against the source's: cosine per row of the last dimension (the whole tensor as one
    vector when that dimension is 1) and top-1 agreement along it, plus the relative error."""
    import torch
    import torch.nn.functional as F

    a, b = fp8.float(), ref.float()
    if a.shape[-1] > 1:
        a, b = a.flatten(0, -2), b.flatten(0, -2)
    else:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    cosine = F.cosine_similarity(a, b, dim=-1)
    return {
        "rows": int(a.shape[0]),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "top1_agreement": _top1_agreement(a, b) if fp8.shape[-1] > 1 else None,
        "relative_error": float((a - b).norm() / b.norm()) if float(b.norm()) > 0 else float((a - b).norm()),
        "finite": bool(torch.isfinite(a).all()),
    }


def judge(report: ValidateReport, kind, fp8: list, ref: list, thresholds: Thresholds) -> None:
    """Compare the FP8 results with the source's as the model's kind asks (a `kind.ModelKind`), and add the
    verdict to the report."""
    import torch

    t = thresholds
    if kind.kind == GENERATIVE:
        stats = compare_logits(torch.cat([x.flatten(0, -2) for x in fp8]), torch.cat([x.flatten(0, -2) for x in ref]))
        stats["thresholds"] = {"min_cosine": t.min_cosine, "min_top1": t.min_top1, "max_kl": t.max_kl}
        report.logits = stats
        ok = (stats["finite"] and stats["cosine_mean"] >= t.min_cosine and stats["top1_agreement"] >= t.min_top1
              and stats["kl_mean"] <= t.max_kl)
        report.add("logits vs source", ok,
                   f"cosine {stats['cosine_mean']:.4f} (min {t.min_cosine}), top-1 {stats['top1_agreement']:.3f} "
                   f"(min {t.min_top1}), KL {stats['kl_mean']:.2e} (max {t.max_kl}) over "
                   f"{stats['positions']} positions")
    elif kind.kind == ENCODER:
        stats = compare_embeddings(torch.stack(fp8), torch.stack(ref))
        stats["thresholds"] = {"min_embedding_cosine": t.min_embedding_cosine,
                               "min_rank_correlation": t.min_rank_correlation}
        report.embeddings = stats
        ok = (stats["finite"] and stats["cosine_mean"] >= t.min_embedding_cosine
              and stats["rank_correlation"] >= t.min_rank_correlation)
        report.add("embeddings vs source", ok,
                   f"cosine {stats['cosine_mean']:.4f} (min {t.min_embedding_cosine}; lowest "
                   f"{stats['cosine_min']:.4f}), similarity ranking {stats['rank_correlation']:.3f} (Spearman, min "
                   f"{t.min_rank_correlation}) over {stats['pairs']} pairs of {stats['sentences']} sentences, "
                   f"nearest sentence kept {stats['nearest_agreement']:.2f}")
    else:
        name = fp8[0][0]
        stats = compare_outputs(torch.cat([x for _, x in fp8]), torch.cat([x for _, x in ref]))
        stats["name"] = name
        stats["thresholds"] = {"min_cosine": t.min_cosine, "min_top1": t.min_top1}
        report.head_output = stats
        top1 = stats["top1_agreement"]
        ok = stats["finite"] and stats["cosine_mean"] >= t.min_cosine and (top1 is None or top1 >= t.min_top1)
        report.add(f"{name} vs source", ok,
                   f"cosine {stats['cosine_mean']:.4f} (min {t.min_cosine}), "
                   + (f"top-1 {top1:.3f} (min {t.min_top1}), " if top1 is not None else "")
                   + f"relative error {stats['relative_error']:.2e} over {stats['rows']} rows")
