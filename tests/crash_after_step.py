"""Runs ``pipeline.trainer`` and crashes the whole job, as a lost node or ``kill -9`` would, at a
deterministic point: right after rank 0 wrote the metrics record of step ``ZH_CRASH_AFTER_STEP``,
it SIGKILLs its process group (the launcher, every rank and their data workers). The other ranks
cannot pass that step's next collective without rank 0, so no later step or checkpoint exists,
however fast the device is (polling the log from outside let a GPU finish the run first).

    ZH_CRASH_AFTER_STEP=6 deepspeed --num_gpus 2 tests/crash_after_step.py <zh-train flags>
"""

from __future__ import annotations

import os
import signal
import sys

import pipeline.metrics as metrics
from pipeline.trainer import main

_original_append = metrics.MetricsLog.append


def _append_then_crash(self, record: dict) -> None:
    _original_append(self, record)
    # Every rank calls append and only rank 0's log is enabled: a crash from another rank could come
    # before rank 0 has written the step's record.
    if self.enabled and "loss" in record and record["step"] == int(os.environ["ZH_CRASH_AFTER_STEP"]):
        print(f"crash after step {record['step']}: killing process group {os.getpgid(0)}", file=sys.stderr,
              flush=True)
        os.killpg(os.getpgid(0), signal.SIGKILL)


metrics.MetricsLog.append = _append_then_crash

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
