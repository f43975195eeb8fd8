"""zh-build-ops builds (or loads) the DeepSpeed ops the CPU trainer uses, in parallel, where the trainer finds them."""

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROJECT_ROOT, deepspeed_env, run_command


def test_build_ops_makes_the_trainers_ops_ready_in_the_extensions_dir():
    env = deepspeed_env()
    result = run_command([sys.executable, "-m", "pipeline.build_ops"], env=env, cwd=PROJECT_ROOT)
    lines = [line for line in result.stderr.splitlines() if line.startswith("build-ops:")]
    # FusedAdam only: the trainer keeps DeepSpeed from building its inference-only shared-memory all-reduce
    assert len(lines) == 1 and " ready (" in lines[0] and "fused_adam" in lines[0], result.stderr
    built = {path.name for path in Path(env["TORCH_EXTENSIONS_DIR"]).iterdir() if path.is_dir()}
    assert "fused_adam" in built, built


def test_an_unknown_op_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "pipeline.build_ops", "--ops", "NoSuchBuilder"],
                            env=deepspeed_env(), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("build_ops.py: error: --ops NoSuchBuilder: DeepSpeed has no such op")
    assert "Traceback" not in result.stderr


def test_a_stale_build_lock_is_named(tmp_path, monkeypatch, capsys):
    from pipeline.distributed import warn_stale_extension_locks

    for lock in (tmp_path / "fused_adam" / "lock", tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"):
        lock.parent.mkdir(parents=True)
        lock.touch()
        os.utime(lock, (0, 0))  # as old as it gets
    (tmp_path / "fresh_op").mkdir()
    (tmp_path / "fresh_op" / "lock").touch()  # a build running now
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    warn_stale_extension_locks()
    err = capsys.readouterr().err
    assert "fused_adam/lock" in err and "deepspeed_shm_comm/lock" in err and "fresh_op" not in err
