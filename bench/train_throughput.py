"""Training throughput: the trainer's data path on a CPU; tokens/s, MFU and peak memory on a GPU,
against transformers' ``Seq2SeqTrainer``.

CPU part (``--parts cpu``): the trainer's data path (mapped example shards, the resumable
sampler, the collator) on BART examples at 1x and 10x the data: samples/s of one rank and how
much its memory grows; the padded share of an epoch with fixed-size, length-grouped and
token-budget batches; and, masking online (``bart_paper``, bart-tiny under the ``deepspeed``
launcher), the share of wall time the training loop waits for data with ``--data_workers 0``
and ``2``.

GPU part (``--parts gpu``, needs CUDA): PEGASUS base (512/128) and BART 4+4 (512/512) in bf16
with ZeRO-2, without and with activation checkpointing: ``pipeline/trainer.py`` against
``Seq2SeqTrainer`` with the same model config, examples, collator, micro batch and DeepSpeed
config, launched the same way, on the same fixed batches, then each with its own length
grouping; wall-clock timed after a warm-up window. ``--cpu_smoke`` runs this part on the CPU
with tiny models to check the script (its figures go to stderr: not a measurement).

    python -m bench.train_throughput [--quick]        # CPU part (on a GPU machine also --gpu_quick's)
    python -m bench.train_throughput --gpu_quick [--cases pegasus-base]   # GPU part, no act. ckpt
    python -m bench.train_throughput --parts gpu --cases bart-4+4 [--checkpointing off|on|both]

Prints tables, then one JSON object per figure. CPU part: dataloader_samples_per_s,
dataloader_rss_growth_mb, dataloader_private_memory_growth_mb, {gsg,bart}_padding_share_fixed,
{gsg,bart}_padding_share_token_budget, online_mask_data_wait_fraction_sync,
online_mask_data_wait_fraction_workers, online_mask_step_time_speedup. GPU part, per case
(prefix ``pegasus-base``, ``bart-4+4``, ``..._ckpt`` with checkpointing): _tokens_per_s, _mfu,
_peak_memory_gb, _hf_trainer_tokens_per_s, _hf_trainer_peak_memory_gb, _speedup_vs_hf_trainer,
_grouped_tokens_per_s, _grouped_mfu, _hf_trainer_grouped_tokens_per_s,
_grouped_speedup_vs_hf_trainer_grouped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# ZH_SHARED_DATA: a copy of the data where ../shared does not travel (a lent GPU machine; bin/gpu_kit.sh).
SHARED = Path(os.environ.get("ZH_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data")
MICRO_BATCH = 32
SEED = 7  # the trainer's default --seed; passed explicitly so the peer's fixed order matches ours
START = time.perf_counter()

GPU_CASES = {  # name: (model config, mask target, source length, target length, default micro batch)
    "pegasus-base": ("pegasus-base", "gsg", 512, 128, 64),
    "bart-4+4": ("bart-medium", "bart", 512, 512, 64),
}
SMOKE_CASES = {"pegasus-tiny": ("pegasus-tiny", "gsg", 128, 32, 8), "bart-tiny": ("bart-tiny", "bart", 128, 128, 8)}
# (system, grouped by length?) in the order they run: the peer right after ours at the same
# micro batch, so an out-of-memory error shows before the grouped runs.
SYSTEMS = (("ours", False), ("hf_seq2seq_trainer", False), ("ours", True), ("hf_seq2seq_trainer", True))
# The peer's DataLoader workers: as many as our trainer's default --data_workers, so both
# prepare batches in the background (transformers' default is 0, in the training loop).
PEER_DATA_WORKERS = 2
ONLINE_MASK_FLAGS = {"preset": "bart_paper", "seq_length": 256}  # bart-tiny has 256 positions
ONLINE_MASK_MODEL, ONLINE_MASK_MICRO, ONLINE_MASK_WINDOW = "bart-tiny", 16, 10


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- pure helpers ---------------------------------------------------------------------------------


def window_totals(records: list[dict], after_step: int) -> dict:
    """Figures over the trainer's ``metrics.jsonl`` log windows that end after ``after_step``.

    Each window's wall time is its samples (from ``consumed_samples``) over its samples/s;
    tokens, padded tokens, FLOPs and waiting time are its rates times that time, so the
    results are totals over the timed windows, not means of per-window rates.
    """
    totals = {"seconds": 0.0, "steps": 0, "samples": 0, "tokens": 0.0, "padded": 0.0, "flops": 0.0, "waited": 0.0}
    wait_logged, pad_logged, peak = True, True, float("nan")
    previous_step = previous_samples = 0
    for record in records:
        if "loss" not in record:  # eval records
            continue
        steps, samples = record["step"] - previous_step, record["consumed_samples"] - previous_samples
        previous_step, previous_samples = record["step"], record["consumed_samples"]
        if record["step"] <= after_step:
            continue
        seconds = samples / record["samples_per_s"]
        tokens = record["tokens_per_s"] * seconds
        totals["seconds"] += seconds
        totals["steps"] += steps
        totals["samples"] += samples
        totals["tokens"] += tokens
        totals["flops"] += record["model_tflops_per_s"] * 1e12 * seconds
        if "pad_fraction" in record and record["pad_fraction"] < 1:
            totals["padded"] += tokens / (1 - record["pad_fraction"])
        else:
            pad_logged = False
        if record.get("data_wait_fraction") is not None:
            totals["waited"] += record["data_wait_fraction"] * seconds
        else:
            wait_logged = False
        if record.get("peak_memory_gb") is not None:
            peak = record["peak_memory_gb"] if math.isnan(peak) else max(peak, record["peak_memory_gb"])
    if not totals["steps"]:
        raise ValueError(f"no logged window ends after step {after_step}")
    seconds = totals["seconds"]
    return {
        "steps": totals["steps"],
        "samples_per_s": totals["samples"] / seconds,
        "tokens_per_s": totals["tokens"] / seconds,
        "flops_per_s": totals["flops"] / seconds,
        "seconds_per_step": seconds / totals["steps"],
        "seconds": seconds,
        "pad_fraction": 1 - totals["tokens"] / totals["padded"] if pad_logged and totals["padded"] else None,
        "data_wait_fraction": totals["waited"] / seconds if wait_logged else None,
        "peak_memory_gb": peak,
    }


def batch_totals(batches: list[dict], seconds: float) -> dict:
    """The peer's figures from the batches it trained in ``seconds`` (``tokens``, ``padded``,
    ``flops`` and ``indices`` per batch, as its collator recorded them)."""
    tokens = sum(b["tokens"] for b in batches)
    padded = sum(b["padded"] for b in batches)
    return {
        "steps": len(batches),
        "samples_per_s": sum(len(b["indices"]) for b in batches) / seconds,
        "tokens_per_s": tokens / seconds,
        "flops_per_s": sum(b["flops"] for b in batches) / seconds,
        "seconds_per_step": seconds / len(batches),
        "pad_fraction": 1 - tokens / padded if padded else None,
    }


def fixed_batches(num_examples: int, micro_batch: int, steps: int, seed: int = SEED) -> list[list[int]]:
    """The first ``steps`` fixed-size micro batches our trainer draws on 1 rank (no grouping)."""
    from pipeline.sampler import ResumableDistributedSampler

    sampler = iter(ResumableDistributedSampler(num_examples, micro_batch, rank=0, world_size=1, seed=seed))
    return [next(sampler) for _ in range(steps)]


def micro_batch_candidates(start: int) -> list[int]:
    """The micro batch to try first, then halves of it down to 1 (tried after an out-of-memory error)."""
    candidates = []
    while start >= 1 and start not in candidates:
        candidates.append(start)
        start //= 2
    return candidates


def ratio(ours: float, theirs: float) -> float | None:
    return round(ours / theirs, 3) if theirs else None


def number(value: float | None, digits: int) -> float | None:
    """A figure's JSON value: rounded, None when not measured (NaN is not JSON)."""
    return None if value is None or math.isnan(value) else round(value, digits)


