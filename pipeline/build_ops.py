"""Build the DeepSpeed ops the trainer loads, all at once, before a run starts.

DeepSpeed JIT-compiles its ops the first time a process loads them, one after another, while
every rank of the run waits: on a 2-core CPU machine FusedAdam took 55 s. Built here, in
parallel (one process per op) and possibly while the data stages run, they cost about the time
of the slowest one, and the trainer's ranks find them ready in ``TORCH_EXTENSIONS_DIR`` (``bin/env.sh`` sets it per checkout). Run it once per node
before a first launch; an op already built is only loaded.

    zh-build-ops            # the ops of this machine's accelerator (cuda, or cpu without a GPU)
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from data_tools.cli import option, run_stage
from data_tools.common import UserError

# What the trainer loads per accelerator: the optimizer of its DeepSpeed configs (``torch_adam:
# false``). Not the CPU shared-memory all-reduce DeepSpeed's comm layer would build: the trainer
# switches it off, training never calls it (pipeline.distributed.skip_shared_memory_inference_op).
OPS_PER_ACCELERATOR = {"cpu": ("FusedAdamBuilder",), "cuda": ("FusedAdamBuilder",)}


@dataclass(kw_only=True)
class BuildOpsConfig:
    """JIT-build the DeepSpeed ops the trainer needs, in parallel, into TORCH_EXTENSIONS_DIR."""

    ops: list[str] = option([], "Op builder names (e.g. FusedAdamBuilder); default: those the trainer loads "
                                "on this machine's accelerator.")


def _build(builder_name: str) -> tuple[str, float]:
    from deepspeed.accelerator import get_accelerator

    start = time.perf_counter()
    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or not builder.is_compatible(verbose=False):
        return f"{builder_name}: not available on this accelerator, skipped", 0.0
    builder.load(verbose=False)
    return f"{builder_name}: {builder.absolute_name()} ready", time.perf_counter() - start


def build_ops(config: BuildOpsConfig) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    names = config.ops or list(OPS_PER_ACCELERATOR.get(accelerator, ()))
    if not names:
        raise UserError(f"no default ops for accelerator {accelerator!r}; name them with --ops")
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        # the CPU accelerator answers an unknown name with a builder that only raises on load
        if builder is None or getattr(builder, "NAME", "") == "deepspeed_not_implemented":
            raise UserError(f"--ops {name}: DeepSpeed has no such op on the {accelerator} accelerator; "
                            f"the trainer's are {', '.join(OPS_PER_ACCELERATOR.get(accelerator, ())) or 'none known'}")
    with ProcessPoolExecutor(max_workers=len(names)) as pool:
        for message, seconds in pool.map(_build, names):
            print(f"build-ops: {message} ({seconds:.0f} s)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run_stage(build_ops, BuildOpsConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
