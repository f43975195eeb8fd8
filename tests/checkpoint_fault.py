"""Runs ``pipeline.trainer`` with a fault injected into checkpointing: on the Nth checkpoint
(``ZH_FAULT_KILL_AT_SAVE=N``), rank ``ZH_FAULT_RANK`` (default 1) SIGKILLs itself right after
DeepSpeed wrote its files and before the checkpoint is marked complete, as a node lost in the
middle of a save would. The launcher then takes the other ranks down.

    deepspeed --num_gpus 2 tests/checkpoint_fault.py <zh-train flags>
"""

from __future__ import annotations

import os
import signal
import sys

import pipeline.checkpointing as checkpointing
from pipeline.trainer import main

_saves = {"count": 0}
_original_rng_state = checkpointing.rng_state


def _rng_state_then_die(accelerator):  # called by save_checkpoint after engine.save_checkpoint
    _saves["count"] += 1
    rank = int(os.environ.get("RANK", "0"))
    if _saves["count"] == int(os.environ["ZH_FAULT_KILL_AT_SAVE"]) and rank == int(os.environ.get("ZH_FAULT_RANK", "1")):
        print(f"checkpoint fault: rank {rank} killed during checkpoint {_saves['count']}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return _original_rng_state(accelerator)


checkpointing.rng_state = _rng_state_then_die

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