# -- CPU part: the data path ------------------------------------------------------------------------


def measure(data_dir: str, batches: int) -> dict:
    """In this process: open the shards, then time ``batches`` micro batches of rank 0 of 8."""
    import psutil

    from pipeline.batch_loader import collate_examples
    from pipeline.collate import Seq2SeqCollator
    from pipeline.examples import ExampleShards
    from pipeline.sampler import ResumableDistributedSampler

    process = psutil.Process()

    def private_mb() -> float:  # resident memory not backed by a file (mapped shard pages are)
        info = process.memory_info()
        return (info.rss - info.shared) / 1e6

    rss_before, private_before = process.memory_info().rss, private_mb()
    dataset = ExampleShards(Path(data_dir))
    sampler = iter(ResumableDistributedSampler(len(dataset), MICRO_BATCH, rank=0, world_size=8, seed=1))
    collate = Seq2SeqCollator(pad_id=0, decoder_start_id=101)
    start = time.perf_counter()
    samples = 0
    for _ in range(batches):  # made as the trainer's loader makes them (label positions included)
        _, batch = collate_examples(dataset, next(sampler), 0, collate)
        samples += batch["input_ids"].shape[0]
    seconds = time.perf_counter() - start
    return {"examples": len(dataset), "samples_per_s": samples / seconds,
            "rss_growth_mb": (process.memory_info().rss - rss_before) / 1e6,
            "private_growth_mb": private_mb() - private_before}


