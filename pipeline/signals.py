"""Stopping a training run on a signal: Ctrl-C (SIGINT) and SIGTERM, what Slurm sends every process of a job
at its time limit (and ``scancel``), and what the deepspeed launcher and torchrun pass on to the ranks.

A signal during the start-up stops at once: nothing was trained. During the loop the handler only notes it;
at the next step boundary the ranks combine what they received (one all-reduce, any rank's signal stops all),
save a checkpoint unless the step just saved one, and stop with one line naming the checkpoint kept and
saying to relaunch the same command. Stopping at a boundary rather than where the signal lands keeps every
rank out of a half-done collective, and the checkpoint keeps the steps since the last scheduled one.

A second Ctrl-C stops at once, as users expect when a save takes long (the checkpoint being written is then
not marked complete and ``latest`` stays on the previous one). Repeated SIGTERMs are not a second request:
the launcher passes on the one Slurm already sent to every process.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import multiprocessing
import signal
import threading
from types import FrameType
from typing import Any, Iterator

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """A signal stopped the run. ``str()`` is the line to print (empty on ranks other than 0, so the
    launcher's log has it once); the exit status is ``128 + signal_number`` (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = int(signal_number)


def signal_name(number: int) -> str:
    return signal.Signals(number).name


class StopSignals:
    """The training process's SIGINT and SIGTERM handlers (installed by :func:`stop_signals`). Before
    :meth:`defer` a signal raises :class:`TrainingStopped` where it lands; after it, :attr:`received` notes it
    for the loop to act on at a step boundary."""

    def __init__(self, is_main: bool = True) -> None:
        self.is_main = is_main  # only rank 0 says why it stopped: the launcher's log has the line once
        self.received = 0  # the first signal noted since defer(); 0 = none
        self.interrupts = 0  # SIGINTs noted since defer()
        self.deferring = False

    def defer(self) -> None:
        """From now on the loop acts on signals at step boundaries."""
        self.deferring = True

    def handle(self, number: int, _frame: FrameType | None) -> None:
        if not self.deferring:
            raise TrainingStopped(f"stopped by {signal_name(number)} while starting, before any step was trained; "
                                  "the run directory's checkpoints are as they were: relaunch the same command"
                                  if self.is_main else "", number)
        self.received = self.received or number
        self.interrupts += number == signal.SIGINT
        if self.interrupts > 1:
            raise TrainingStopped("interrupted again (SIGINT) while stopping: the checkpoint being written, if any, "
                                  "is not marked complete and checkpoints/latest still names the previous one; "
                                  "relaunch the same command to resume from it" if self.is_main else "", number)


@contextlib.contextmanager
def stop_signals(is_main: bool = True) -> Iterator[StopSignals]:
    """Install :class:`StopSignals` for the block (main thread only: the only one that may set handlers; elsewhere,
    as under a test runner's worker thread, the signals keep their handlers and the run its default behaviour)."""
    handlers = StopSignals(is_main)
    if threading.current_thread() is not threading.main_thread():
        yield handlers
        return
    previous = {number: signal.signal(number, handlers.handle) for number in STOP_SIGNALS}
    try:
        yield handlers
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread while the block runs, so that the processes it forks (the data
    workers) inherit them blocked. Slurm signals every process of the job and Ctrl-C the whole foreground process
    group: a worker that died of it would make torch raise "DataLoader worker ... killed by signal" in the
    training process, in the middle of the save the signal asked for. The workers end when the loader
    shuts them down, when their parent dies (torch's watchdog), or at its exit (:func:`reap_data_workers`). A
    signal that arrives meanwhile is delivered to this process when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _reaper_registered:
        atexit.register(reap_data_workers)  # after multiprocessing's own exit hook, so it runs before it
        _reaper_registered.append(True)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_reaper_registered: list[bool] = []


def reap_data_workers() -> None:
    """At exit: end the data workers a loader did not shut down. multiprocessing's own exit hook terminates
    daemon children with SIGTERM, which these workers block, then joins them without a timeout: the process
    would never exit. A loader left in a reference cycle shuts its workers down cleanly when collected; any
    worker still alive then is killed (it only prepares batches), with torch's SIGCHLD check off so its death
    is not reported as a failure."""
    gc.collect()
    alive = [child for child in multiprocessing.active_children() if child.daemon]
    if not alive:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in alive:
        child.kill()
    for child in alive:
        child.join(timeout=10)


class StopAgreement:
    """The ranks' signals, combined at step boundaries without making the host wait for the device: the value
    all-reduced (MAX) at one boundary is read at the next, from pinned memory copied behind that step's work,
    so on a GPU the loop keeps queueing work ahead. Every rank reads the same value at the same boundary: the
    run stops one step after the first rank noted a signal, at the same step on every rank."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: tuple[torch.Tensor, Any] | None = None  # (host copy, CUDA event after it) of the last exchange
        self.host = torch.empty(1, dtype=torch.int64, pin_memory=True) if device.type == "cuda" else None

    def exchange(self, local_signal: int) -> int:
        """Post this rank's signal (0: none); return the largest signal any rank posted at the previous call."""
        agreed = 0
        if self.pending is not None:
            host, event = self.pending
            if event is not None:
                event.synchronize()  # the previous step's work is done by now: waits for little or nothing
            agreed = int(host.item())
        flag = torch.full((1,), local_signal, dtype=torch.int64, device=self.device)  # a fill: no host copy
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self.host is not None:  # read above, so free to take the new value
            self.host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (self.host, event)
        else:
            self.pending = (flag, None)
        return agreed
