"""The presets shipped with convert-fp8, installed as the package `converter.preset_files` (see setup.cfg)."""