def padding_shares(data_dir: Path, micro_batch: int, max_tokens: int) -> dict[str, float]:
    """Share of padded tokens over one epoch for fixed-size, length-grouped and token-budget batches."""
    import numpy as np

    from pipeline.examples import ExampleShards
    from pipeline.sampler import padded_batch_cost, plan_micro_batches

    lengths = ExampleShards(data_dir).lengths()
    order = np.random.default_rng(0).permutation(len(lengths))
    shares = {}
    for name, grouped, budget in (("fixed", None, 0), ("group_by_length", lengths, 0),
                                  (f"max_tokens_{max_tokens}", lengths, max_tokens)):
        planned, bounds = plan_micro_batches(order, grouped, micro_batch, budget, window=100 * micro_batch)
        padded = real = 0
        for start, stop in zip(bounds[:-1], bounds[1:]):
            batch = planned[start:stop]
            padded += padded_batch_cost(lengths[batch, 0], lengths[batch, 1])
            real += int(lengths[batch].sum())
        shares[name] = 1 - real / padded
    return shares


# -- launching the trainers -----------------------------------------------------------------------


def _deepspeed_command() -> list[str]:
    from pipeline.distributed import deepspeed_launcher, free_port

    return [*deepspeed_launcher(), "--num_gpus", "1", "--master_port", str(free_port())]


def _bench_env() -> dict:
    import os

    import torch

    from pipeline.distributed import launched_env

    env = dict(os.environ)  # what bin/env.sh sets, for a run without it
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    if "TORCH_EXTENSIONS_DIR" not in env:  # bin/env.sh's node-local, per-checkout cache of DeepSpeed's JIT ops
        env["TORCH_EXTENSIONS_DIR"] = subprocess.run(
            ["bash", "-c", 'source "$1" && printf %s "$TORCH_EXTENSIONS_DIR"', "_", str(PROJECT_ROOT / "bin" / "env.sh")],
            capture_output=True, text=True, check=True).stdout
    return launched_env(env, PROJECT_ROOT)


def _failure(output: str) -> str:
    if "out of memory" in output.lower():
        return "OOM"
    return "failed: " + output.strip()[-3000:]


STEP_LINE = re.compile(r"^step (\d+): loss ")  # what the trainer prints at each log step with --no-progress


def launch(command: list[str]) -> tuple[int, str, dict[int, float]]:
    """Run a launcher command; (exit status, its output, the time each ``step N: loss`` line came out).

    The trainer prints that line at the end of each log step, after the window's all-reduce
    (a device synchronization): the times between those lines are wall-clock step times,
    logging included, like the peer's clock; its end-of-run checkpoint comes after the last.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=_bench_env(), cwd=PROJECT_ROOT, bufsize=1)
    lines, stamps = [], {}
    for line in process.stdout:
        now = time.perf_counter()
        lines.append(line)
        match = STEP_LINE.match(line)
        if match:
            stamps[int(match.group(1))] = now
    return process.wait(), "".join(lines), stamps


def run_ours(data_dir: Path, out: Path, model: str, micro: int, steps: int, window: int, checkpointing: bool,
             ds_config: Path, *extra: str) -> dict:
    """pipeline/trainer.py under the deepspeed launcher, timed from its log step ``window`` to its
    last (wall clock, from its output); tokens, FLOPs, padding and data wait from its
    metrics.jsonl windows after the first (which holds the warm-up). Its only checkpoint is the
    one written after the last log step; it is deleted once read."""
    command = [*_deepspeed_command(), str(PROJECT_ROOT / "pipeline" / "trainer.py"), "--data_dir", str(data_dir),
               "--output_dir", str(out), "--model_config", model, "--deepspeed_config", str(ds_config),
               "--micro_batch_size", str(micro), "--total_steps", str(steps), "--warmup_steps", "2",
               "--log_every_steps", str(window), "--save_checkpoint_steps", str(10 * steps),
               "--keep_last_checkpoints", "1", "--seed", str(SEED), "--no-progress",
               *(["--gradient_checkpointing"] if checkpointing else []), *extra]
    started = time.perf_counter()
    status, output, stamps = launch(command)
    if status:
        return {"error": _failure(output)}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    figures = window_totals(records, after_step=window)
    figures["launch_s"] = time.perf_counter() - started
    if window in stamps and steps in stamps:
        wall = stamps[steps] - stamps[window]
        # The windows' own clocks stop at each log step and restart after it: their sum
        # leaves out the logging between windows.
        figures["logged_share_of_wall"] = figures["seconds"] / wall
        for key in ("samples_per_s", "tokens_per_s", "flops_per_s"):
            figures[key] *= figures["seconds"] / wall
        if figures["data_wait_fraction"] is not None:  # as a share of the wall time
            figures["data_wait_fraction"] *= figures["seconds"] / wall
        figures["seconds_per_step"], figures["seconds"] = wall / figures["steps"], wall
    else:
        log(f"warning: no 'step N: loss' lines for steps {window} and {steps} in the trainer's output; "
            "timing from its metrics windows")
    if (out / "example_ids_rank0.jsonl").is_file():
        lines = (out / "example_ids_rank0.jsonl").read_text().splitlines()
        figures["batches"] = [json.loads(line)["example_ids"] for line in lines if line.strip()]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # GBs per run on a GPU
    return figures


def length_grouping_argument(grouped: bool) -> dict:
    """The peer's length grouping in its own spelling: transformers 5 replaced ``group_by_length`` (which
    it rejects) with ``train_sampling_strategy="group_by_length"``, the same LengthGroupedSampler."""
    from transformers import Seq2SeqTrainingArguments

    fields = Seq2SeqTrainingArguments.__dataclass_fields__
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped}


def run_hf_baseline(data_dir: Path, out: Path, model: str, micro: int, steps: int, window: int,
                    checkpointing: bool, ds_config: Path, grouped: bool, record_batches: bool) -> dict:
    """transformers' Seq2SeqTrainer with the same DeepSpeed config, launched like ours."""
    args = {"data_dir": str(data_dir), "out": str(out), "model": model, "micro": micro, "steps": steps,
            "window": window, "checkpointing": checkpointing, "ds_config": str(ds_config), "grouped": grouped,
            "record_batches": record_batches}
    # --module: each rank runs `python -m bench.train_throughput`, importing the project from
    # PYTHONPATH (launched_env) and the launcher's cwd, the project root.
    command = [*_deepspeed_command(), "--module", "bench.train_throughput", "--hf_baseline", json.dumps(args)]
    started = time.perf_counter()
    status, output, _ = launch(command)
    if status:
        return {"error": _failure(output)}
    return {**json.loads((out / "hf_baseline.json").read_text()), "launch_s": time.perf_counter() - started}


