"""Ctrl-C and SIGTERM during a data stage (#24, second round): real ``zh-clean`` and ``zh-mask`` runs.

Each run is started in its own process group on an input big enough to still be running, and the
signal is sent to the whole group once the stage has started building its output, as a terminal's
Ctrl-C and Slurm's time limit (SIGTERM to every process of the job) do. The run must end with exit
status 130 (SIGINT) or 143 (SIGTERM) and one line saying what was kept; no worker may print a
traceback; no partial output or lock may be left; the previous complete output must be byte-identical;
no process of the group may outlive it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools import clean as clean_stage
from data_tools import mask
from tests.conftest import PROJECT_ROOT


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def interrupt(command: list[str], output: Path, number: int, delay: float = 0.3) -> subprocess.CompletedProcess:
    """Run ``python -m command`` in a new process group; once its partial output exists, wait ``delay`` seconds
    and send ``number`` to the group. Waits for every process of the group to be gone."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen([sys.executable, "-m", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env, cwd=PROJECT_ROOT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(output.parent.glob(f".{output.name}.partial-*")):
        assert run.poll() is None, f"the run ended before it was interrupted:\n{run.communicate()[1]}"
        assert time.monotonic() < deadline, "the run never started its output"
        time.sleep(0.01)
    time.sleep(delay)
    os.killpg(run.pid, number)
    stdout, stderr = run.communicate(timeout=120)
    for _ in range(100):  # the workers are reaped by the main process before it exits
        try:
            os.killpg(run.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail("a process of the interrupted run outlived it")
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)


def assert_stopped_cleanly(result: subprocess.CompletedProcess, number: int, output: Path, before: dict | None):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert result.returncode == 128 + number, result.stderr
    name = signal.Signals(number).name
    assert f"interrupted by {name}: the partial output was removed" in lines[0]
    if before is None:
        assert f"nothing was written to {output}" in lines[0] and not output.exists()
    else:
        assert f"the previous complete output {output} is untouched" in lines[0]
        assert snapshot(output) == before
    assert sorted(p.name for p in output.parent.glob(f".{output.name}*")) == []


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory, clue_lines_file) -> Path:
    """~40 MB of real text: clean takes seconds on it."""
    path = tmp_path_factory.mktemp("big") / "big.txt"
    path.write_bytes(clue_lines_file.read_bytes() * 20)
    return path


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-processes"])
def test_clean_interrupted_keeps_the_previous_output(big_corpus, clue_lines_file, tmp_path, number, processes):
    output = tmp_path / "clean"
    assert clean_stage.main(["--input_paths", str(clue_lines_file), "--output_dir", str(output), "--no-progress"]) == 0
    before = snapshot(output)
    command = ["data_tools.clean", "--input_paths", str(big_corpus), "--output_dir", str(output), "--no-progress",
               "--no-deduplicate", "--processes_num", str(processes)]
    assert_stopped_cleanly(interrupt(command, output, number), number, output, before)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-processes"])
def test_mask_interrupted_writes_nothing(clue_tokenized_dir, tmp_path, number, processes):
    output = tmp_path / "mask"
    command = ["data_tools.mask", "--input_dir", str(clue_tokenized_dir), "--output_dir", str(output), "--target",
               "bart", "--dup_factor", "100", "--chunk_documents", "100", "--processes_num", str(processes),
               "--no-progress"]
    assert_stopped_cleanly(interrupt(command, output, number, delay=0.05), number, output, None)


def test_mask_interrupted_over_its_previous_output(clue_tokenized_dir, tmp_path):
    output = tmp_path / "mask"
    assert mask.main(["--input_dir", str(clue_tokenized_dir), "--output_dir", str(output), "--target", "bart",
                      "--no-progress"]) == 0
    before = snapshot(output)
    command = ["data_tools.mask", "--input_dir", str(clue_tokenized_dir), "--output_dir", str(output), "--target",
               "bart", "--dup_factor", "100", "--processes_num", "2", "--no-progress"]
    assert_stopped_cleanly(interrupt(command, output, signal.SIGTERM), signal.SIGTERM, output, before)
