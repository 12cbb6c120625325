"""Presets: JSON files in `configs/` that name exclusion patterns and a block size.

`configs/` at the top of the checkout is their one source. setup.cfg maps it to the package
`converter.preset_files`, so wheels and editable installs alike carry it as package data, found through
`importlib.resources` wherever the package lies (a venv, `pip install --user`, `--target`, a zip).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .configs import DEFAULT_BLOCK_SIZE, Preset
from .errors import PlanError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PRESET_PACKAGE = "converter.preset_files"
_KNOWN_KEYS = {"description", "block_size", "modules_to_not_convert", "architectures"}


def preset_dir() -> Traversable:
    """The shipped presets: the package data, or `configs/` itself when the package runs from a checkout that is
    not installed (its root on `sys.path`, as the bench scripts do)."""
    try:
        return resources.files(PRESET_PACKAGE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "configs"


def available_presets() -> list[str]:
    """Names of the presets shipped in `configs/`."""
    return sorted(p.name.removesuffix(".json") for p in preset_dir().iterdir() if p.name.endswith(".json"))


def load_preset(name_or_path: str) -> Preset:
    """Load a preset by name (`gemma-4-31b-it`) or from a JSON file path.

    Raises:
        PlanError: no such preset, or the file is not a valid preset.
    """
    path: Path | Traversable = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = preset_dir() / f"{name_or_path}.json"
        if not path.is_file():
            raise PlanError(
                f"no preset named {name_or_path!r}; available: {', '.join(available_presets())} (or give a JSON file)"
            )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanError(f"cannot read preset {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("modules_to_not_convert", []), list):
        raise PlanError(f"preset {path}: expected an object with a list 'modules_to_not_convert'")
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise PlanError(f"preset {path}: unknown keys {sorted(unknown)}; known: {sorted(_KNOWN_KEYS)}")
    if data.get("block_size", DEFAULT_BLOCK_SIZE) not in (64, 128):
        raise PlanError(f"preset {path}: block_size {data['block_size']!r}: expected 64 or 128, the block edges "
                        "transformers' and vLLM's FP8 kernels take")
    return Preset(
        name=path.name.removesuffix(".json"),
        modules_to_not_convert=tuple(str(p) for p in data.get("modules_to_not_convert", [])),
        block_size=int(data.get("block_size", DEFAULT_BLOCK_SIZE)),
        architectures=tuple(data.get("architectures", [])),
        description=str(data.get("description", "")),
        origin=str(name_or_path),
    )