def hf_baseline_main(args: dict) -> None:
    """Inside the launcher: train with Seq2SeqTrainer and write its figures over the timed steps.

    Same batches: its train sampler yields exactly our trainer's fixed-size order. Grouped:
    its own ``group_by_length=True`` (``LengthGroupedSampler`` over the ``input_ids`` lengths of
    the dataset's dict items). Either sampler is wrapped to record, in this process, the
    indices it hands the DataLoader (whose workers collate), epoch by epoch; the timed
    batches' tokens, padding and FLOPs are computed from those after training.
    """
    import os

    import numpy as np
    import torch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback, set_seed

    from pipeline.collate import Seq2SeqCollator
    from pipeline.examples import ExampleShards
    from pipeline.sampler import padded_batch_cost
    from pipeline.flops import training_flops
    from pipeline.model import build_model, load_model_config

    dataset = ExampleShards(Path(args["data_dir"]))
    vocab = dataset.manifest["vocab"]
    config = load_model_config(args["model"], vocab["size"], vocab["special_token_ids"])
    set_seed(SEED)
    model = build_model(config)
    collator = Seq2SeqCollator(pad_id=config.pad_token_id, decoder_start_id=config.decoder_start_token_id)

    def collate(items: list[dict]) -> dict:
        return collator([(item["input_ids"], item["labels"]) for item in items])

    class Examples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, index: int) -> dict:
            source, target = dataset[index]
            return {"input_ids": source, "labels": target}

    class Recorded(torch.utils.data.Sampler):
        """Another sampler's indices, recorded epoch by epoch as the DataLoader draws them."""

        def __init__(self, inner) -> None:
            self.inner, self.epochs = inner, []

        def __iter__(self):
            drawn: list[int] = []
            self.epochs.append(drawn)
            for index in self.inner:
                drawn.append(int(index))
                yield index

        def __len__(self) -> int:
            return len(self.inner)

    fixed = None if args["grouped"] else [i for batch in fixed_batches(len(dataset), args["micro"], args["steps"])
                                          for i in batch]
    samplers: list[Recorded] = []

    class Trainer(Seq2SeqTrainer):
        def _get_train_sampler(self, *pos, **kw):
            samplers.append(Recorded(super()._get_train_sampler(*pos, **kw) if fixed is None else fixed))
            return samplers[-1]

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: dict[int, float] = {}

        def on_step_end(self, arguments, state, control, **kwargs):
            if state.global_step in (args["window"], args["steps"]):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks[state.global_step] = time.perf_counter()

    ds_config = json.loads(Path(args["ds_config"]).read_text())
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    training_args = Seq2SeqTrainingArguments(
        output_dir=args["out"], per_device_train_batch_size=args["micro"], max_steps=args["steps"],
        learning_rate=1e-4, warmup_steps=2, weight_decay=0.01, bf16=bf16, deepspeed=ds_config,
        gradient_checkpointing=args["checkpointing"], **length_grouping_argument(args["grouped"]),
        logging_steps=args["window"], save_strategy="no", report_to=[], dataloader_num_workers=PEER_DATA_WORKERS,
        dataloader_persistent_workers=PEER_DATA_WORKERS > 0, remove_unused_columns=False, disable_tqdm=True,
        seed=SEED, use_cpu=not torch.cuda.is_available(),
    )
    clock = Clock()
    trainer = Trainer(model=model, args=training_args, train_dataset=Examples(), data_collator=collate,
                      callbacks=[clock])
    trainer.train()
    seconds = clock.marks[args["steps"]] - clock.marks[args["window"]]
    # Each epoch's indices in DataLoader batches (the last one may be short: drop_last is off);
    # batch k of the run is trained at step k + 1.
    micro, batches = args["micro"], []
    for epoch in (epoch for sampler in samplers for epoch in sampler.epochs):
        batches += [epoch[start : start + micro] for start in range(0, len(epoch), micro)]
    lengths = dataset.lengths()
    timed = []
    for indices in batches[args["window"] : args["steps"]]:
        source, target = lengths[indices, 0], lengths[indices, 1]
        timed.append({"indices": indices, "tokens": int(source.sum() + target.sum()),
                      "padded": padded_batch_cost(source, target),
                      "flops": training_flops(config, source.astype(np.int64), target.astype(np.int64))})
    figures = batch_totals(timed, seconds)
    figures["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")
    if args["record_batches"]:
        figures["batches"] = batches[: args["steps"]]
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args["out"], "hf_baseline.json").write_text(json.dumps(figures))


