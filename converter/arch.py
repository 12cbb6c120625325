"""What transformers' own loader does with each checkpoint tensor, asked of transformers itself.

The architecture is built on the meta device (no memory, no weights), the FP8 quantizer of the config replaces
its modules exactly as `from_pretrained` does, and every checkpoint name goes through the model's weight
conversion mapping (`get_model_conversion_mapping` + `rename_source_key`, the code the loader runs): per-expert
Linears (`mlp.experts.3.gate_proj.weight`) land in the fused experts module they are merged into
(`mlp.experts.gate_up_proj`), renamed keys where they are renamed to. The answer is the parameter each tensor
lands in and whether that parameter is FP8, a scale, or high precision.

Two uses: before the plan, the placement of the source's tensors under the user's exclusions says which ones
transformers turns into FP8 (the plan quantizes exactly those it can); after the plan, the placement of the
output's tensors under the written config must agree with the plan tensor for tensor. A disagreement means a
loader would raw-cast a BF16 weight into an FP8 parameter, load FP8 bytes into a plain one, or leave an FP8
parameter unset: silent garbage, so it stops the conversion.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from . import arch_process
from .errors import PlanError

# `<experts>.<i>.<proj>`: one expert's Linear as a per-expert checkpoint stores it
_PER_EXPERT_LINEAR = re.compile(r"^(?P<experts>.+\.experts)\.\d+\.[^.]+$")

CACHE_ENV = "CONVERT_FP8_CACHE_DIR"

FP8, SCALE, HIGH, UNEXPECTED = "fp8", "scale", "high", "unexpected"


def cache_dir() -> Path:
    """Where answers of transformers are kept: `$CONVERT_FP8_CACHE_DIR`, else `~/.cache/convert-fp8`."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convert-fp8"
    return Path(os.environ.get(CACHE_ENV) or default)


@dataclass(frozen=True)
class Placement:
    """Where transformers' loader puts each checkpoint tensor of one config.

    `tensors` maps a checkpoint name to `(role, parameter, module class)`: role FP8 (an FP8 weight parameter),
    SCALE (its inverse scales), HIGH (any other parameter or buffer) or UNEXPECTED (the model has no place for
    it). `unset` lists the FP8 and scale parameters no checkpoint tensor lands in.
    """

    tensors: dict[str, tuple[str, str, str]]
    unset: tuple[str, ...]

    def role(self, name: str) -> str:
        return self.tensors[name][0]

    def module_class(self, name: str) -> str:
        return self.tensors[name][2]


def _cache_path(kind: str, blob) -> Path | None:
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None
    from . import __version__  # a newer tool may place differently: its answers are its own

    digest = hashlib.sha256(json.dumps([version, __version__, blob], sort_keys=True).encode()).hexdigest()
    return cache_dir() / kind / f"{digest}.json"


def _cached(kind: str, args: list) -> dict:
    """`_ANSWER_OF[kind](*args)`, remembered per transformers version and `args`: importing transformers costs
    seconds, and the answer, positive or not (an architecture it does not know), never changes for the same two."""
    path = _cache_path(kind, args)
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    answer = _compute(kind, args)
    if path is not None and answer.pop("cacheable", True):
        arch_process.write_cache_file(path, json.dumps(answer))
    return answer


_child: arch_process.Child | None = None
_child_lock = threading.Lock()


def _compute(kind: str, args: list) -> dict:
    """The answer from transformers in this process where it is imported already, else from a child process
    (`arch_process`), started on the first question and kept for the next ones until `release()`."""
    global _child
    if "transformers" in sys.modules:
        return _ANSWER_OF[kind](*args)
    with _child_lock:
        if _child is None:
            try:
                _child = arch_process.Child(__spec__.name if __spec__ else "converter.arch")
            except OSError:  # no interpreter to start (an embedded Python): asked here, as slowly as that is
                return _ANSWER_OF[kind](*args)
            atexit.register(_child.kill)
        child = _child
    try:
        return child.ask(kind, args)
    except arch_process.ChildGone as gone:
        release()
        return {"unknown": f"the process asking transformers ended without an answer ({gone})", "cacheable": False}


