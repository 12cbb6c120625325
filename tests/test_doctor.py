"""`convert-fp8 --version` and `convert-fp8 doctor`: the facts a bug report needs, each checked for its value."""

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

import converter
from converter import doctor

from .conftest import run_cli


def rows(output: str) -> dict[str, list[str]]:
    """The doctor's `label  value` lines, by label (a label such as `gpu` can repeat)."""
    got: dict[str, list[str]] = {}
    for line in output.splitlines():
        label, value = line.split("  ", 1)
        got.setdefault(label, []).append(value.strip())
    return got


def test_version_is_the_installed_packages():
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.output == f"convert-fp8, version {metadata.version('convert-fp8')}\n"
    assert metadata.version("convert-fp8") == converter.__version__


def test_doctor_names_the_versions_of_the_tool_python_and_each_package():
    result = run_cli("doctor")
    assert result.exit_code == 0, result.output
    got = rows(result.output)
    assert got["convert-fp8"] == [converter.__version__]
    assert got["python"] == [f"{platform.python_version()} ({sys.executable})"]
    for name in ("torch", "transformers", "safetensors", "huggingface_hub", "numba", "triton", "kernels"):
        assert got[name] == [doctor.package_version(name)], name
    assert got["torch"] == [metadata.version("torch")] and got["numba"] == [metadata.version("numba")]
    assert "free disk at --dst" not in got


def test_a_missing_package_is_named_not_installed(monkeypatch):
    monkeypatch.setattr(doctor, "PACKAGES", doctor.PACKAGES + ("no-such-package-for-doctor",))
    got = rows(run_cli("doctor").output)
    assert got["no-such-package-for-doctor"] == ["not installed"]


def test_free_disk_at_dst_is_a_number_of_bytes_measured_at_the_nearest_folder(tmp_path):
    got = rows(run_cli("doctor", "--dst", tmp_path / "not-yet" / "out-FP8").output)
    [line] = got["free disk at --dst"]
    free = int(line.split(" bytes")[0])
    assert abs(free - shutil.disk_usage(tmp_path).free) < 2**30
    assert line.endswith(f", measured at {tmp_path})")
    assert not (tmp_path / "not-yet").exists()
    [line] = rows(run_cli("doctor", "--dst", tmp_path).output)["free disk at --dst"]
    assert line.endswith("GB)")


def test_numba_cache_is_the_first_writable_folder_in_numbas_order(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert doctor.numba_cache() == f"writable ({tmp_path / 'numba'})"
    if os.geteuid() != 0:  # root may write anywhere
        blocked = tmp_path / "ro"
        blocked.mkdir(mode=0o500)
        monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocked / "numba"))
        monkeypatch.setattr(doctor, "numba_cache_folders", lambda: [blocked / "numba"])
        assert doctor.numba_cache().startswith("not writable: ")


def test_cpu_features_come_from_the_cpuinfo_flags():
    x86 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_bf16\n"
    model, features = doctor.cpu(x86)
    assert model.startswith("Some CPU, ")
    assert features == ("sse4_2 avx avx2 fma avx512f avx512bw avx512_bf16 "
                        "(absent: f16c avx512vl avx512_fp16 amx_tile amx_bf16)")
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16\nCPU implementer\t: 0x41\n"
    assert doctor.cpu(arm)[1] == "asimd sve bf16 (absent: asimdhp sve2 i8mm)"
    assert doctor.cpu("")[1] == "unknown (no flags in /proc/cpuinfo)"


def test_gpu_line_says_what_torch_sees():
    import torch

    lines = doctor.gpus()
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        assert f"compute capability {major}.{minor}" in lines[0]
    else:
        assert lines == [f"none visible (torch {torch.__version__}, "
                         + (f"CUDA {torch.version.cuda} build)" if torch.version.cuda else "a CPU-only build)")]


def test_doctor_runs_offline_and_shows_no_token(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_TOKEN="hf_secret_value", HF_ENDPOINT="http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "-m", "converter.cli", "doctor", "--dst", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "hf_secret_value" not in done.stdout
    assert "HF_TOKEN=(set)" in done.stdout and "HF_HUB_OFFLINE=1" in done.stdout