# -- CPU part: online masking, waiting for data -------------------------------------------------------


def online_mask_prepare_seconds(tokenized: Path, root: Path, batches: int = 20) -> float:
    """Seconds to mask and collate one micro batch on the fly, in this process (one core)."""
    from data_tools.mask import MaskConfig
    from pipeline.batch_loader import collate_examples
    from pipeline.collate import Seq2SeqCollator
    from pipeline.examples import OnlineMaskedExamples

    data = OnlineMaskedExamples(tokenized, MaskConfig(input_dir=tokenized, output_dir=root / "unused",
                                                      **ONLINE_MASK_FLAGS))
    collate = Seq2SeqCollator(pad_id=0, decoder_start_id=101)
    order = fixed_batches(len(data), ONLINE_MASK_MICRO, batches)
    start = time.perf_counter()
    for indices in order:
        collate_examples(data, indices, 0, collate)
    return (time.perf_counter() - start) / batches


def online_mask_wait(root: Path, tokenized: Path, quick: bool) -> dict:
    """Our trainer on online-masked bart_paper examples with --data_workers 0 and 2."""
    import torch

    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    report = {"device": device, "steps": 30 if quick else 60, "runs": {}}
    report["prepare_s"] = online_mask_prepare_seconds(tokenized, root)
    flags = root / "online_mask.json"
    flags.write_text(json.dumps(ONLINE_MASK_FLAGS))
    ds_config = PROJECT_ROOT / "ds_configs" / ("zero2_bf16.json" if on_gpu else "cpu_zero2.json")
    for workers in (0, 2):
        log(f"online masking, --data_workers {workers}: {report['steps']} steps")
        result = run_ours(tokenized, root / f"online-mask-workers{workers}", ONLINE_MASK_MODEL, ONLINE_MASK_MICRO,
                          report["steps"], ONLINE_MASK_WINDOW, False, ds_config,
                          "--online_mask_config", str(flags), "--data_workers", str(workers))
        if "error" in result:
            raise SystemExit(f"online masking with --data_workers {workers} failed:\n{result['error']}")
        log(f"online masking, --data_workers {workers}: {result['seconds_per_step']:.3f} s/step, data wait "
            f"{result['data_wait_fraction']}, launch {result['launch_s']:.0f} s")
        if result["data_wait_fraction"] is None:
            report["skipped"] = "the trainer's metrics.jsonl records have no data_wait_fraction"
        report["runs"][workers] = result
    return report


# -- GPU part ---------------------------------------------------------------------------------------


def run_case(data_dir: Path, root: Path, name: str, model: str, micro: int, steps: int, window: int,
             checkpointing: bool, ds_config: Path, smoke: bool) -> tuple[int, dict]:
    """The four runs of one case at the largest micro batch (from ``micro`` down) that all fit."""
    for candidate in micro_batch_candidates(micro):
        results = {}
        for system, grouped in SYSTEMS:
            key = f"{system}{'_grouped' if grouped else ''}"
            out = root / f"{name}-{key}-ckpt{int(checkpointing)}-micro{candidate}"
            if system == "ours":
                extra = ["--group_by_length"] if grouped else ["--record_example_ids"] if smoke else []
                result = run_ours(data_dir, out, model, candidate, steps, window, checkpointing, ds_config, *extra)
            else:
                result = run_hf_baseline(data_dir, out, model, candidate, steps, window, checkpointing, ds_config,
                                         grouped, record_batches=smoke and not grouped)
            outcome = result["error"][:200] if "error" in result else (
                f"{result['tokens_per_s']:.0f} tokens/s, launch {result['launch_s']:.0f} s"
                + (f", metrics windows cover {result['logged_share_of_wall']:.1%} of the timed wall time"
                   if "logged_share_of_wall" in result else ""))
            log(f"{name} ckpt={checkpointing} {key} micro {candidate}: {outcome}")
            if "error" in result:
                if result["error"] != "OOM":
                    raise SystemExit(f"{key} {name} failed:\n{result['error']}")
                break
            results[key] = result
        else:
            return candidate, results
    raise SystemExit(f"{name}: no micro batch of {micro_batch_candidates(micro)} fits")


