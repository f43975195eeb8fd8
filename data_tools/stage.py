"""The run every data stage shares, written once: a stage supplies its parts, :func:`run_data_stage`
runs them in order.

1. the stage's constructor reads and checks what it depends on (upstream manifest, vocab, flags);
2. the output is locked (a second run into it is refused, :func:`data_tools.outputs.output_lock`) and
   SIGTERM from here on raises ``Interrupted`` as Ctrl-C raises ``KeyboardInterrupt``; the output
   directory is checked: apart from the inputs, and replaceable (an earlier output of the same stage,
   or ``--overwrite``);
3. ``check_inputs``: the input shards against their manifest, before anything is written;
4. a staging directory beside the output; ``start`` opens the writers there;
5. ``work_items`` go through ``worker`` on ``processes`` processes, results back in input order,
   and ``consume`` counts and writes each one in the main process;
6. ``finish`` closes the writers, checks the counts and returns the typed manifest, which is
   written into the staging directory; the summary line is printed;
7. the staging directory is renamed into place (a failure, an interrupt or a full disk at any step
   leaves the previous output untouched and ends in one line), and the manifest's JSON is returned.

The stage object holds the run's state (writers, counters), so each part stays short; the work
itself runs in module-level functions, which worker processes can import.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

from data_tools.manifests import StageManifest
from data_tools.outputs import output_guard, staged_dir
from data_tools.parallel import ordered_map
from data_tools.shards import check_stage_output

Work = TypeVar("Work")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Worker(Generic[Work, Result]):
    """The function each work item goes through, and how each worker process is set up."""

    function: Callable[[Work], Result]
    setup: Callable[..., None] | None = None  # runs once in every worker process (in the main one for 1 process)
    setup_args: tuple[Any, ...] = ()


class DataStage(ABC, Generic[Work, Result]):
    """The parts of one data stage. Subclasses set the class attributes and, in ``__init__``,
    ``output_dir``, ``overwrite``, ``inputs`` and ``processes``."""

    name: str  # the manifest's "stage", also the prefix of its messages
    shard_prefix: str  # its shards are <shard_prefix>-NNNNN.*
    output_dir: Path
    overwrite: bool
    inputs: Mapping[str, Path | Iterable[Path] | None]  # flag -> paths the output must stay apart from
    processes: int

    def check_inputs(self) -> None:
        """Check the input files against their manifest once the output is known to be writable."""

    @abstractmethod
    def start(self, staging: Path, resources: ExitStack) -> None:
        """Open the writers in ``staging``; ``resources`` closes what must go before the output is
        published (a spill directory) or when the run fails."""

    @abstractmethod
    def work_items(self) -> Iterable[Work]:
        """The items for the worker, in output order."""

    @abstractmethod
    def worker(self) -> Worker[Work, Result]:
        """The function the work items go through (module-level, so worker processes can run it)."""

    @abstractmethod
    def consume(self, result: Result) -> None:
        """Count and write one item's result, in the main process, in input order."""

    @abstractmethod
    def finish(self, staging: Path) -> StageManifest:
        """Close the writers, check the counts (raise ``UserError`` to publish nothing) and return the manifest."""

    @abstractmethod
    def summary(self, manifest: StageManifest) -> str:
        """The one line printed when the stage is done."""


def run_data_stage(stage: DataStage) -> dict:
    """Run ``stage`` into its output directory; returns the manifest it wrote (as JSON)."""
    with output_guard(stage.output_dir):
        check_stage_output(stage.output_dir, stage.name, stage.shard_prefix, stage.overwrite, dict(stage.inputs))
        stage.check_inputs()
        with staged_dir(stage.output_dir) as staging:
            with ExitStack() as resources:  # closed before the staging directory is published
                stage.start(staging, resources)
                worker = stage.worker()
                # closed first when a step fails or is interrupted: its worker processes are stopped then
                results = resources.enter_context(closing(ordered_map(
                    worker.function, stage.work_items(), stage.processes, initializer=worker.setup,
                    initargs=worker.setup_args)))
                for result in results:
                    stage.consume(result)
                manifest = stage.finish(staging)
            manifest.write(staging)
            print(stage.summary(manifest), file=sys.stderr)
    return manifest.to_json()


def check_accounted(stage: str, read: int, kept: int, dropped: Mapping[str, int]) -> None:
    """Every document read was either kept or dropped for a counted reason."""
    if kept + sum(dropped.values()) != read:
        raise AssertionError(f"{stage} lost documents without counting them")
