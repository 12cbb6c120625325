"""The package as users install it: a wheel built from the checkout, installed with `pip install --target` (no
`sys.prefix` of its own) and run from outside the checkout, with a package folder numba cannot write to."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import run_cli, tiny_llama, tree_digest

ROOT = Path(__file__).resolve().parent.parent
# What a build reads; copied so that the build neither writes into the checkout nor packs a stale build/ folder.
BUILD_INPUTS = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "converter", "configs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("checkout")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).exists():
            shutil.copy(ROOT / name, tree / name)
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(dist), str(tree)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (found,) = dist.glob("convert_fp8-*.whl")
    return found


@pytest.fixture(scope="module")
def target(wheel, tmp_path_factory) -> Path:
    """The wheel installed with `pip install --target`: not importable from the checkout, no prefix share/."""
    site = tmp_path_factory.mktemp("target")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                           str(site), str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return site


def run_installed(site: Path, cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` with the installed copy first on the path, from a folder outside the checkout."""
    full_env = {**os.environ, "PYTHONPATH": str(site), "CONVERT_FP8_NO_PROGRESS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True)


def test_the_wheel_holds_every_module_and_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "converter").rglob("*.py")}
    presets = {f"converter/preset_files/{p.name}" for p in (ROOT / "configs").glob("*.json")}
    assert {"converter/kernels/finegrained_fp8/__init__.py", "converter/kernels/layout.py"} <= modules
    assert "converter/preset_files/gemma-4-31b-it.json" in presets
    assert modules - names == set() and presets - names == set()
    outside = {n for n in names if not n.startswith(("converter/", "convert_fp8-"))}
    assert outside == set()  # nothing under the prefix (share/...) or beside the package


def test_installed_copy_finds_its_presets_and_kernel(target, tmp_path):
    done = run_installed(target, tmp_path, "-c", "import converter, converter.presets as p; "
                         "print(converter.__file__); print(' '.join(p.available_presets())); "
                         "print(p.load_preset('gemma-4-31b-it').modules_to_not_convert)")
    assert done.returncode == 0, done.stderr
    where, names, excluded = done.stdout.splitlines()
    assert Path(where) == target / "converter" / "__init__.py"
    assert names.split() == sorted(p.stem for p in (ROOT / "configs").glob("*.json"))
    assert excluded == "('model.vision_tower', 'lm_head')"
    done = run_installed(target, tmp_path, "-m", "converter.kernels.layout", str(tmp_path / "kernel"))
    assert done.returncode == 0, done.stderr
    variant = tmp_path / "kernel" / "build" / "torch-cuda"
    assert done.stdout.strip() == str(variant)
    assert (variant / "__init__.py").read_bytes() == (ROOT / "converter/kernels/finegrained_fp8/__init__.py").read_bytes()


def test_converts_where_numba_can_write_no_cache(target, tmp_path):
    """A package folder, NUMBA_CACHE_DIR and user cache that cannot be created (here: a file stands where each
    folder would be, which stops root too): the kernels compile for the run, with one note, and the bytes are the
    same as with the cached kernels."""
    src = tiny_llama(tmp_path / "src")
    assert run_cli("--src", src, "--dst", tmp_path / "cached", "--config", "llama").exit_code == 0
    pycache = target / "converter" / "__pycache__"
    shutil.rmtree(pycache, ignore_errors=True)
    pycache.write_text("")  # numba's folder beside the package cannot be made
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    env = {"NUMBA_CACHE_DIR": str(blocked / "numba"), "HOME": str(blocked), "XDG_CACHE_HOME": str(blocked)}
    done = run_installed(target, tmp_path, "-m", "converter.cli", "--src", str(src), "--dst", str(tmp_path / "out"),
                         "--config", "llama", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    notes = [line for line in done.stderr.splitlines() if "numba" in line]
    assert notes == ["note: numba cannot cache its compiled kernels here (neither the package folder, "
                     "NUMBA_CACHE_DIR nor the user cache folder is writable); they are compiled for this run only "
                     "(about 2 s each; NUMBA_CACHE_DIR=<a writable folder> keeps them)"]
    assert done.stdout.splitlines()[-1] == f"wrote {tmp_path / 'out'}"
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "cached")