def gpu_benchmark(root: Path, tokenized: Path, args: argparse.Namespace) -> list[dict]:
    import torch

    from data_tools.mask import MaskConfig, mask
    from pipeline.flops import peak_flops_per_device

    smoke = args.cpu_smoke
    cases = SMOKE_CASES if smoke else GPU_CASES
    names = list(cases) if not args.cases else args.cases.split(",")
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"--cases {args.cases}: unknown {unknown}; this mode has {list(cases)}")
    settings = {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]
    ds_config = PROJECT_ROOT / "ds_configs" / ("cpu_zero2.json" if smoke else "zero2_bf16.json")
    steps, window = (6, 2) if smoke else (50, 10) if args.quick or args.gpu_quick else (100, 10)
    device = "cpu (smoke run, not a measurement)" if smoke else torch.cuda.get_device_name()
    peak = peak_flops_per_device(args.peak_tflops, None if smoke else device)
    rows, figures, checks, ratios = [], [], [], []
    for name in names:
        model, target, source_length, target_length, default_micro = cases[name]
        data_dir = root / f"examples-{name}"
        mask(MaskConfig(input_dir=tokenized, output_dir=data_dir, target=target, seq_length=source_length,
                        tgt_seq_length=target_length, processes_num=2, progress=False))
        for checkpointing in settings:
            micro, results = run_case(data_dir, root, name, model, args.micro_batch or default_micro, steps, window,
                                      checkpointing, ds_config, smoke)
            for result in results.values():
                result["mfu"] = result["flops_per_s"] / peak if peak else None
            if smoke:
                same = results["ours"].get("batches") == results["hf_seq2seq_trainer"].get("batches")
                checks.append(f"{name} ckpt={checkpointing}: ours and the peer trained on "
                              + ("the same batches" if same else "DIFFERENT batches"))
            rows += [(name, checkpointing, micro, key, result) for key, result in results.items()]
            prefix = f"{name}{'_ckpt' if checkpointing else ''}"
            ours, theirs = results["ours"], results["hf_seq2seq_trainer"]
            ours_g, theirs_g = results["ours_grouped"], results["hf_seq2seq_trainer_grouped"]
            ratios.append((name, checkpointing, ratio(ours["tokens_per_s"], theirs["tokens_per_s"]),
                           ratio(ours_g["tokens_per_s"], theirs_g["tokens_per_s"])))

            figures += [
                {"metric": f"{prefix}_tokens_per_s", "value": round(ours["tokens_per_s"]),
                 "unit": "tokens/s (ours, fixed random batches)"},
                {"metric": f"{prefix}_mfu", "value": number(ours["mfu"], 4), "unit": "fraction of peak (ours, fixed random batches)"},
                {"metric": f"{prefix}_peak_memory_gb", "value": number(ours["peak_memory_gb"], 2), "unit": "GB"},
                {"metric": f"{prefix}_hf_trainer_tokens_per_s", "value": round(theirs["tokens_per_s"]),
                 "unit": "tokens/s (Seq2SeqTrainer, the same batches)"},
                {"metric": f"{prefix}_hf_trainer_peak_memory_gb", "value": number(theirs["peak_memory_gb"], 2),
                 "unit": "GB"},
                {"metric": f"{prefix}_speedup_vs_hf_trainer", "value": ratio(ours["tokens_per_s"], theirs["tokens_per_s"]),
                 "unit": "ratio ours / Seq2SeqTrainer, the same fixed random batches"},
                {"metric": f"{prefix}_grouped_tokens_per_s", "value": round(ours_g["tokens_per_s"]),
                 "unit": "tokens/s (ours, --group_by_length)"},
                {"metric": f"{prefix}_grouped_mfu", "value": number(ours_g["mfu"], 4), "unit": "fraction of peak (ours, --group_by_length)"},
                {"metric": f"{prefix}_hf_trainer_grouped_tokens_per_s", "value": round(theirs_g["tokens_per_s"]),
                 "unit": "tokens/s (Seq2SeqTrainer, group_by_length=True)"},
                {"metric": f"{prefix}_grouped_speedup_vs_hf_trainer_grouped",
                 "value": ratio(ours_g["tokens_per_s"], theirs_g["tokens_per_s"]),
                 "unit": "ratio ours --group_by_length / Seq2SeqTrainer group_by_length=True"},
            ]
    print(f"\nGPU training throughput on {device}, ZeRO-2 {ds_config.name}, {steps} steps, timed after {window}")
    print(f"{'model':14s} {'act. ckpt':>9s} {'batches':8s} {'system':20s} {'micro':>5s} {'tokens/s':>10s} "
          f"{'MFU':>7s} {'pad':>6s} {'peak GB':>8s} {'data wait':>9s} {'launch s':>8s}")
    for name, checkpointing, micro, key, result in rows:
        mfu_text = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
        pad = "n/a" if result.get("pad_fraction") is None else f"{result['pad_fraction']:.1%}"
        wait = "n/a" if result.get("data_wait_fraction") is None else f"{result['data_wait_fraction']:.1%}"
        batches = "grouped" if key.endswith("_grouped") else "same"
        system = "ours" if key.startswith("ours") else "Seq2SeqTrainer"
        print(f"{name:14s} {checkpointing!s:>9s} {batches:8s} {system:20s} {micro:5d} {result['tokens_per_s']:10.0f} "
              f"{mfu_text:>7s} {pad:>6s} {result['peak_memory_gb']:8.2f} {wait:>9s} {result['launch_s']:8.0f}")
    print(f"\n{'model':14s} {'act. ckpt':>9s} {'same batches: ours/peer':>24s} {'grouped: ours/peer':>19s}")
    for name, checkpointing, same, grouped in ratios:
        print(f"{name:14s} {checkpointing!s:>9s} {same!s:>24s} {grouped!s:>19s}")
    for check in checks:
        print(f"check: {check}")
    return figures