def release(now: bool = False) -> int:
    """End the child process asking transformers, if one runs: once idle, or `now`, killed (its question, if
    any, then gets an `unknown` answer).

    Returns:
        Its peak resident memory in bytes (0 where no child ran).
    """
    global _child
    with _child_lock:
        child, _child = _child, None
    if child is None:
        return 0
    atexit.unregister(child.kill)
    if now:
        child.kill()
    else:
        child.close()
    return child.peak_rss_bytes


def placement(config: dict, names: list[str]) -> Placement | str:
    """Where transformers' FP8 loader puts the checkpoint tensors `names` of a model with this `config` (whose
    `quantization_config` is transformers' `fp8`).

    Returns:
        The `Placement`, or why transformers cannot say (not installed, an architecture it does not know).
    """
    answer = _cached("placement", [config, sorted(names)])
    if "unknown" in answer:
        return answer["unknown"]
    return Placement({n: tuple(v) for n, v in answer["tensors"].items()}, tuple(answer["unset"]))


def _meta_model(config: dict):
    """The architecture of `config` on the meta device, or why it cannot be built."""
    try:
        import torch
        import transformers
    except ImportError:
        return None, "transformers is not installed"
    archs = config.get("architectures") or []
    if config.get("auto_map"):  # its own modeling code, which the loader runs instead of transformers' class
        return None, f"{archs[0] if archs else 'the model'} brings its own code (auto_map)"
    model_class = getattr(transformers, archs[0], None) if archs else None
    if model_class is None:
        name = archs[0] if archs else "the architecture"
        return None, f"transformers {transformers.__version__} does not know {name}"
    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        cfg = transformers.AutoConfig.for_model(**clean)
        with torch.device("meta"):
            return model_class._from_config(cfg), None
    except Exception as exc:  # noqa: BLE001 - any config transformers refuses: the name rules decide
        first = (str(exc).splitlines() or [""])[0]
        return None, f"transformers cannot build {archs[0]} from this config ({type(exc).__name__}: {first})"


def _placement(config: dict, names: list[str]) -> dict:
    model, why = _meta_model(config)
    if model is None:
        return {"unknown": why, "cacheable": why != "transformers is not installed"}
    try:
        return _place(model, config, names)
    except Exception as exc:  # noqa: BLE001 - a model transformers builds but cannot place: the name rules decide
        arch = (config.get("architectures") or ["the model"])[0]
        first = (str(exc).splitlines() or [""])[0]
        return {"unknown": f"transformers cannot place the tensors of {arch} ({type(exc).__name__}: {first})",
                "cacheable": False}


