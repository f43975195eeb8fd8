"""Records what each launched rank sees, then runs ``pipeline.trainer``: the multi-node test
checks that every rank got the variables bin/train.sh forwards.

    RANK_ENV_DIR=<dir> deepspeed --hostfile H tests/rank_env_probe.py <zh-train flags>
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

if __name__ == "__main__":
    from pipeline.trainer import main

    seen = {"rank": os.environ.get("RANK"), "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR"),
            "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"), "ninja": shutil.which("ninja"),
            "HOME": os.environ.get("HOME")}
    Path(os.environ["RANK_ENV_DIR"], f"rank{seen['rank']}.json").write_text(json.dumps(seen))
    sys.exit(main())
