"""Runs ``pipeline.trainer`` and signals the whole job, as Slurm at the time limit or Ctrl-C in a terminal
would, at a deterministic point: right after rank 0 wrote the metrics record of step ``ZH_SIGNAL_AFTER_STEP``,
it sends ``ZH_SIGNAL`` (TERM or INT) to its process group (the launcher, every rank and their data workers).

    ZH_SIGNAL=TERM ZH_SIGNAL_AFTER_STEP=5 deepspeed --num_gpus 2 tests/signal_after_step.py <zh-train flags>
"""

from __future__ import annotations

import os
import signal
import sys

import pipeline.metrics as metrics
from pipeline.trainer import main

_original_append = metrics.MetricsLog.append


def _append_then_signal(self, record: dict) -> None:
    _original_append(self, record)
    # Only rank 0's log is enabled: the signal leaves after its record is written, whatever the device's speed.
    if self.enabled and "loss" in record and record["step"] == int(os.environ["ZH_SIGNAL_AFTER_STEP"]):
        number = signal.Signals[f"SIG{os.environ['ZH_SIGNAL']}"]
        print(f"signal after step {record['step']}: {number.name} to process group {os.getpgid(0)}", file=sys.stderr,
              flush=True)
        os.killpg(os.getpgid(0), number)


metrics.MetricsLog.append = _append_then_signal

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
