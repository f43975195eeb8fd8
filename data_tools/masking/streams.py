"""Random numbers for masking, and the one way they are keyed: by (seed, pass, document[, chunk]).

A numpy ``Generator`` costs ~20 microseconds to seed (SeedSequence hashing) and about a
microsecond per call from a kernel's Python wrapper, while BART's noising of a 512-token chunk
has to fit in ~20 microseconds in all. So the kernels carry their own generator: SplitMix64
(Steele, Lea & Flood, OOPSLA 2014; Java's ``SplittableRandom``), 64 bits of state, one add, two
multiplies and three xor-shifts per number, which passes BigCrush. A stream's starting state is
a hash of integer keys, so what a chunk draws never depends on how documents are split across
workers, and a kernel and its pure-Python twin draw the same numbers (numpy's uint64 arithmetic
wraps exactly like the compiled code's). Every recipe draws from these streams only: BART's noise,
PEGASUS's random gap sentences and mixed gap actions alike.
"""

from __future__ import annotations

import numpy as np

from data_tools.compiled import COMPILED, kernel, run_kernel

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: the Weyl increment
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SHIFT_30, _SHIFT_27, _SHIFT_31, _SHIFT_11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_TO_MINUS_53 = 1.0 / (1 << 53)


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


@kernel
def choose_sorted(state: np.ndarray, population: int, count: int) -> np.ndarray:
    """``count`` distinct values of range(population), uniformly, in increasing order (Floyd's
    algorithm: ``count`` draws, then one pass over a bitmap instead of a sort)."""
    chosen = np.zeros(population, np.bool_)
    for j in range(population - count, population):
        t = below(state, j + 1)
        chosen[j if chosen[t] else t] = True
    values = np.empty(count, np.int64)
    filled = 0
    for value in range(population):
        if chosen[value]:
            values[filled] = value
            filled += 1
    return values


@kernel
def absorb_key(key: np.uint64, part: np.uint64) -> np.uint64:
    """The key extended by one more integer part (through SplitMix64's finalizer), so that
    ``absorb_key(stream_key(*parts), p) == stream_key(*parts, p)``: a block kernel extends a pass's
    key by each document and chunk without rebuilding it."""
    z = (key ^ part) + _GOLDEN
    z = (z ^ (z >> _SHIFT_30)) * _MIX1
    z = (z ^ (z >> _SHIFT_27)) * _MIX2
    return z ^ (z >> _SHIFT_31)


@kernel
def _fold_key(parts: np.ndarray) -> np.uint64:
    key = np.uint64(0)
    for part in parts:
        key = absorb_key(np.uint64(key), part)
    return key


def stream_key(*parts: int) -> int:
    """The 64-bit starting state of the stream keyed by non-negative integers."""
    return int(run_kernel(_fold_key, COMPILED, np.array(parts, dtype=np.uint64)))


class Randomness:
    """The random numbers of one masking key: kernel streams, the n-th (from 1) starting at
    ``stream_key(*key, n)``."""

    __slots__ = ("key", "_streams")

    def __init__(self, key: tuple[int, ...]) -> None:
        self.key = key
        self._streams = 0

    def next_kernel_state(self) -> np.ndarray:
        """A one-element uint64 state for a kernel: the next stream of this key."""
        self._streams += 1
        return np.array([stream_key(*self.key, self._streams)], dtype=np.uint64)


def masking_randomness(seed: int, pass_index: int, document: int, chunk: int | None = None) -> Randomness:
    """Where masking's random numbers come from, for the mask stage and online masking alike.

    The mask stage keys one document of one pass (``chunk`` None): chunk c of it (its number in
    the document, chunks left out counted) draws from kernel stream c + 1 (the block kernels derive
    that key themselves, with :func:`absorb_key`). Online masking (pass = epoch) keys each chunk
    apart, so example i is rebuilt without masking the chunks before it. Both layouts are those of
    the published outputs: changing either changes every example.
    """
    return Randomness((seed, pass_index, document) if chunk is None else (seed, pass_index, document, chunk))
