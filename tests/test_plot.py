"""zh-plot: loss.png from a run's metrics.jsonl, refused in one line without metrics."""

from __future__ import annotations

import json

import pytest

from pipeline.plot import main, read_series


def write_metrics(run_dir):
    run_dir.mkdir()
    records = [{"step": s, "loss": 8.0 - s / 10, "tokens_per_s": 1000.0 + s} for s in range(1, 21)]
    records += [{"step": 10, "eval_loss": 7.5, "eval_tokens": 100}, {"step": 20, "eval_loss": 6.9, "eval_tokens": 100}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_plot_writes_a_png_of_the_train_and_eval_curves(tmp_path):
    pytest.importorskip("matplotlib", reason="zh-plot needs matplotlib (the plot extra)")
    run_dir = tmp_path / "run"
    write_metrics(run_dir)
    series = read_series(run_dir / "metrics.jsonl")
    assert len(series["loss"]) == 20 and series["eval_loss"] == [(10, 7.5), (20, 6.9)]
    assert main(["--run_dir", str(run_dir)]) == 0
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--run_dir", str(run_dir)]) == 0  # its own picture is replaced
    (tmp_path / "mine.png").write_bytes(b"mine")
    assert main(["--run_dir", str(run_dir), "--output", str(tmp_path / "mine.png")]) == 2  # not its own
    assert (tmp_path / "mine.png").read_bytes() == b"mine"


def test_a_run_without_metrics_is_one_line(tmp_path, capsys):
    assert main(["--run_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl not found" in err[0]
