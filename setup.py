"""Packages for setuptools; everything else is declared in setup.cfg.

Every package under converter/ ships, found rather than listed. The presets' one source is configs/ at the top of
the checkout; it ships inside the package as `converter.preset_files` (package data, read with importlib.resources),
in wheels and editable installs alike.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["converter", "converter.*"]) + ["converter.preset_files"],
    package_dir={"converter.preset_files": "configs"},
    package_data={"converter.preset_files": ["*.json"]},
)
