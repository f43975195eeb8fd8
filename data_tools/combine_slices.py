"""clean-combine: merge the outputs of independent clean jobs (``--num_slices``) into one.

Each slice deduplicates only within itself; the combine pass streams every slice's
documents in slice order, drops exact duplicates across slices (counted as
``duplicate``), writes fresh shards and a manifest whose counts are the slices' sums,
so ``kept + dropped == read`` still holds for the whole corpus.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data_tools.clean import STAGE, ShardedJsonlWriter
from data_tools.cli import config_to_dict, option, required, run_stage
from data_tools.common import UserError, write_json_atomic
from data_tools.outputs import overwrite_option, staged_dir
from data_tools.shards import check_stage_output, load_manifest, shard_paths


@dataclass(kw_only=True)
class CombineConfig:
    """Merge clean outputs of several slices into one clean output directory."""

    input_dirs: list[Path] = required("Output directories of the clean jobs, one per slice.")
    output_dir: Path = required("Directory for the combined documents-NNNNN.jsonl shards and manifest.json.")
    deduplicate: bool = option(True, "Drop exact duplicates across slices (duplicate).")
    documents_per_shard: int = option(100_000, "Documents per output shard.")
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        self.input_dirs = [Path(p) for p in self.input_dirs]
        self.output_dir = Path(self.output_dir)
        if self.documents_per_shard <= 0:
            raise UserError(f"--documents_per_shard {self.documents_per_shard} must be positive")


def combine(config: CombineConfig) -> dict:
    manifests = [load_manifest(directory, STAGE) for directory in config.input_dirs]
    slices = sorted((m["config"].get("slice_index", 0), d, m) for d, m in zip(config.input_dirs, manifests))
    indices = [index for index, _, _ in slices]
    if len(set(indices)) != len(indices):
        raise UserError(f"two inputs are the same slice ({indices}); pass each slice's directory once")
    check_stage_output(config.output_dir, STAGE, "documents", config.overwrite, {"--input_dirs": config.input_dirs})
    with staged_dir(config.output_dir) as staging:
        manifest = _combine_into(staging, slices, config)
    print(f"clean-combine: {len(slices)} slices, {manifest['counts']['documents_read']} read, "
          f"{manifest['counts']['documents_kept']} kept -> {config.output_dir}", file=sys.stderr)
    return manifest


def _combine_into(staging: Path, slices: list[tuple[int, Path, dict]], config: CombineConfig) -> dict:
    counts: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    for _, _, manifest in slices:
        for key in ("documents_read", "characters_read", "bytes_read", "documents_with_invalid_utf8_replaced"):
            counts[key] += manifest["counts"].get(key, 0)
        dropped.update(manifest["counts"]["documents_dropped"])
    writer = ShardedJsonlWriter(staging, config.documents_per_shard)
    seen: set[bytes] = set()
    kept = chars_kept = 0
    for _, directory, manifest in slices:
        for path in shard_paths(directory, manifest):
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    text = json.loads(line)["text"]  # the shard's sha256 was checked against its manifest
                    if config.deduplicate:
                        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=12).digest()
                        if digest in seen:
                            dropped["duplicate"] += 1
                            continue
                        seen.add(digest)
                    writer.write(text)
                    kept += 1
                    chars_kept += len(text)
    shards = writer.close()
    if kept + sum(dropped.values()) != counts["documents_read"]:
        raise UserError("the slices' manifests do not add up (kept + dropped != read); re-run the slices")
    manifest = {
        "stage": STAGE,
        "config": {**config_to_dict(config), "combined_slices": [str(d) for _, d, _ in slices]},
        "counts": {
            "documents_read": counts["documents_read"],
            "documents_kept": kept,
            "documents_dropped": dict(sorted(dropped.items())),
            "characters_read": counts["characters_read"],
            "characters_kept": chars_kept,
            "bytes_read": counts["bytes_read"],
            "documents_with_invalid_utf8_replaced": counts["documents_with_invalid_utf8_replaced"],
        },
        "inputs": [entry for _, _, m in slices for entry in m["inputs"]],
        # Every slice lists the same skipped files (they are found before the files are sliced).
        "skipped_inputs": sorted({path for _, _, m in slices for path in m.get("skipped_inputs", [])}),
        "shards": shards,
    }
    write_json_atomic(staging / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    return run_stage(combine, CombineConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