# -- main ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer batches and steps; the GPU part (if CUDA) in the --gpu_quick scope")
    parser.add_argument("--gpu_quick", action="store_true",
                        help="the GPU part only: both cases, no activation checkpointing, 50 steps (~5-7 min, 1 H100)")
    parser.add_argument("--parts", default="",
                        help="cpu, gpu or cpu,gpu (default cpu,gpu; gpu with --gpu_quick); gpu needs CUDA or --cpu_smoke")
    parser.add_argument("--cases", default="", help="GPU cases to run, comma-separated (default: all of "
                        f"{', '.join(GPU_CASES)}; with --cpu_smoke {', '.join(SMOKE_CASES)})")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default=None,
                        help="activation checkpointing settings of the GPU part (default both; off with "
                             "--quick / --gpu_quick)")
    parser.add_argument("--micro_batch", type=int, default=0,
                        help="micro batch of every GPU run (default: the case's, 64); halved on out of memory")
    parser.add_argument("--cpu_smoke", action="store_true",
                        help="run the GPU part on the CPU with tiny models, to check the script (no figures)")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="peak dense TFLOP/s of the GPU for MFU; 0 = the known figure (H100 989, A100 312)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one measurement in a fresh process
    parser.add_argument("--batches", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--hf_baseline", help=argparse.SUPPRESS)  # internal: the baseline under the launcher
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.micro_batch < 0:
        parser.error("--micro_batch must be >= 0")
    if args.measure:
        print(json.dumps(measure(args.measure, args.batches)))
        return
    if args.hf_baseline:
        hf_baseline_main(json.loads(args.hf_baseline))
        return
    if args.checkpointing is None:
        args.checkpointing = "off" if args.quick or args.gpu_quick else "both"
    parts = set((args.parts or ("gpu" if args.gpu_quick else "cpu,gpu")).split(","))
    if parts - {"cpu", "gpu"} or not parts:
        raise SystemExit(f"--parts {args.parts}: give cpu, gpu or cpu,gpu")

    import torch

    from data_tools.clean import CleanConfig, clean
    from data_tools.mask import MaskConfig, mask
    from data_tools.tokenize_shards import TokenizeConfig, tokenize

    corpus, vocab = SHARED / "CLUECorpusSmall_bert_sampled.txt", SHARED / "google_zh_vocab.txt"
    if not (corpus.is_file() and vocab.is_file()):
        raise SystemExit(f"bench/train_throughput.py needs {corpus} and {vocab} (../shared/data, or ZH_SHARED_DATA)")
    batches = 100 if args.quick else 400
    results, padding, online = {}, {}, None
    gpu_figures = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clean(CleanConfig(input_paths=[corpus], output_dir=root / "clean", progress=False))
        tokenize(TokenizeConfig(input_dir=root / "clean", output_dir=root / "tok", vocab_path=vocab, progress=False))
        if "cpu" in parts:
            for scale in (1, 10):
                out = root / f"examples-{scale}x"
                mask(MaskConfig(input_dir=root / "tok", output_dir=out, target="bart", seq_length=512,
                                dup_factor=scale, processes_num=2, progress=False))
                # A fresh process per scale, so the memory figures do not mix.
                output = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--measure", str(out),
                                         "--batches", str(batches)],
                                        capture_output=True, text=True, check=True, cwd=PROJECT_ROOT).stdout
                results[scale] = json.loads(output.strip().splitlines()[-1])
            for target, seq, tgt in (("gsg", 512, 128), ("bart", 512, 512)):
                out = root / f"padding-{target}"
                mask(MaskConfig(input_dir=root / "tok", output_dir=out, target=target, seq_length=seq,
                                tgt_seq_length=tgt, processes_num=2, progress=False))
                padding[target] = padding_shares(out, MICRO_BATCH, 16384)
            online = online_mask_wait(root, root / "tok", args.quick)
        if "gpu" in parts:
            if torch.cuda.is_available() or args.cpu_smoke:
                gpu_figures = gpu_benchmark(root, root / "tok", args)
            else:
                print("no CUDA device: the GPU part (tokens/s, MFU, peak memory vs Seq2SeqTrainer) was skipped\n")

    figures = []
    if "cpu" in parts:
        figures = cpu_tables(results, padding, online)
    if args.cpu_smoke:
        for figure in gpu_figures:
            print(f"smoke (not a measurement): {json.dumps(figure)}", file=sys.stderr)
    else:
        figures += gpu_figures
    print(f"\nbench wall time: {time.perf_counter() - START:.0f} s")
    for figure in figures:
        print(json.dumps(figure))


