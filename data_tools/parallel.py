"""Order-preserving parallel map with a bounded number of chunks in flight.

``multiprocessing.Pool.imap`` drains its input iterator into an unbounded task queue,
which on a 100 GB corpus means the whole corpus in memory. Here at most
``max_in_flight`` chunks are submitted at a time, and results come back in input order,
so the stage's output does not depend on the number of processes.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_map(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    processes: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    max_in_flight: int | None = None,
) -> Iterator[Result]:
    """``map(function, items)`` on ``processes`` worker processes, results in input order."""
    if processes <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(function, items)
        return
    limit = max_in_flight or 2 * processes
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def chunked(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
