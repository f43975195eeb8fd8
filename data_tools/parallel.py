"""Order-preserving parallel map with a bounded number of chunks in flight.

``multiprocessing.Pool.imap`` drains its input iterator into an unbounded task queue,
which on a 100 GB corpus means the whole corpus in memory. Here at most
``max_in_flight`` chunks are submitted at a time, and results come back in input order,
so the stage's output does not depend on the number of processes.

Ctrl-C reaches every process of the terminal's process group, and Slurm's SIGTERM every process of
the job: the workers ignore both (a worker would otherwise print its own traceback, and one killed
while it sends a result can hang the executor for good). The main process, which owns the output,
unwinds: the chunks not yet started are cancelled, those in flight finish (a second or so), the
workers exit. A worker whose main process is gone exits by itself. A worker that dies (the
out-of-memory killer) ends the stage in one line.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, TypeVar

from data_tools.common import UserError
from data_tools.outputs import raise_if_interrupted, signals_deferred

Item = TypeVar("Item")
Result = TypeVar("Result")


def _start_worker(initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    """Runs first in every worker: SIGINT and SIGTERM are the main process's to handle (forked workers would
    otherwise inherit its handlers, which raise)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent(parent: int) -> None:
    """A worker ignores SIGTERM, so it must not outlive a main process that was killed outright (SIGKILL)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def ordered_map(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    processes: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    max_in_flight: int | None = None,
) -> Iterator[Result]:
    """``map(function, items)`` on ``processes`` worker processes, results in input order. Close the iterator
    (``contextlib.closing``) when you stop early: its workers are stopped then."""
    if processes <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            raise_if_interrupted()
            yield function(item)
        return
    limit = max_in_flight or 2 * processes
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker,
                               initargs=(initializer, initargs))
    try:
        pending: deque = deque()
        for item in items:
            # Submitting forks the workers, and an exception raised in the fork hooks (logging's, threading's)
            # is printed and dropped: an interrupt must wait until the fork is done.
            with signals_deferred():
                pending.append(pool.submit(function, item))
            if len(pending) >= limit:
                yield pending.popleft().result()
                raise_if_interrupted()
        while pending:
            yield pending.popleft().result()
            raise_if_interrupted()
    except BrokenProcessPool as error:
        pool.shutdown(wait=True)
        raise UserError("a worker process ended abruptly (killed, perhaps by the out-of-memory killer); the partial "
                        "output was removed: run again, with fewer --processes_num if memory ran out") from error
    except BaseException:  # an error, an interrupt, or the caller closing the iterator
        pool.shutdown(wait=True, cancel_futures=True)  # the chunks in flight finish: a worker is never cut mid-send
        raise
    pool.shutdown(wait=True)


def chunked(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