def cpu_tables(results: dict, padding: dict, online: dict | None) -> list[dict]:
    """Print the CPU part's tables; return its figures."""
    print(f"\ntrainer data path, rank 0 of 8, micro batch {MICRO_BATCH}, BART examples of up to 512 tokens, one core")
    print(f"{'data':8s} {'examples':>9s} {'samples/s':>10s} {'RSS growth MB':>14s} {'of it not file-backed':>22s}")
    for scale, result in results.items():
        print(f"{f'{scale}x':8s} {result['examples']:9d} {result['samples_per_s']:10.0f} "
              f"{result['rss_growth_mb']:14.1f} {result['private_growth_mb']:22.1f}")
    print(f"\npadded share of the tokens a GPU computes, one epoch of CLUECorpusSmall examples, micro batch "
          f"{MICRO_BATCH} (token budget: at most {MICRO_BATCH} examples)")
    print(f"{'examples':22s} " + " ".join(f"{name:>20s}" for name in padding["gsg"]))
    for target, shares in padding.items():
        label = "PEGASUS gsg 512/128" if target == "gsg" else "BART 512/512"
        print(f"{label:22s} " + " ".join(f"{share:20.1%}" for share in shares.values()))
    figures = [
        {"metric": "dataloader_samples_per_s", "value": round(results[10]["samples_per_s"]), "unit": "samples/s"},
        {"metric": "dataloader_rss_growth_mb",
         "value": round(results[10]["rss_growth_mb"] - results[1]["rss_growth_mb"], 1), "unit": "MB (10x vs 1x)"},
        {"metric": "dataloader_private_memory_growth_mb",
         "value": round(results[10]["private_growth_mb"] - results[1]["private_growth_mb"], 1),
         "unit": "MB (10x vs 1x, not file-backed)"},
    ]
    for target, shares in padding.items():
        fixed, budget = shares["fixed"], shares["max_tokens_16384"]
        figures.append({"metric": f"{target}_padding_share_fixed", "value": round(fixed, 4), "unit": "fraction"})
        figures.append({"metric": f"{target}_padding_share_token_budget", "value": round(budget, 4),
                        "unit": "fraction"})
    if online is None:
        return figures
    print(f"\nonline masking ({ONLINE_MASK_FLAGS['preset']}, seq_length {ONLINE_MASK_FLAGS['seq_length']}): our trainer, "
          f"1 rank on {online['device']}, {ONLINE_MASK_MODEL}, micro batch {ONLINE_MASK_MICRO}, {online['steps']} "
          f"steps, windows of {ONLINE_MASK_WINDOW} after the first; masking + collating one batch in one process "
          f"takes {online['prepare_s'] * 1e3:.1f} ms")
    print(f"{'batches prepared':34s} {'waiting for data':>17s} {'s/step':>8s} {'samples/s':>10s}")
    labels = {0: "in the loop (--data_workers 0)", 2: "in background (--data_workers 2)"}
    for workers, run in online["runs"].items():
        wait = "n/a" if run["data_wait_fraction"] is None else f"{run['data_wait_fraction']:.2%}"
        print(f"{labels[workers]:34s} {wait:>17s} {run['seconds_per_step']:8.3f} {run['samples_per_s']:10.1f}")
    if "skipped" in online:
        print(f"online masking figures skipped: {online['skipped']}")
        return figures
    sync, workers = online["runs"][0], online["runs"][2]
    figures += [
        {"metric": "online_mask_data_wait_fraction_sync", "value": round(sync["data_wait_fraction"], 4),
         "unit": "fraction of wall time (--data_workers 0)"},
        {"metric": "online_mask_data_wait_fraction_workers", "value": round(workers["data_wait_fraction"], 4),
         "unit": "fraction of wall time (--data_workers 2)"},
        {"metric": "online_mask_step_time_speedup",
         "value": ratio(sync["seconds_per_step"], workers["seconds_per_step"]),
         "unit": "ratio s/step --data_workers 0 / --data_workers 2"},
    ]
    return figures


if __name__ == "__main__":
    main()
