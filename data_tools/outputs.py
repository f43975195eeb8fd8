"""Where commands write: never over the user's files or their own inputs, and never half.

Every output (a stage's directory, an exported model, a vocab file, a generation file) is
built in a temporary sibling, ``.<name>.partial-<random>``, and renamed into place only when
it is complete. A failed or killed run therefore leaves the previous complete output
untouched and nothing that looks complete (a leftover partial sibling is hidden, named as
such, and reported by the next run). The published output gets the permissions the user's
umask gives a new directory or file, not the temporary sibling's private 0700.

An existing output is replaced only when it is recognisably an earlier output of the same
command (its manifest says so and it holds nothing else), or when the user passes
``--overwrite``; an output may never be, contain or lie inside one of the command's inputs.

While an output is built its writer holds an exclusive lock on it (:func:`output_lock`), so a
second run into the same place is refused in one line naming the holder. SIGTERM (what Slurm sends at
the time limit) raises :class:`Interrupted` as Ctrl-C raises ``KeyboardInterrupt``, and a full disk
becomes one :class:`UserError` line: either way the partial output is removed on the way out.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from data_tools.cli import option
from data_tools.common import UserError

PARTIAL_MARK = ".partial-"


def overwrite_option() -> Any:
    """The ``--overwrite`` flag every command with an output has."""
    return option(False, "Replace an existing output even when it is not recognisably an earlier output of this "
                  "command (its contents are deleted once the new output is complete). Never needed to re-run a "
                  "command into its own earlier output.")


def check_apart(output: Path, output_flag: str, inputs: dict[str, Path | Iterable[Path] | None]) -> None:
    """Refuse an output that is an input, lies inside one, or contains one."""
    resolved_output = Path(output).resolve()
    for flag, paths in inputs.items():
        if paths is None:
            continue
        for path in [paths] if isinstance(paths, (str, Path)) else paths:
            resolved = Path(path).resolve()
            if resolved == resolved_output:
                relation = "is"
            elif resolved in resolved_output.parents:
                relation = "lies inside"
            elif resolved_output in resolved.parents:
                relation = "contains"
            else:
                continue
            raise UserError(f"{output_flag} {output} {relation} the input {flag} {path}: a command never writes over "
                            f"or into its own input; choose an output path outside it (nothing was changed)")


def read_json_object(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when it is absent, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_replaceable_dir(output_dir: Path, output_flag: str, writer: str, marker_file: str,
                          is_own: Callable[[dict], bool], owns: Callable[[dict, str], bool],
                          overwrite: bool) -> None:
    """An existing non-empty ``output_dir`` may be replaced only when ``marker_file`` in it says
    ``writer`` wrote it and it holds nothing but what ``writer`` writes, or with ``--overwrite``."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"{output_flag} {output_dir} is a file, not a directory; give a directory path")
    entries = sorted(entry.name for entry in output_dir.iterdir())
    if not entries or overwrite:
        return
    marker = read_json_object(output_dir / marker_file)
    if marker is None or not is_own(marker):
        raise UserError(f"{output_flag} {output_dir} is not empty and is not an earlier output of {writer} (no "
                        f"{marker_file} written by it); nothing was changed: choose a new directory, or pass "
                        "--overwrite to replace it")
    foreign = [name for name in entries if not owns(marker, name)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(f"{output_flag} {output_dir} holds {foreign[0]}{more}, which {writer} did not write; nothing "
                        "was changed: move it away, or pass --overwrite to replace the whole directory")


def check_replaceable_file(path: Path, output_flag: str, writer: str, is_own: bool, overwrite: bool) -> None:
    """An existing file is replaced only when ``writer`` wrote it (``is_own``) or with ``--overwrite``."""
    if path.is_dir():
        raise UserError(f"{output_flag} {path} is a directory; give the path of a file to write")
    if path.exists() and not is_own and not overwrite:
        raise UserError(f"{output_flag} {path} exists and was not written by {writer}; nothing was changed: choose "
                        "another path, or pass --overwrite to replace it")


def warn_leftover_partials(output: Path) -> None:
    """Name partial outputs an interrupted run left beside ``output`` (they can be large)."""
    parent = output.parent
    if not parent.is_dir():
        return
    leftovers = sorted(parent.glob(f".{output.name}{PARTIAL_MARK}*"))
    if leftovers:
        print(f"note: {len(leftovers)} partial output(s) of an interrupted run lie beside {output} "
              f"({leftovers[0]}{', ...' if len(leftovers) > 1 else ''}); delete them to free the space",
              file=sys.stderr)


# -- interrupts: Ctrl-C and SIGTERM unwind like an error, so the partial output is removed --------------

class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM (what Slurm sends at the time limit) stopped a command. ``str()`` is the one
    line to print (what was kept); the exit status is ``128 + signal_number`` (130, 143). A ``KeyboardInterrupt``
    so that every ``except KeyboardInterrupt`` (and ``run_stage``'s) treats both signals alike."""

    def __init__(self, message: str = "", signal_number: int = signal.SIGINT) -> None:
        super().__init__(message or f"interrupted by {signal.Signals(signal_number).name}")
        self.signal_number = int(signal_number)
        self.described = bool(message)  # says what became of the output


_owner = {"pid": 0}  # the process whose handlers raise: not a worker forked a moment ago
_received: list[int] = []  # the signals the handler saw, for raise_if_interrupted


def _drops_exceptions(frame: Any) -> bool:
    """Whether the interrupted code would drop an exception raised in it: a ``__del__``, or numba compiling
    (llvmlite calls back into Python through ctypes). The interrupt is then raised at the next check."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or any(f"{os.sep}{name}{os.sep}" in code.co_filename
                                            for name in ("numba", "llvmlite")):
            return True
        frame = frame.f_back
    return False


def _raise_interrupted(number: int, frame: Any) -> None:
    if os.getpid() == _owner["pid"]:  # a child forked before it set its own handlers ignores the signal
        _received.append(number)
        if not _drops_exceptions(frame):
            raise Interrupted(signal_number=number)


def raise_if_interrupted() -> None:
    """Raise again an interrupt whose exception was dropped where it was raised (called between work items
    and before an output is published: an interrupted run must never publish)."""
    if _received:
        raise Interrupted(signal_number=_received[0])


@contextmanager
def interruptible() -> Iterator[None]:
    """While the block runs SIGTERM raises :class:`Interrupted`, as Ctrl-C does (its default action would kill
    the process with a half-built output left behind). The handler raises only in this process: a worker
    forked meanwhile ignores the signals until it sets its own (the main process stops it). A handler someone
    else set (the trainer's, a shell's ``SIG_IGN``) is left alone, as is any thread but the main one."""
    defaults = ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))
    main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    taken = [number for number, default in defaults if main and signal.getsignal(number) == default]
    previous = {number: signal.signal(number, _raise_interrupted) for number in taken}
    if taken:
        _owner["pid"] = os.getpid()
        _received.clear()
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if taken:
            _received.clear()  # delivered, or too late to matter: the next run starts afresh


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (the two renames that publish an output, the removal of
    a partial one or of a lock must not be cut in half); one that came meanwhile is raised again after it.
    Handlers rather than a signal mask: another thread (tqdm's, pyarrow's) would take a masked signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(number: int, _frame: Any) -> None:
        received.append(number)

    previous = {number: signal.signal(number, record) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        if received:
            signal.raise_signal(received[0])


def _kept(output: Path, existed: bool) -> str:
    return f"the previous complete output {output} is untouched" if existed else f"nothing was written to {output}"


def interrupted(error: KeyboardInterrupt, output: Path, existed: bool, started: bool = True) -> Interrupted:
    """The :class:`Interrupted` to end with when ``error`` stopped the building of ``output``: says what was kept."""
    number = getattr(error, "signal_number", signal.SIGINT)
    what = "the partial output was removed" if started else "nothing had been written yet"
    return Interrupted(f"interrupted by {signal.Signals(number).name}: {what}; {_kept(output, existed)}", number)


# -- a full disk ---------------------------------------------------------------------------------------------


def is_disk_full(error: OSError) -> bool:
    """No space or quota left: Python's own writes carry the errno, pyarrow's only name it in the message."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    return error.errno in codes or any(f"[errno {code}]" in str(error).lower() for code in codes)


def _tree_size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size if path.exists() else 0
    return sum((Path(root) / name).stat().st_size for root, _, names in os.walk(path) for name in names)


def disk_full_error(output: Path, written: int, existed: bool) -> UserError:
    """One line for a full disk: where, how much the output had needed when it filled, what was kept."""
    free = shutil.disk_usage(output.parent).free + written  # once the partial output is removed
    return UserError(f"the disk of {output.parent} is full: {output} needs more than the {written / 1e6:.1f} MB it "
                     f"had written when it filled ({free / 1e6:.1f} MB free without it); the partial output was "
                     f"removed and {_kept(output, existed)}: free space there or choose another output path")


@contextmanager
def _unwinding(output: Path, existed: bool, staging: Path) -> Iterator[None]:
    """An interrupt or a full disk while ``output`` is built in ``staging`` ends in one line saying what was kept."""
    try:
        yield
    except KeyboardInterrupt as error:
        raise interrupted(error, output, existed) from None
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(output, _tree_size(staging), existed) from error
        raise


# -- one writer at a time ------------------------------------------------------------------------------------

LOCK_SUFFIX = ".lock"
LOCK_MARK = "zh-seq2seq output lock"  # tells this project's lock files from a user's file of the same name
_held: dict[str, int] = {}  # lock file -> descriptor, of the locks this process holds


def lock_path(output: Path) -> Path:
    """Where the lock on ``output`` lives: ``.<name>.lock`` beside it."""
    output = Path(output)
    return output.parent.resolve() / f".{output.name}{LOCK_SUFFIX}"


def _forget_locks_in_child() -> None:
    """A forked worker shares the parent's locks; closing its copies leaves them held by the parent alone (a
    worker outliving its parent must not keep the output locked)."""
    for descriptor in _held.values():
        os.close(descriptor)
    _held.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _lock_record(descriptor: int) -> dict | None:
    try:
        value = json.loads(os.pread(descriptor, 4096, 0))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("lock") == LOCK_MARK else None


def _is_at(info: os.stat_result, path: Path) -> bool:
    """Whether the file ``info`` describes is still the one at ``path`` (not replaced or removed meanwhile)."""
    try:
        current = os.lstat(path)
    except FileNotFoundError:
        return False
    return (current.st_dev, current.st_ino) == (info.st_dev, info.st_ino)


def _new_lock(path: Path, output: Path) -> tuple[int, Path]:
    """A locked file holding this run's record, not yet at ``path``: linked there, the lock appears complete and
    held from its first instant (no one ever sees it empty or unlocked)."""
    descriptor, name = tempfile.mkstemp(prefix=f"{path.name}-", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o644 & ~_umask())  # others may read who holds it
        record = {"lock": LOCK_MARK, "pid": os.getpid(), "host": socket.gethostname(), "output": str(output),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(descriptor, json.dumps(record).encode("utf-8"))
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(descriptor)
        os.unlink(name)
        raise
    return descriptor, Path(name)


def _take_over(path: Path, fresh: Path, output: Path) -> bool:
    """Put ``fresh`` in place of the lock file at ``path`` when no live run holds that one (a run killed
    before it removed its lock); False when it vanished or changed meanwhile (try again). A held lock, or a
    file at ``path`` that is not a lock of this project, is refused."""
    foreign = UserError(f"{path} exists and is not a lock of this project (runs writing {output} lock it there); "
                        "nothing was changed: move that file away")
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError as error:  # a symbolic link (ELOOP) or something unreadable
        raise foreign from error
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise foreign
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        record = _lock_record(descriptor)
        if not _is_at(info, path):
            return False
        if record is None:
            raise foreign
        if held:
            raise UserError(f"{output} is being written by another run (pid {record.get('pid')} on "
                            f"{record.get('host')}, since {record.get('since')}; lock {path}); nothing was changed: "
                            "wait for that run to end, or stop it")
        os.replace(fresh, path)  # still holding the dead run's file: a rival taking over too sees the change
        return True
    finally:
        os.close(descriptor)


def _acquire(path: Path, output: Path) -> int:
    for _ in range(10):  # each retry follows a rival's change of the file, which cannot go on for long
        descriptor, fresh = _new_lock(path, output)
        try:
            try:
                os.link(fresh, path)
                return descriptor
            except FileExistsError:
                pass
            if _take_over(path, fresh, output):
                return descriptor
        except BaseException:
            os.close(descriptor)
            raise
        finally:
            fresh.unlink(missing_ok=True)
        os.close(descriptor)
    raise UserError(f"{path}: could not lock {output}, other runs keep taking it; nothing was changed: try again")


def _release(path: Path, descriptor: int) -> None:
    try:
        if _is_at(os.fstat(descriptor), path):  # never a file this run did not put there
            os.unlink(path)
    finally:
        os.close(descriptor)


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output`` (``fcntl.flock`` on ``.<name>.lock`` beside it, which records the
    holder's pid and host) while the block runs; a second run is refused in one line naming the holder.

    The kernel releases a flock when its process dies, so the lock file a killed run leaves behind does not
    count: the next run takes it over. The file is removed when the block ends, and a file of that name that
    is not this project's lock is refused, never replaced or deleted. Re-entrant within a process (a stage
    locks its output before its checks, then again while it builds). Where no lock can be made (a file system
    without flock or hard links, no parent directory yet, a read-only one) the block runs unlocked."""
    path, descriptor = lock_path(output), None
    if str(path) not in _held:
        try:
            descriptor = _acquire(path, Path(output))
        except OSError:  # the write itself then says what is wrong, if anything
            descriptor = None
    if descriptor is None:
        yield
        return
    _held[str(path)] = descriptor
    try:
        yield
    finally:
        with signals_deferred():
            del _held[str(path)]
            _release(path, descriptor)


@contextmanager
def output_guard(output: Path) -> Iterator[None]:
    """What a command holds from its first look at ``output`` to its end: the lock (a second run is refused
    before it reads anything) and SIGTERM raising :class:`Interrupted`; an interrupt before the output was
    started is reported as such."""
    output = Path(output)
    existed = output.exists()
    with interruptible(), output_lock(output):
        try:
            yield
        except KeyboardInterrupt as error:
            if getattr(error, "described", False):
                raise
            raise interrupted(error, output, existed, started=False) from None


# -- building an output beside its place -------------------------------------------------------------------


@contextmanager
def staged_dir(output_dir: Path) -> Iterator[Path]:
    """A fresh temporary sibling to build ``output_dir`` in; renamed into place when the block finishes,
    removed when it raises (the previous ``output_dir`` is then untouched). Holds the output's lock; SIGTERM,
    Ctrl-C and a full disk end in one line saying what was kept."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with interruptible(), output_lock(output_dir):
        warn_leftover_partials(output_dir)
        existed = output_dir.exists()
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}{PARTIAL_MARK}", dir=output_dir.parent))
        try:
            with _unwinding(output_dir, existed, staging):
                yield staging
                raise_if_interrupted()
                with signals_deferred():
                    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output gets the usual mode
                    publish_dir(staging, output_dir)
        finally:
            with signals_deferred():
                shutil.rmtree(staging, ignore_errors=True)


def publish_dir(staging: Path, output_dir: Path) -> None:
    """Move a finished ``staging`` directory to ``output_dir``, replacing what is there.

    Two renames (the old output aside, the new one in), then the old one is deleted: a crash
    between them leaves the previous output whole under ``.<name>.replaced-<pid>``."""
    if output_dir.exists():
        aside = output_dir.with_name(f".{output_dir.name}.replaced-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        output_dir.rename(aside)
        try:
            staging.rename(output_dir)
        except OSError:
            aside.rename(output_dir)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        staging.rename(output_dir)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A temporary sibling to write ``path`` through; renamed over ``path`` when the block finishes, removed
    when it raises. Locked, interrupted and out of space like :func:`staged_dir`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with interruptible(), output_lock(path):
        existed = path.exists()
        handle, name = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_MARK}", dir=path.parent)
        os.close(handle)
        staging = Path(name)
        try:
            with _unwinding(path, existed, staging):
                yield staging
                raise_if_interrupted()
                with signals_deferred():
                    staging.chmod(0o666 & ~_umask())  # mkstemp makes it private; the output gets the usual mode
                    staging.replace(path)
        finally:
            staging.unlink(missing_ok=True)
