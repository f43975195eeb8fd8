"""How to compile the data stages' hot loops: numba against a C++ extension, measured.

The kernel is PEGASUS's principal sentence selection (``pegasus_paper``'s independent mode:
ROUGE-1 of each sentence against the rest of its 512-token CLUECorpusSmall chunk, Google's
vocab), run by numba (the mask stage's ``@njit(cache=True)`` kernel), against the same loop in
C++ built with ``torch.utils.cpp_extension.load_inline`` (g++ and ninja, as DeepSpeed builds its
ops) and the same kernel run by the Python interpreter (the fallback without numba). Every
mechanism must select the same sentences.

    python -m bench.kernel_mechanisms [--quick]

Prints a table (time per chunk; first use from a cold and a warm cache, each in a fresh
process), then one JSON object per figure: principal_numba_us_per_chunk,
principal_numba_wrapped_us_per_chunk, principal_cpp_us_per_chunk, principal_python_us_per_chunk,
numba_speed_vs_cpp, numba_first_use_cold_s, cpp_first_use_cold_s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED = PROJECT_ROOT.parent / "shared" / "data"

CPP_SOURCE = r"""
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <vector>
#include <algorithm>
namespace py = pybind11;

// Independent-mode principal sentences: the `count` highest ROUGE-1 F1 (multiset) scores of
// each sentence against the rest of the chunk, earliest first among equal scores.
std::vector<int64_t> principal(py::array_t<int64_t> flat_array, py::array_t<int64_t> offsets_array, int64_t count) {
  auto flat = flat_array.unchecked<1>();
  auto offsets = offsets_array.unchecked<1>();
  const int64_t n = offsets.shape(0) - 1, length = flat.shape(0);
  int64_t vocab = 1;
  for (int64_t k = 0; k < length; ++k) vocab = std::max(vocab, flat(k) + 1);
  static std::vector<int64_t> total, own;
  if ((int64_t)total.size() < vocab) { total.assign(vocab, 0); own.assign(vocab, 0); }
  for (int64_t k = 0; k < length; ++k) total[flat(k)] += 1;
  std::vector<double> scores(n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = offsets(i); k < offsets(i + 1); ++k) own[flat(k)] += 1;
    int64_t overlap = 0, candidate = 0;
    for (int64_t k = offsets(i); k < offsets(i + 1); ++k) {
      int64_t t = flat(k), c = own[t];
      if (c <= 0) continue;
      candidate += c;
      overlap += std::min(c, total[t] - c);
      own[t] = -c;
    }
    int64_t reference = length - (offsets(i + 1) - offsets(i));
    scores[i] = (overlap == 0 || candidate + reference == 0) ? 0.0 : (2.0 * overlap) / (candidate + reference);
    for (int64_t k = offsets(i); k < offsets(i + 1); ++k) own[flat(k)] = 0;
  }
  for (int64_t k = 0; k < length; ++k) total[flat(k)] = 0;
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });
  order.resize(std::min(count, n));
  std::sort(order.begin(), order.end());
  return order;
}
"""
CPP_BINDING = "m.def(\"principal\", &principal);"


def build_cpp(build_dir: Path):
    from torch.utils.cpp_extension import load_inline

    return load_inline("zh_bench_principal", cpp_sources=CPP_SOURCE + "\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {"
                       + CPP_BINDING + "}", functions=None, extra_cflags=["-O3"], build_directory=str(build_dir),
                       verbose=False)


def load_chunks(quick: bool):
    from tests.masking_reference import flatten_sentences, pack_sentences
    from data_tools.wordpiece import BertWordPieceEncoder

    vocab = SHARED / "google_zh_vocab.txt"
    corpus = SHARED / "CLUECorpusSmall_sampled.txt"
    if not (vocab.is_file() and corpus.is_file()):
        raise SystemExit(f"bench/kernel_mechanisms.py needs {vocab} and {corpus} (../shared/data beside the project)")
    encoder = BertWordPieceEncoder(vocab)
    chunks = []
    for line in corpus.read_text(encoding="utf-8").splitlines()[: 400 if quick else None]:
        flat, lengths = encoder.encode_document(line)
        bounds = [0, *lengths.cumsum().tolist()]
        sentences = [flat[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
        for chunk in pack_sentences(sentences, 510):
            if len(chunk) >= 2:
                chunks.append((*flatten_sentences(chunk), max(1, round(len(chunk) * 0.3))))
    return chunks


def first_use_seconds(code: str, env: dict) -> float:
    """Seconds a fresh process takes to run ``code`` (imports included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=PROJECT_ROOT)
    return time.perf_counter() - start


