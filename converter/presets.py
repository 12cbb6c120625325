"""Presets: JSON files in `configs/` that name exclusion patterns and a block size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .configs import DEFAULT_BLOCK_SIZE, Preset
from .errors import PlanError

# A checkout (or editable install) keeps presets beside the package; a wheel installs them under the prefix.
_CANDIDATES = (Path(__file__).resolve().parent.parent / "configs",
               Path(sys.prefix) / "share" / "convert-fp8" / "configs")
PRESET_DIR = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
_KNOWN_KEYS = {"description", "block_size", "modules_to_not_convert", "architectures"}


def available_presets() -> list[str]:
    """Names of the presets shipped in `configs/`."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> Preset:
    """Load a preset by name (`gemma-4-31b-it`) or from a JSON file path.

    Raises:
        PlanError: no such preset, or the file is not a valid preset.
    """
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = PRESET_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise PlanError(
                f"no preset named {name_or_path!r}; available: {', '.join(available_presets())} (or give a JSON file)"
            )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"cannot read preset {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("modules_to_not_convert", []), list):
        raise PlanError(f"preset {path}: expected an object with a list 'modules_to_not_convert'")
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise PlanError(f"preset {path}: unknown keys {sorted(unknown)}; known: {sorted(_KNOWN_KEYS)}")
    return Preset(
        name=path.stem,
        modules_to_not_convert=tuple(str(p) for p in data.get("modules_to_not_convert", [])),
        block_size=int(data.get("block_size", DEFAULT_BLOCK_SIZE)),
        architectures=tuple(data.get("architectures", [])),
        description=str(data.get("description", "")),
        origin=str(name_or_path),
    )
