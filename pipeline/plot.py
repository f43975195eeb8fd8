"""plot: a training run's curves as one picture, ``loss.png``: train and eval loss against the
step, and throughput (tokens/s), from the run's ``metrics.jsonl``.

The trainer writes it at the end of training when matplotlib is installed; ``zh-plot RUN_DIR``
draws it any time, also while the run is going.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from data_tools.cli import option, required, run_stage
from data_tools.common import UserError
from data_tools.outputs import check_apart, check_replaceable_file, overwrite_option, staged_file

PLOT_FILE = "loss.png"


@dataclass(kw_only=True)
class PlotConfig:
    """Draw a run's train/eval loss and tokens/s against the step into a PNG."""

    run_dir: Path = required("The training run's --output_dir (holds metrics.jsonl).")
    output: Path | None = option(None, "PNG to write; default RUN_DIR/loss.png (replaced on every call).")
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.output = Path(self.output) if self.output is not None else self.run_dir / PLOT_FILE


def read_series(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of the train loss, eval loss and tokens/s; a line that is not a record
    with a whole-number step stops with its number (a plot of misread steps would mislead)."""
    series: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": [], "tokens_per_s": []}
    try:
        lines = metrics_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UserError(f"{metrics_file}: not UTF-8 text ({error.reason} at byte {error.start}); it is not a "
                        "metrics.jsonl the trainer wrote") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise UserError(f"{metrics_file}:{number}: not a JSON record ({error})") from error
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(step, int) or isinstance(step, bool):
            raise UserError(f"{metrics_file}:{number}: not a metrics record (a JSON object with a whole-number "
                            "\"step\"); remove the line or pass the run's own metrics.jsonl")
        for key in series:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series[key].append((step, float(value)))
    return series


def plot_run(run_dir: Path, output: Path) -> Path:
    """Write the picture through a temporary file; a clear error when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on cluster nodes
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise UserError("the loss plot needs matplotlib: pip install matplotlib (the project's 'plot' extra)") \
            from error
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise UserError(f"{metrics_file} not found: {run_dir} is not a training run that has logged a step")
    series = read_series(metrics_file)
    figure, (loss_axis, speed_axis) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                                   gridspec_kw={"height_ratios": [3, 1]})
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        if series[key]:
            steps, values = zip(*series[key])
            loss_axis.plot(steps, values, style, label=label, markersize=3)
    loss_axis.set_ylabel("cross entropy (nats/token)")
    loss_axis.set_title(str(run_dir))
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    if series["tokens_per_s"]:
        steps, values = zip(*series["tokens_per_s"])
        speed_axis.plot(steps, values, color="tab:green")
    speed_axis.set_ylabel("tokens/s")
    speed_axis.set_xlabel("optimizer step")
    speed_axis.grid(alpha=0.3)
    figure.tight_layout()
    with staged_file(output) as staging:
        figure.savefig(staging, format="png", dpi=100)
    plt.close(figure)
    return output


def plot(config: PlotConfig) -> Path:
    check_apart(config.output, "--output", {"RUN_DIR/metrics.jsonl": config.run_dir / "metrics.jsonl",
                                            "RUN_DIR/metrics.csv": config.run_dir / "metrics.csv"})
    is_default = config.output == config.run_dir / PLOT_FILE
    check_replaceable_file(config.output, "--output", "zh-plot", is_default, config.overwrite)
    output = plot_run(config.run_dir, config.output)
    print(f"plot: {output}", file=sys.stderr)
    return output


def main(argv: list[str] | None = None) -> int:
    return run_stage(plot, PlotConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
