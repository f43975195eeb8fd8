"""Outputs under faults (#24, second round): permissions, one writer at a time, a full disk.

Each stage's output is built in a private temporary sibling and renamed into place: the published
output must still get the permissions the user's umask gives (colleagues on a shared cluster read
corpora and exports). A second run into an output being built is refused in one line naming the
holder, a lock left by a killed run does not count, and a file of the lock's name that is not a lock
is never touched. A full disk ends in one line naming the path and the space, the partial output
removed and the previous output intact: tested on a real 2 MB tmpfs where this process may mount one,
and by an ENOSPC raised in-process everywhere.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools import clean as clean_stage
from data_tools import mask, tokenize_shards
from data_tools.common import write_text_atomic
from data_tools.outputs import lock_path, output_lock, staged_dir, staged_file
from tests.conftest import PROJECT_ROOT


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def siblings(path: Path) -> list[str]:
    """Hidden files beside ``path`` that belong to it: partial outputs, locks, temp files."""
    return sorted(p.name for p in path.parent.glob(f".{path.name}.*"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    return lines[0]


@pytest.fixture()
def corpus(tmp_path, clue_lines_file) -> Path:
    """300 real lines, for quick clean runs."""
    path = tmp_path / "corpus.txt"
    lines = clue_lines_file.read_text(encoding="utf-8").splitlines()[:300]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_clean(corpus: Path, output: Path) -> int:
    return clean_stage.main(["--input_paths", str(corpus), "--output_dir", str(output), "--no-progress"])


# -- permissions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o027])
def test_stage_outputs_get_the_permissions_of_the_umask(corpus, tmp_path, google_vocab, umask):
    previous = os.umask(umask)
    try:
        assert run_clean(corpus, tmp_path / "clean") == 0
        assert tokenize_shards.main(["--input_dir", str(tmp_path / "clean"), "--output_dir", str(tmp_path / "tok"),
                                     "--vocab_path", str(google_vocab), "--no-progress"]) == 0
        assert mask.main(["--input_dir", str(tmp_path / "tok"), "--output_dir", str(tmp_path / "mask"),
                          "--target", "bart", "--no-progress"]) == 0
    finally:
        os.umask(previous)
    for name in ("clean", "tok", "mask"):
        output = tmp_path / name
        assert output.stat().st_mode & 0o777 == 0o777 & ~umask, name
        for file in output.iterdir():
            assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file


def test_staged_outputs_of_exports_and_files_get_the_permissions_of_the_umask(tmp_path):
    """zh-export writes through staged_dir, zh-build-vocab and zh-generate through staged_file."""
    previous = os.umask(0o002)
    try:
        with staged_dir(tmp_path / "export") as staging:
            (staging / "config.json").write_text("{}", encoding="utf-8")
        with staged_file(tmp_path / "vocab.txt") as staging:
            staging.write_text("[PAD]\n", encoding="utf-8")
    finally:
        os.umask(previous)
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o775
    assert (tmp_path / "export" / "config.json").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "vocab.txt").stat().st_mode & 0o777 == 0o664


# -- one writer at a time ------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from data_tools.outputs import output_guard
try:
    with output_guard(Path(sys.argv[1])):  # as a stage holds its output: SIGTERM unwinds and unlocks
        print("holding", flush=True)
        time.sleep(120)
except KeyboardInterrupt:
    pass
"""


