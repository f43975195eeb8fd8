"""Runs ``pipeline.trainer`` with torch.distributed's collectives wrapped: a tensor that is not
on the accelerator's device type fails the run at once (NCCL would refuse it on a GPU;
gloo on CPU ranks accepts anything, so the check has to be ours). At exit each rank prints
how many tensors it checked per collective, so a test can see the trainer's own calls ran.

    deepspeed --num_gpus 2 tests/collective_guard.py <zh-train flags>
"""

from __future__ import annotations

import atexit
import collections
import functools
import os
import sys

import torch
import torch.distributed as dist

CHECKED: collections.Counter = collections.Counter()


def _guard(name: str, collective):
    @functools.wraps(collective)
    def guarded(*args, **kwargs):
        from deepspeed.accelerator import get_accelerator

        expected = get_accelerator().device_name()
        for value in list(args) + list(kwargs.values()):
            for tensor in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(tensor, torch.Tensor):
                    if tensor.device.type != expected:
                        raise RuntimeError(f"collective guard: {name} got a {tensor.dtype} tensor on {tensor.device}; "
                                           f"the engine's device is {expected}")
                    CHECKED[f"{name}:{tensor.dtype}"] += 1
        return collective(*args, **kwargs)

    return guarded


for _name in ("all_reduce", "all_gather", "broadcast", "reduce", "reduce_scatter", "all_gather_into_tensor",
              "reduce_scatter_tensor"):
    setattr(dist, _name, _guard(_name, getattr(dist, _name)))

atexit.register(lambda: print(f"collective guard rank {os.environ.get('RANK', '0')}: {dict(CHECKED)}",
                              file=sys.stderr, flush=True))

if __name__ == "__main__":
    from pipeline.trainer import main

    sys.exit(main(sys.argv[1:]))
