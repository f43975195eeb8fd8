"""Random numbers for masking: SplitMix64 streams inside the compiled kernels, keyed by integers.

A numpy ``Generator`` costs ~20 microseconds to seed (SeedSequence hashing) and about a
microsecond per call from a kernel's Python wrapper, while BART's noising of a 512-token chunk
has to fit in ~20 microseconds in all. So the kernels carry their own generator: SplitMix64
(Steele, Lea & Flood, OOPSLA 2014; Java's ``SplittableRandom``), 64 bits of state, one add, two
multiplies and three xor-shifts per number, which passes BigCrush. A stream's starting state is
a hash of integer keys (seed, pass, document, chunk), so what a chunk draws never depends on
how documents are split across workers, and a kernel and its pure-Python twin draw the same
numbers (numpy's uint64 arithmetic wraps exactly like the compiled code's).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from data_tools.compiled import kernel

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: the Weyl increment
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SHIFT_30, _SHIFT_27, _SHIFT_31, _SHIFT_11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_TO_MINUS_53 = 1.0 / (1 << 53)
_MASK64 = (1 << 64) - 1


@kernel
def next_u64(state: np.ndarray) -> np.uint64:
    """The next 64 random bits of the stream whose state is ``state[0]`` (advanced in place)."""
    s = state[0] + _GOLDEN
    state[0] = s
    z = (s ^ (s >> _SHIFT_30)) * _MIX1
    z = (z ^ (z >> _SHIFT_27)) * _MIX2
    return z ^ (z >> _SHIFT_31)


@kernel
def uniform(state: np.ndarray) -> float:
    """A float in [0, 1) with 53 random bits."""
    return float(next_u64(state) >> _SHIFT_11) * _TWO_TO_MINUS_53


@kernel
def below(state: np.ndarray, n: int) -> int:
    """An int in [0, n), n >= 1: floor(u * n), biased by less than n / 2**53."""
    return min(int(uniform(state) * n), n - 1)


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_key(*parts: int) -> int:
    """A 64-bit starting state hashed from non-negative integer keys (each through SplitMix64's finalizer)."""
    key = 0
    for part in parts:
        key = _mix64(((key ^ (part & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64)
    return key


@kernel
def _mix64_kernel(z: np.uint64) -> np.uint64:
    z = (z ^ (z >> _SHIFT_30)) * _MIX1
    z = (z ^ (z >> _SHIFT_27)) * _MIX2
    return z ^ (z >> _SHIFT_31)


@kernel
def stream_key_kernel(seed: np.ndarray, document: int, stream: int) -> np.uint64:
    """:func:`stream_key` of (*seed, document, stream) inside a kernel (``seed``: a uint64 array)."""
    key = np.uint64(0)
    for part in seed:
        key = _mix64_kernel((key ^ part) + _GOLDEN)
    key = _mix64_kernel((key ^ np.uint64(document)) + _GOLDEN)
    return _mix64_kernel((key ^ np.uint64(stream)) + _GOLDEN)


class LazyGenerator:
    """A ``numpy.random.Generator`` seeded on first use, plus kernel streams keyed by the same seed.

    Seeding numpy costs ~20 microseconds, as much as masking a chunk with the compiled kernels;
    PEGASUS's recipe ([MASK] gaps at principal sentences) never draws, and BART's kernels draw
    from their own streams (:meth:`kernel_stream`), so numpy is only seeded when something asks it
    for numbers. Those are the numbers of ``default_rng(seed)``.
    """

    __slots__ = ("_seed", "_generator", "_streams")

    def __init__(self, seed: list[int]) -> None:
        self._seed = seed
        self._generator: np.random.Generator | None = None
        self._streams = 0

    def kernel_stream(self) -> int:
        """The starting state of a new kernel stream: the seed and how many streams came before."""
        self._streams += 1
        return stream_key(*self._seed, self._streams)

    def __getattr__(self, name: str):
        if self._generator is None:
            self._generator = np.random.default_rng(self._seed)
        return getattr(self._generator, name)


def kernel_state(rng: np.random.Generator | LazyGenerator) -> np.ndarray:
    """A one-element uint64 state for a kernel: a new stream of a :class:`LazyGenerator`, or
    64 bits drawn from any other numpy generator (so an explicit generator still decides everything)."""
    stream = getattr(rng, "kernel_stream", None)
    key = stream() if stream is not None else int(rng.integers(0, 1 << 64, dtype=np.uint64))
    return np.array([key], dtype=np.uint64)


@contextlib.contextmanager
def wrapping_arithmetic(compiled: bool) -> Iterator[None]:
    """Run a kernel's Python twin without numpy's scalar overflow warnings: SplitMix64 wraps on purpose."""
    if compiled:
        yield
        return
    with np.errstate(over="ignore"):
        yield