def start_holder(output: Path) -> subprocess.Popen:
    """Another run holding the lock on ``output`` (a process, as a second zh-clean would be)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_second_run_into_an_output_being_written_is_refused_naming_the_holder(corpus, tmp_path, capsys):
    output = tmp_path / "clean"
    assert run_clean(corpus, output) == 0
    before = snapshot(output)
    holder = start_holder(output)
    try:
        capsys.readouterr()
        assert run_clean(corpus, output) == 2
        line = one_error_line(capsys)
        assert f"pid {holder.pid} on {os.uname().nodename}" in line and "being written by another run" in line
        assert snapshot(output) == before
        assert siblings(output) == [f".{output.name}.lock"]  # the holder's, left alone
    finally:
        holder.terminate()
        holder.wait(timeout=30)
    assert siblings(output) == []  # the holder removed its lock on the way out


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(corpus, tmp_path):
    output = tmp_path / "clean"
    holder = start_holder(output)
    holder.kill()
    holder.wait(timeout=30)
    assert siblings(output) == [f".{output.name}.lock"]  # SIGKILL: the file stays, the flock went with the process
    assert run_clean(corpus, output) == 0
    assert siblings(output) == []


def test_a_user_file_where_the_lock_goes_is_refused_and_kept(corpus, tmp_path, capsys):
    output = tmp_path / "clean"
    mine = lock_path(output)
    mine.write_text("my notes, not a lock\n", encoding="utf-8")
    capsys.readouterr()
    assert run_clean(corpus, output) == 2
    line = one_error_line(capsys)
    assert str(mine) in line and "not a lock of this project" in line
    assert mine.read_text(encoding="utf-8") == "my notes, not a lock\n"
    assert not output.exists()


def test_a_symbolic_link_where_the_lock_goes_is_refused_and_its_target_kept(corpus, tmp_path, capsys):
    output = tmp_path / "clean"
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n", encoding="utf-8")
    lock_path(output).symlink_to(target)
    capsys.readouterr()
    assert run_clean(corpus, output) == 2
    assert "not a lock of this project" in one_error_line(capsys)
    assert lock_path(output).is_symlink() and target.read_text(encoding="utf-8") == "keep me\n"


def test_the_lock_is_reentrant_records_its_holder_and_goes_with_its_block(tmp_path):
    output = tmp_path / "out"
    with output_lock(output):
        record = json.loads(lock_path(output).read_text(encoding="utf-8"))
        assert record["pid"] == os.getpid() and record["host"] == os.uname().nodename
        with output_lock(output):  # a stage locks early, then again while it builds
            assert lock_path(output).exists()
        assert lock_path(output).exists()
    assert siblings(output) == []


def test_two_real_runs_into_one_output(tmp_path, clue_lines_file):
    """A second zh-clean started while the first builds the output is refused; the first finishes."""
    big = tmp_path / "big.txt"
    big.write_bytes(clue_lines_file.read_bytes() * 40)
    output = tmp_path / "clean"
    command = [sys.executable, "-m", "data_tools.clean", "--input_paths", str(big), "--output_dir", str(output),
               "--no-progress", "--no-deduplicate"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=PROJECT_ROOT)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".clean.partial-*")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=300,
                            check=False)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"pid {first.pid}" in lines[0]
    assert siblings(output) == [] and (output / "manifest.json").is_file()


# -- a full disk ---------------------------------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path) -> Path:
    """A 2 MB tmpfs, unmounted afterwards; skipped where this process may not mount one."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not permitted'}); "
                    "test_disk_full_in_process covers the same path")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_ends_in_one_line_and_keeps_the_previous_output(corpus, small_disk, clue_lines_file, capsys):
    output = small_disk / "clean"
    assert run_clean(corpus, output) == 0  # ~0.25 MB: fits
    before = snapshot(output)
    capsys.readouterr()
    assert run_clean(clue_lines_file, output) == 2  # ~2 MB more: does not
    line = one_error_line(capsys)
    assert f"the disk of {small_disk} is full" in line and f"{output} needs more than the" in line
    assert f"the previous complete output {output} is untouched" in line
    assert snapshot(output) == before and siblings(output) == []


def test_a_full_disk_while_arrow_shards_are_written(clue_tokenized_dir, small_disk, capsys):
    output = small_disk / "mask"
    capsys.readouterr()
    assert mask.main(["--input_dir", str(clue_tokenized_dir), "--output_dir", str(output), "--target", "bart",
                      "--dup_factor", "3", "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "is full" in line and f"nothing was written to {output}" in line
    assert not output.exists() and siblings(output) == []
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"),  # as pyarrow says it
])
def test_disk_full_in_process(corpus, tmp_path, monkeypatch, capsys, failure):
    output = tmp_path / "clean"
    assert run_clean(corpus, output) == 0
    before = snapshot(output)

    def no_space(*args, **kwargs):
        raise failure

    monkeypatch.setattr("data_tools.manifests.write_json_atomic", no_space)  # the manifest, the last file written
    capsys.readouterr()
    assert run_clean(corpus, output) == 2
    line = one_error_line(capsys)
    assert "is full" in line and "MB it had written when it filled" in line and "is untouched" in line
    assert snapshot(output) == before and siblings(output) == []


def test_an_atomic_write_that_fails_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "replace", no_space)
    with pytest.raises(OSError):
        write_text_atomic(target, "{}")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_in_process_keeps_the_previous_output(corpus, tmp_path, monkeypatch):
    """What run_stage sees when SIGTERM arrives while a stage builds its output (the subprocess tests in
    test_interrupts.py send real signals)."""
    from data_tools.outputs import Interrupted

    output = tmp_path / "clean"
    assert run_clean(corpus, output) == 0
    before = snapshot(output)

    def terminated(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr("data_tools.manifests.write_json_atomic", terminated)
    with pytest.raises(Interrupted) as raised:
        clean_stage.clean(clean_stage.CleanConfig(input_paths=[corpus], output_dir=output, progress=False))
    assert raised.value.signal_number == signal.SIGTERM
    assert str(raised.value) == (f"interrupted by SIGTERM: the partial output was removed; the previous complete "
                                 f"output {output} is untouched")
    assert snapshot(output) == before and siblings(output) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored once the stage is over