def _renamer(model, params: dict, quantizer=None):
    """The parameter a checkpoint tensor name loads into, as `convert_and_load_state_dict_in_model` renames a key
    (conversion mapping, base-model prefix added or dropped)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model, None, quantizer)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]

    def loaded_name(name: str) -> str:
        target, _ = rename_source_key(name, renamings, converters, model.base_model_prefix, params)
        if target not in params and name in params:
            target, _ = rename_source_key(name, [], [], model.base_model_prefix, params)
        return target

    return loaded_name


def _place(model, config: dict, names: list[str]) -> dict:
    import torch
    from transformers import FineGrainedFP8Config
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    qc = dict(config["quantization_config"])
    qc.pop("quant_method", None)
    qc.pop("ignored_layers", None)
    quantizer = FineGrainedFP8HfQuantizer(FineGrainedFP8Config(**qc))
    quantizer.pre_quantized = True  # the loader of an FP8 checkpoint: modules replaced, nothing quantized
    quantizer._process_model_before_weight_loading(model)
    params = model.state_dict()
    loaded_name = _renamer(model, params, quantizer)

    def role_of(param: str, tensor) -> str:
        if tensor.dtype == torch.float8_e4m3fn:
            return FP8
        if param.endswith("scale_inv"):
            return SCALE
        return HIGH

    placed, landed = {}, set()
    for name in names:
        target = loaded_name(name)
        if target not in params:
            placed[name] = (UNEXPECTED, target, "")
            continue
        module = model.get_submodule(target.rpartition(".")[0]) if "." in target else model
        placed[name] = (role_of(target, params[target]), target, type(module).__name__)
        landed.add(target)
    unset = sorted(p for p, t in params.items() if role_of(p, t) in (FP8, SCALE) and p not in landed)
    return {"tensors": placed, "unset": unset}


def loader_fp8_tensors(config: dict, names: list[str], writer, patterns: tuple[str, ...]) -> Placement | str | None:
    """Where transformers' FP8 loader would put the source tensors `names` if every module not excluded by
    `patterns` were converted: the plan quantizes the tensors that land in FP8 parameters.

    Returns:
        The `Placement`; why transformers cannot say; or None for a dialect transformers' FP8 loader does not
        read (compressed-tensors keeps its name rules and its own check).
    """
    if writer.quant_method != "fp8":
        return None
    return placement(_asked(config, writer, patterns), names)


def loader_fp8_tensors_known(config: dict, names: list[str], writer, patterns: tuple[str, ...]) -> bool:
    """Whether `loader_fp8_tensors` answers without asking transformers (a cached answer, or no question)."""
    if writer.quant_method != "fp8":
        return True
    path = _cache_path("placement", [_asked(config, writer, patterns), sorted(names)])
    return path is not None and path.is_file()


def _asked(config: dict, writer, patterns: tuple[str, ...]) -> dict:
    """The config transformers is asked about: every module not excluded by `patterns` converted."""
    asked = copy.deepcopy(config)
    asked["quantization_config"] = writer.quantization_config(list(patterns), [])
    return asked


def cross_check(plan) -> str | None:
    """Raise `PlanError` when transformers would load the written output differently from the plan.

    Returns:
        None when the check ran and passed, else the reason it could not run.
    """
    if plan.dialect.quant_method == "fp8":
        expected = {t.name: {"quantize": FP8, "scale": SCALE}.get(t.action, HIGH) for t in plan.tensors}
        found = placement(plan.config, list(expected))
        if isinstance(found, str):
            return f"architecture check skipped: {found}"
        problems = disagreements(found, expected)
    else:
        problems = _linear_set_problems(plan)
        if problems is None:
            arch = (plan.config.get("architectures") or ["?"])[0]
            return f"architecture check skipped: transformers is not installed or does not know {arch}"
    if problems:
        raise PlanError("architecture check failed: " + "; ".join(problems) + "; or --no-arch-check to skip the check")
    return None


def disagreements(found: Placement, expected: dict[str, str]) -> list[str]:
    """How the loader's placement differs from the roles the checkpoint's tensors have (FP8, SCALE or HIGH), one
    sentence per kind of difference, each naming the first module and the `--exclude` that fixes it."""
    wrong: dict[str, list[str]] = {}
    for name, want in expected.items():
        got, param, cls = found.tensors[name]
        if got == UNEXPECTED:  # dropped by the loader whatever it holds; other loaders go by names
            continue
        if got != want:
            wrong.setdefault(f"{want}->{got}", []).append(name)
    out = []
    raw_cast = wrong.get(f"{HIGH}->{FP8}", []) + wrong.get(f"{HIGH}->{SCALE}", [])
    if raw_cast:
        # the module that owns the FP8 parameter: a per-expert Linear's is the `experts` module it is fused into
        first = found.tensors[raw_cast[0]][1].rpartition(".")[0]
        out.append(f"transformers would load {len(raw_cast)} unquantized tensor(s) into FP8 modules, first "
                   f"{raw_cast[0]!r} (it would raw-cast them: --exclude {first})")
    high = wrong.get(f"{FP8}->{HIGH}", []) + wrong.get(f"{SCALE}->{HIGH}", [])
    if high:
        cls = found.module_class(high[0]) or "no module"
        out.append(f"{len(high)} tensor(s) quantized here load into modules transformers keeps in high precision, "
                   f"first {high[0]!r} ({cls}; --exclude {high[0].rpartition('.')[0]})")
    crossed = wrong.get(f"{FP8}->{SCALE}", []) + wrong.get(f"{SCALE}->{FP8}", [])
    if crossed:
        out.append(f"{len(crossed)} tensor(s) land in the wrong parameter of an FP8 module, first {crossed[0]!r}")
    if found.unset:
        modules = list(dict.fromkeys(p.rpartition(".")[0] for p in found.unset))
        out.append(f"transformers would load {len(modules)} module(s) as FP8 that no tensor here fills, first "
                   f"{modules[0]!r} (absent or tied weights need an exclusion: --exclude {modules[0]})")
    return out


def _linear_set_problems(plan) -> list[str] | None:
    """compressed-tensors: the `nn.Linear` modules its `ignore` leaves quantized, against the plan's FP8 modules;
    None when transformers cannot build the architecture."""
    expected = linear_modules(plan.config, plan.modules_to_not_convert, plan.dialect,
                              {t.source.rpartition(".")[0] for t in plan.tensors})
    if expected is None:
        return None
    ours = set(plan.fp8_modules)
    only_theirs, only_ours = sorted(expected - ours), sorted(ours - expected)
    out = []
    if only_theirs:
        out.append(f"transformers would load {len(only_theirs)} module(s) as FP8 that stay unquantized here, "
                   f"first {only_theirs[0]!r} (absent or tied weights need an exclusion: --exclude {only_theirs[0]})")
    if only_ours:
        out.append(f"{len(only_ours)} module(s) quantized here are not Linears transformers converts, "
                   f"first {only_ours[0]!r} (--exclude {only_ours[0]})")
    return out


def linear_modules(config: dict, patterns: tuple[str, ...], writer, stored=()) -> set[str] | None:
    """The Linear modules that `writer`'s exclusion rule leaves quantized, as the loaders of a compressed-tensors
    checkpoint match them (vLLM and compressed-tensors go by module names; llm-compressor's `model_free_ptq`
    writes them): the architecture's `nn.Linear` modules, and those of the `stored` module names that are one
    expert's Linear (`<experts>.<i>.<proj>`) of an experts module transformers fuses them into at load. None when
    transformers cannot build the architecture."""
    per_expert = sorted(m for m in stored if _PER_EXPERT_LINEAR.match(m))
    answer = _cached("linear-modules", [config, per_expert])
    if "unknown" in answer:
        return None
    return {m for m in [*answer["modules"], *answer["per_expert"]] if writer.converts(m, list(patterns))}


def _linear_modules(config: dict, per_expert: list[str]) -> dict:
    model, why = _meta_model(config)
    if model is None:
        return {"unknown": why, "cacheable": why != "transformers is not installed"}
    from torch import nn

    modules = dict(model.named_modules())
    loaded_name = _renamer(model, model.state_dict())
    fused = [m for m in per_expert if not isinstance(modules.get(loaded_name(m + ".weight").rpartition(".")[0]),
                                                     (nn.Linear, nn.ModuleList, type(None)))]
    return {"modules": sorted(name for name, module in modules.items() if isinstance(module, nn.Linear)),
            "per_expert": fused}


# the questions a child process answers (`_compute`): a name and the function of JSON arguments that answers it
_ANSWER_OF = {"placement": _placement, "linear-modules": _linear_modules}

if __name__ == "__main__":
    # triton compiles GPU kernels, which a model on the meta device never runs; where it is installed torch imports
    # it, and its library adds about 70 MB to this process
    sys.modules.setdefault("triton", None)
    arch_process.serve(_ANSWER_OF, arch_process.record_path(cache_dir()))
