"""SIGTERM (Slurm's time limit, scancel) and Ctrl-C (SIGINT) during training: the run stops at a step boundary
on every rank, saves a checkpoint, says in one line what was kept and how to resume, and the relaunched command
continues exactly as an uninterrupted run. The handlers themselves are checked in-process; the real runs signal
a 2-rank deepspeed job's whole process group (tests/signal_after_step.py), as Slurm and a terminal do."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.signals import StopSignals, TrainingStopped, reap_data_workers, stop_signals, stop_signals_blocked
from tests.conftest import PROJECT_ROOT, deepspeed_env, run_command
from tests.test_resume import (  # noqa: F401 (fixtures)
    assert_same_run,
    examples_dir,
    records,
    reference,
    train_command,
)

SIGNALLED = str(PROJECT_ROOT / "tests" / "signal_after_step.py")


# -- the handlers, in-process --------------------------------------------------------------------------------


def test_a_signal_before_the_loop_stops_at_once_and_one_in_it_waits_for_the_step_boundary():
    handlers = StopSignals()
    with pytest.raises(TrainingStopped, match="while starting, before any step was trained") as stopped:
        handlers.handle(signal.SIGTERM, None)
    assert stopped.value.signal_number == signal.SIGTERM
    handlers.defer()
    handlers.handle(signal.SIGTERM, None)
    handlers.handle(signal.SIGTERM, None)  # the launcher passes on the signal Slurm sent: not a second request
    assert handlers.received == signal.SIGTERM
    handlers.handle(signal.SIGINT, None)  # the first Ctrl-C waits for the checkpoint too
    with pytest.raises(TrainingStopped, match="interrupted again"):
        handlers.handle(signal.SIGINT, None)


def test_the_handlers_are_installed_for_the_run_and_restored_after():
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals() as handlers:
        handlers.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        assert handlers.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def _blocked_signals(queue) -> None:
    status = Path("/proc/self/status").read_text().splitlines()
    queue.put(int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
def test_data_workers_forked_at_the_start_never_get_the_job_s_signals():
    """Slurm signals every process of the job: a data worker killed by SIGTERM would make torch raise in the middle
    of the save the signal asked for. Workers inherit the mask of the thread that forks them."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with stop_signals_blocked():
        child = context.Process(target=_blocked_signals, args=(queue,))
        child.start()
    mask = queue.get(timeout=60)
    child.join()
    assert mask & (1 << (signal.SIGTERM - 1)) and mask & (1 << (signal.SIGINT - 1))
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this process: unblocked again


def _sleep_for_ever() -> None:
    import time

    time.sleep(600)


def test_at_exit_data_workers_that_block_sigterm_are_reaped_not_waited_for():
    """multiprocessing's exit hook would SIGTERM such a worker (blocked) and join it for ever."""
    context = multiprocessing.get_context("fork")
    with stop_signals_blocked():
        worker = context.Process(target=_sleep_for_ever, daemon=True)
        worker.start()
    worker.terminate()  # SIGTERM: blocked in the worker
    worker.join(timeout=1)
    assert worker.is_alive()
    sigchld = signal.getsignal(signal.SIGCHLD)
    try:
        reap_data_workers()
    finally:
        signal.signal(signal.SIGCHLD, sigchld)  # what the reaper turns off at exit
    assert not worker.is_alive()


# -- real 2-rank runs --------------------------------------------------------------------------------------------


def signalled_run(command: list[str], name: str, after_step: int, env: dict[str, str] | None = None
                  ) -> subprocess.CompletedProcess:
    """``command`` (running pipeline/trainer.py) through tests/signal_after_step.py, in its own process group; waits
    until every process of the job has closed its output (the launcher itself dies of the signal at once)."""
    trainer = str(PROJECT_ROOT / "pipeline" / "trainer.py")
    signalled = [SIGNALLED if part == trainer else part for part in command]
    process = subprocess.Popen(signalled, env={**(env or deepspeed_env()), "ZH_SIGNAL": name,
                                               "ZH_SIGNAL_AFTER_STEP": str(after_step)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=600)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left if the run never stopped
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(signalled, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes_exactly(examples_dir, reference, tmp_path):  # noqa: F811
    """Stopped after step 6 (the signal came after step 5; the ranks agree one step later), between the scheduled
    checkpoints 4 and 8: step 6 is saved, and the relaunch gives the uninterrupted losses and examples."""
    run_dir = tmp_path / "run"
    command = train_command(examples_dir, run_dir, 29760)
    stopped = signalled_run(command, "TERM", after_step=5)
    output = stopped.stdout + stopped.stderr
    line = f"stopped by SIGTERM after step 6: checkpoint {run_dir / 'checkpoints' / 'step00000006'} is complete"
    assert output.count(line) == 1, output[-4000:]  # rank 0's line, once
    assert "relaunch the same command" in output and "Traceback" not in output, output[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000006"
    assert max(records(run_dir / "metrics.jsonl", "loss")) == 6
    assert not (tmp_path / ".run.lock").exists()  # released on the way out

    resumed = run_command(train_command(examples_dir, run_dir, 29761))
    assert "resuming from step00000006 (step 6)" in resumed.stderr
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_ctrl_c_stops_a_run_with_one_line_and_exit_130(examples_dir, tmp_path):  # noqa: F811
    """A single process (no launcher in between): its exit status and its whole stderr are the trainer's own."""
    run_dir = tmp_path / "run"
    flags = train_command(examples_dir, run_dir, 0)[train_command(examples_dir, run_dir, 0).index("--data_dir"):]
    stopped = signalled_run([sys.executable, str(PROJECT_ROOT / "pipeline" / "trainer.py"), *flags], "INT",
                            after_step=2)
    assert stopped.returncode == 130, stopped.stderr[-4000:]
    errors = [line for line in stopped.stderr.splitlines() if "stopped by" in line]
    assert errors == [f"signal_after_step.py: stopped by SIGINT after step 3: checkpoint "  # the program's name first
                      f"{run_dir / 'checkpoints' / 'step00000003'} is complete and checkpoints/latest points to it; "
                      "relaunch the same command to resume from it"]
    assert "Traceback" not in stopped.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000003"
    state = json.loads((run_dir / "checkpoints" / "step00000003" / "trainer_state.json").read_text())
    digests = json.loads((run_dir / "checkpoints" / "step00000003" / "sha256.json").read_text())
    assert state["step"] == 3 and {*digests, "sha256.json"} == set(state["files"])
    assert torch.load(run_dir / "checkpoints" / "step00000003" / "rng_state_rank0.pt", weights_only=True)
