"""What recording and checking checkpoint digests costs, against writing the checkpoint itself.

A checkpoint is marked complete with the sha256 of each of its files (each rank hashes the files it
wrote) and hashed again before a resume or an export. This times, on one core, ``torch.save`` of a
state of fp32 tensors (the peer: the save the trainer does anyway) and ``file_sha256`` of the file
it wrote, right after the save (page cache warm, as when the digests are recorded) and after the
file was dropped from the page cache where the OS lets us (as a resume days later reads it), then
gives the seconds per checkpoint for the packaged model configs at their ZeRO-2 sizes per rank.

    python -m bench.checkpoint_digest [--quick]

Prints a table, then one JSON object per figure: checkpoint_sha256_gb_per_s (warm),
checkpoint_sha256_cold_gb_per_s, checkpoint_save_gb_per_s, save_vs_save_and_digest (save time over
save plus digest time: 1.0 would be free), and digest_seconds_per_rank_<config> for the base configs
on 8 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from data_tools.common import file_sha256

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# ZeRO-2 with bf16 (ds_configs/zero2_bf16.json): rank 0 writes the bf16 weights (2 bytes a parameter),
# every rank its partition of the fp32 master weights and Adam's two moments (12 bytes a parameter / ranks).
MODEL_BYTES_PER_PARAMETER, OPTIMIZER_BYTES_PER_PARAMETER = 2, 12
RANKS = 8


def parameters_of(config_name: str) -> int:
    """The parameter count of a packaged model config with Google's Chinese vocab (21,128 tokens)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    values = json.loads((PROJECT_ROOT / "pipeline" / "model_configs" / f"{config_name}.json").read_text())
    values["vocab_size"] = 21128
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
    return sum(parameter.numel() for parameter in {id(p): p for p in model.parameters()}.values())


def drop_from_page_cache(path: Path) -> bool:
    """Ask the OS to forget the file's cached pages (Linux); False where it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def best_of(repeats: int, function) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint_digest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 256 MB state instead of 1 GB, one repeat")
    args = parser.parse_args()
    torch.set_num_threads(1)
    megabytes = 256 if args.quick else 1024
    repeats = 1 if args.quick else 3
    state = {f"tensor{index}": torch.randn(megabytes * (1 << 20) // 4 // 16) for index in range(16)}
    with tempfile.TemporaryDirectory(prefix=".bench-checkpoint-", dir=PROJECT_ROOT) as work:
        path = Path(work) / "optimizer_states.pt"
        save_seconds = best_of(repeats, lambda: torch.save(state, path))
        size = path.stat().st_size
        warm_seconds = best_of(repeats, lambda: file_sha256(path))
        cold = []
        for _ in range(repeats):
            if not drop_from_page_cache(path):
                break
            cold.append(best_of(1, lambda: file_sha256(path)))
        cold_seconds = min(cold) if cold else float("nan")
    gigabytes = size / 1e9
    print(f"state of {gigabytes:.2f} GB, one core, best of {repeats}")
    print(f"{'':34s} {'seconds':>8s} {'GB/s':>6s}")
    for name, seconds in (("torch.save (the peer)", save_seconds), ("sha256, page cache warm", warm_seconds),
                          ("sha256, after dropping the cache", cold_seconds)):
        print(f"{name:34s} {seconds:8.3f} {gigabytes / seconds:6.2f}")
    per_rank = {}
    print(f"\nper checkpoint, ZeRO-2 bf16 on {RANKS} ranks (rank 0 writes the weights too), warm speed:")
    for name in ("bart-base", "pegasus-base"):
        parameters = parameters_of(name)
        rank0_bytes = parameters * (MODEL_BYTES_PER_PARAMETER + OPTIMIZER_BYTES_PER_PARAMETER / RANKS)
        per_rank[name] = rank0_bytes / 1e9 / (gigabytes / warm_seconds)
        print(f"  {name}: {parameters / 1e6:.0f} M parameters, rank 0 writes {rank0_bytes / 1e9:.2f} GB, "
              f"digests {per_rank[name]:.2f} s")
    figures = [
        {"metric": "checkpoint_sha256_gb_per_s", "value": round(gigabytes / warm_seconds, 3), "unit": "GB/s"},
        {"metric": "checkpoint_sha256_cold_gb_per_s", "value": round(gigabytes / cold_seconds, 3), "unit": "GB/s"},
        {"metric": "checkpoint_save_gb_per_s", "value": round(gigabytes / save_seconds, 3), "unit": "GB/s"},
        {"metric": "save_vs_save_and_digest", "value": round(save_seconds / (save_seconds + warm_seconds), 3),
         "unit": "ratio"},
        *({"metric": f"digest_seconds_per_rank_{name.replace('-', '_')}", "value": round(seconds, 3), "unit": "s"}
          for name, seconds in per_rank.items()),
    ]
    for figure in figures:
        print(json.dumps(figure))


if __name__ == "__main__":
    main()