def time_calls(function, chunks, repeats: int) -> tuple[float, list]:
    best, results = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        results = [function(flat, offsets, count) for flat, offsets, count in chunks]
        best = min(best, time.perf_counter() - start)
    return best / len(chunks), results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_mechanisms", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="400 documents, one repeat")
    args = parser.parse_args()
    from data_tools.compiled import COMPILED
    import numpy as np

    from data_tools.masking.pegasus import principal_sentences, rank_principal as _principal_sentences

    if not COMPILED:
        raise SystemExit("bench/kernel_mechanisms.py needs numba (the data extra)")
    chunks = load_chunks(args.quick)
    repeats = 1 if args.quick else 3
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "NUMBA_CACHE_DIR": str(Path(scratch) / "numba")}
        numba_code = ("import numpy as np; from data_tools.masking.pegasus import principal_sentences; "
                      "principal_sentences(np.arange(4), np.array([0, 2, 4]), 1, False, False)")
        numba_cold, numba_warm = first_use_seconds(numba_code, env), first_use_seconds(numba_code, env)
        # Run from the project root (first_use_seconds' cwd), so `bench` is importable.
        cpp_code = (f"from bench.kernel_mechanisms import build_cpp; from pathlib import Path; "
                    f"build_cpp(Path({scratch!r}))")
        cpp_cold, cpp_warm = first_use_seconds(cpp_code, env), first_use_seconds(cpp_code, env)
        cpp = build_cpp(Path(scratch))

        principal_sentences(*chunks[0][:2], chunks[0][2], False, False)  # warm (kernel loaded)
        numba_seconds, numba_out = time_calls(
            lambda f, o, c: principal_sentences(f, o, c, False, False, compiled=True), chunks, repeats)
        scratch_counts = (np.zeros(1 << 15, np.int64), np.zeros(1 << 15, np.int64))
        raw_seconds, _ = time_calls(  # the jitted function alone, as the C++ one is timed
            lambda f, o, c: _principal_sentences(f, o, c, False, False, *scratch_counts), chunks, repeats)
        cpp_seconds, cpp_out = time_calls(lambda f, o, c: cpp.principal(f, o, c), chunks, repeats)
        python_seconds, python_out = time_calls(
            lambda f, o, c: principal_sentences(f, o, c, False, False, compiled=False), chunks[:300], 1)
    if numba_out != [list(x) for x in cpp_out] or python_out != numba_out[:300]:
        raise SystemExit("the mechanisms selected different sentences")

    tokens = sum(len(flat) for flat, _, _ in chunks) / len(chunks)
    print(f"{len(chunks)} chunks of ~{tokens:.0f} tokens (CLUECorpusSmall, Google vocab), one core, best of {repeats}")
    print(f"{'mechanism':28s} {'us/chunk':>9s} {'chunks/s':>10s} {'first use: cold':>16s} {'warm':>6s}")
    for name, seconds, cold, warm in (("numba (njit, cache)", raw_seconds, numba_cold, numba_warm),
                                      ("numba + its Python wrapper", numba_seconds, None, None),
                                      ("C++ (cpp_extension, -O3)", cpp_seconds, cpp_cold, cpp_warm),
                                      ("Python (same code, lists)", python_seconds, None, None)):
        first = f"{cold:15.1f}s {warm:5.1f}s" if cold is not None else f"{'-':>16s} {'-':>6s}"
        print(f"{name:28s} {seconds * 1e6:9.1f} {1 / seconds:10.0f} {first}")
    print("first use = a fresh process importing and running the kernel once (interpreter start included); "
          "the C++ build needs g++ and ninja on the machine, numba only its wheel")
    for figure in (
        {"metric": "principal_numba_us_per_chunk", "value": round(raw_seconds * 1e6, 2), "unit": "us"},
        {"metric": "principal_numba_wrapped_us_per_chunk", "value": round(numba_seconds * 1e6, 2), "unit": "us"},
        {"metric": "principal_cpp_us_per_chunk", "value": round(cpp_seconds * 1e6, 2), "unit": "us"},
        {"metric": "principal_python_us_per_chunk", "value": round(python_seconds * 1e6, 2), "unit": "us"},
        {"metric": "numba_speed_vs_cpp", "value": round(cpp_seconds / raw_seconds, 2), "unit": "x"},
        {"metric": "numba_first_use_cold_s", "value": round(numba_cold, 2), "unit": "s"},
        {"metric": "cpp_first_use_cold_s", "value": round(cpp_cold, 2), "unit": "s"},
    ):
        print(json.dumps(figure))


if __name__ == "__main__":
    main()
