"""Training throughput: the data path on a CPU, tokens/s and MFU on a GPU (issue #5).

CPU part (always): the trainer's own data path — memory-mapped example shards, the
resumable distributed sampler and the collator, composed as ``pipeline/trainer.py`` does —
on BART examples from the CLUECorpusSmall sample (seq_length 512) at 1x and 10x the data:
samples/s for one rank, and how much resident memory grows with 10x the data (it should
not: shards are mapped, not loaded); and the share of padded tokens over an epoch of real
examples with fixed-size, length-grouped and token-budget batches.

GPU part (when CUDA is available): PEGASUS base (source 512, target 128) and BART 4+4
(512/512) in bf16 with ZeRO-2 (``ds_configs/zero2_bf16.json``), with and without activation
checkpointing, each at the largest micro batch of ``--micro_batches`` that fits. Ours is
``pipeline/trainer.py`` under the ``deepspeed`` launcher; the baseline is transformers'
``Seq2SeqTrainer`` with the same model config, examples, collator, micro batch and
DeepSpeed config, launched the same way, in the same run; ours runs twice, with the same
random fixed-size batches as the peer and with ``--group_by_length``. All are timed over the same
steps after a warm-up; tokens/s counts real (unpadded) source + target tokens, MFU uses
the FLOPs formula of ``pipeline/flops.py`` and the device's peak. ``--cpu_smoke`` runs this
GPU path on the CPU with the tiny models (fp32) to check the script, not to measure.

Run with ``.venv/bin/python bench/train_throughput.py [--quick]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py would shadow the stdlib `tokenize` for every script in bench/.
BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
PROJECT_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(PROJECT_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

SHARED = PROJECT_ROOT.parent / "shared" / "data"
MICRO_BATCH = 32


def measure(data_dir: str, batches: int) -> dict:
    """In this process: open the shards, then time ``batches`` micro batches of rank 0 of 8."""
    import psutil

    from pipeline.data import ExampleShards, ResumableDistributedSampler, Seq2SeqCollator

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
    for _ in range(batches):
        batch = collate([dataset.example(i) for i in next(sampler)])
        samples += batch["input_ids"].shape[0]
    seconds = time.perf_counter() - start
    return {"examples": len(dataset), "samples_per_s": samples / seconds,
            "rss_growth_mb": (process.memory_info().rss - rss_before) / 1e6,
            "private_growth_mb": private_mb() - private_before}


def padding_shares(data_dir: Path, micro_batch: int, max_tokens: int) -> dict[str, float]:
    """Share of padded tokens over one epoch for fixed-size, length-grouped and token-budget batches."""
    import numpy as np

    from pipeline.data import ExampleShards, padded_batch_cost, plan_micro_batches

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


GPU_CASES = {  # name: (model config, mask target, source length, target length)
    "pegasus-base": ("pegasus-base", "gsg", 512, 128),
    "bart-4+4": ("bart-medium", "bart", 512, 512),
}
SMOKE_CASES = {"pegasus-tiny": ("pegasus-tiny", "gsg", 128, 32), "bart-tiny": ("bart-tiny", "bart", 128, 128)}


def _deepspeed_command(port: int) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(port)]


def _bench_env() -> dict:
    import os

    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(PROJECT_ROOT / ".torch_extensions"))
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_ours(data_dir: Path, out: Path, model: str, micro: int, steps: int, warmup: int, checkpointing: bool,
             ds_config: Path, port: int, *extra: str) -> dict:
    """pipeline/trainer.py under the deepspeed launcher; figures from its metrics.jsonl."""
    command = [*_deepspeed_command(port), str(PROJECT_ROOT / "pipeline" / "trainer.py"), "--data_dir", str(data_dir),
               "--output_dir", str(out), "--model_config", model, "--deepspeed_config", str(ds_config),
               "--micro_batch_size", str(micro), "--total_steps", str(steps), "--warmup_steps", "2",
               "--log_every_steps", str(warmup), "--save_checkpoint_steps", str(10 * steps), "--keep_last_checkpoints",
               "1", "--no-progress", *(["--gradient_checkpointing"] if checkpointing else []), *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=_bench_env(), cwd=PROJECT_ROOT)
    if result.returncode:
        return {"error": _failure(result.stdout + result.stderr)}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "loss" in r and r["step"] > warmup]  # the first window holds start-up
    # Windows of equal step counts: the rate over all of them is the harmonic mean of theirs.
    figures = {"samples_per_s": len(timed) / sum(1 / r["samples_per_s"] for r in timed),
               "tokens_per_s_logged": len(timed) / sum(1 / r["tokens_per_s"] for r in timed),
               "model_flops_per_s_logged": 1e12 * len(timed) / sum(1 / r["model_tflops_per_s"] for r in timed),
               "peak_memory_gb": max(r.get("peak_memory_gb", float("nan")) for r in timed)}
    return figures


def run_ours_grouped(*args) -> dict:
    """Ours with --group_by_length: batches of similar length, far less padding on real corpora."""
    return run_ours(*args, "--group_by_length")


def run_hf_baseline(data_dir: Path, out: Path, model: str, micro: int, steps: int, warmup: int,
                    checkpointing: bool, ds_config: Path, port: int) -> dict:
    """transformers' Seq2SeqTrainer with the same DeepSpeed config, launched like ours."""
    args = {"data_dir": str(data_dir), "out": str(out), "model": model, "micro": micro, "steps": steps,
            "warmup": warmup, "checkpointing": checkpointing, "ds_config": str(ds_config)}
    command = [*_deepspeed_command(port), str(Path(__file__).resolve()), "--hf_baseline", json.dumps(args)]
    result = subprocess.run(command, capture_output=True, text=True, env=_bench_env(), cwd=PROJECT_ROOT)
    if result.returncode:
        return {"error": _failure(result.stdout + result.stderr)}
    return json.loads((out / "hf_baseline.json").read_text())


def _failure(output: str) -> str:
    if "out of memory" in output.lower():
        return "OOM"
    return "failed: " + output.strip()[-1500:]


def hf_baseline_main(args: dict) -> None:
    """Inside the launcher: train with Seq2SeqTrainer and write samples/s and peak memory."""
    import torch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from pipeline.data import ExampleShards, Seq2SeqCollator
    from pipeline.model import build_model, load_model_config

    dataset = ExampleShards(Path(args["data_dir"]))
    vocab = dataset.manifest["vocab"]
    config = load_model_config(args["model"], vocab["size"], vocab["special_token_ids"])
    model = build_model(config)
    collate = Seq2SeqCollator(pad_id=config.pad_token_id, decoder_start_id=config.decoder_start_token_id)

    class Examples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, index: int):
            return dataset[index]

    class Clock(TrainerCallback):
        marks: dict = {}

        def on_step_end(self, arguments, state, control, **kwargs):
            if state.global_step in (args["warmup"], args["steps"]):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks[state.global_step] = time.perf_counter()

    ds_config = json.loads(Path(args["ds_config"]).read_text())
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    training_args = Seq2SeqTrainingArguments(
        output_dir=args["out"], per_device_train_batch_size=args["micro"], max_steps=args["steps"],
        learning_rate=1e-4, warmup_steps=2, weight_decay=0.01, bf16=bf16, deepspeed=ds_config,
        gradient_checkpointing=args["checkpointing"], logging_steps=args["warmup"], save_strategy="no",
        report_to=[], dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, seed=7,
        use_cpu=not torch.cuda.is_available(),
    )
    clock = Clock()
    trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=Examples(), data_collator=collate,
                             callbacks=[clock])
    trainer.train()
    seconds = clock.marks[args["steps"]] - clock.marks[args["warmup"]]
    samples = (args["steps"] - args["warmup"]) * args["micro"]
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        Path(args["out"], "hf_baseline.json").write_text(json.dumps({"samples_per_s": samples / seconds,
                                                                     "peak_memory_gb": peak}))


def mean_example_cost(data_dir: Path, model: str) -> tuple[float, float]:
    """(real tokens, training FLOPs) per example, averaged over the examples: both systems
    draw uniformly from the same examples, so samples/s x these is their tokens/s and FLOP/s."""
    import numpy as np

    from pipeline.data import ExampleShards
    from pipeline.flops import training_flops
    from pipeline.model import load_model_config

    dataset = ExampleShards(data_dir)
    lengths = dataset.lengths()
    vocab = dataset.manifest["vocab"]
    config = load_model_config(model, vocab["size"], vocab["special_token_ids"])
    flops = training_flops(config, lengths[:, 0].astype(np.int64), lengths[:, 1].astype(np.int64))
    return float(lengths.sum() / len(lengths)), flops / len(lengths)


def gpu_benchmark(root: Path, tokenized: Path, args: argparse.Namespace) -> list[dict]:
    import torch

    from data_tools.mask import MaskConfig, mask
    from pipeline.flops import peak_flops_per_device

    smoke = args.cpu_smoke
    cases = SMOKE_CASES if smoke else GPU_CASES
    ds_config = PROJECT_ROOT / "ds_configs" / ("cpu_zero2.json" if smoke else "zero2_bf16.json")
    steps, warmup = (6, 2) if smoke else (25, 5) if args.quick else (60, 10)
    candidates = [int(v) for v in args.micro_batches.split(",")] if not smoke else [8, 4]
    device = "cpu (smoke run, not a measurement)" if smoke else torch.cuda.get_device_name()
    peak = peak_flops_per_device(args.peak_tflops, None if smoke else device)
    rows, figures, port = [], [], 29900
    for name, (model, target, source_length, target_length) in cases.items():
        data_dir = root / f"examples-{name}"
        mask(MaskConfig(input_dir=tokenized, output_dir=data_dir, target=target, seq_length=source_length,
                        tgt_seq_length=target_length, processes_num=2, progress=False))
        tokens_per_example, flops_per_example = mean_example_cost(data_dir, model)
        for checkpointing in (False, True):
            results = {}
            systems = (("ours", run_ours), ("ours_group_by_length", run_ours_grouped),
                       ("hf_seq2seq_trainer", run_hf_baseline))
            for system, runner in systems:
                tried = candidates if system == "ours" else [m for m in candidates if m <= results["ours"]["micro"]]
                for micro in tried:  # largest micro batch that fits
                    port += 1
                    out = root / f"{name}-{system}-{int(checkpointing)}-{micro}"
                    result = runner(data_dir, out, model, micro, steps, warmup, checkpointing, ds_config, port)
                    print(f"  {name} ckpt={checkpointing} {system} micro {micro}: "
                          f"{result.get('error') or round(result['samples_per_s'], 1)}", file=sys.stderr)
                    if "error" not in result:
                        results[system] = {**result, "micro": micro}
                        break
                    if result["error"] != "OOM":
                        raise SystemExit(f"{system} {name} failed:\n{result['error']}")
                else:
                    raise SystemExit(f"{system} {name}: no micro batch of {tried} fits")
            for system, result in results.items():
                if "tokens_per_s_logged" in result:  # ours counts the real tokens and FLOPs of each batch
                    result["tokens_per_s"] = result["tokens_per_s_logged"]
                    flops_per_s = result["model_flops_per_s_logged"]
                else:  # the peer draws uniformly from the same examples: samples/s x per-example means
                    result["tokens_per_s"] = result["samples_per_s"] * tokens_per_example
                    flops_per_s = result["samples_per_s"] * flops_per_example
                result["mfu"] = flops_per_s / peak if peak else None
                rows.append((name, checkpointing, system, result))
            suffix = "_ckpt" if checkpointing else ""
            same, ours, theirs = results["ours"], results["ours_group_by_length"], results["hf_seq2seq_trainer"]
            figures += [
                {"metric": f"{name}{suffix}_tokens_per_s", "value": round(ours["tokens_per_s"]), "unit": "tokens/s"},
                {"metric": f"{name}{suffix}_mfu", "value": None if ours["mfu"] is None else round(ours["mfu"], 4),
                 "unit": "fraction of peak"},
                {"metric": f"{name}{suffix}_peak_memory_gb", "value": round(ours["peak_memory_gb"], 2), "unit": "GB"},
                {"metric": f"{name}{suffix}_hf_trainer_tokens_per_s", "value": round(theirs["tokens_per_s"]),
                 "unit": "tokens/s"},
                {"metric": f"{name}{suffix}_speedup_vs_hf_trainer",
                 "value": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
                 "unit": "ratio ours (--group_by_length) / peer"},
                {"metric": f"{name}{suffix}_same_batches_speedup_vs_hf_trainer",
                 "value": round(same["tokens_per_s"] / theirs["tokens_per_s"], 3),
                 "unit": "ratio ours (fixed random batches, as the peer) / peer"},
            ]
    print(f"\nGPU training throughput on {device}, ZeRO-2 {ds_config.name}, {steps} steps, timed after {warmup}")
    print(f"{'model':14s} {'act. ckpt':>9s} {'system':20s} {'micro':>5s} {'tokens/s':>10s} {'MFU':>7s} "
          f"{'peak GB':>8s}")
    for name, checkpointing, system, result in rows:
        mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
        print(f"{name:14s} {str(checkpointing):>9s} {system:20s} {result['micro']:5d} {result['tokens_per_s']:10.0f} "
              f"{mfu:>7s} {result['peak_memory_gb']:8.2f}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer batches and training steps")
    parser.add_argument("--cpu_smoke", action="store_true",
                        help="run the GPU part on the CPU with tiny models, to check the script (no figures)")
    parser.add_argument("--micro_batches", default="64,48,32,24,16,8",
                        help="micro batch sizes tried per model, largest first; the first that fits is used")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="peak dense TFLOP/s of the GPU for MFU; 0 = the known figure (H100 989, A100 312)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one measurement in a fresh process
    parser.add_argument("--batches", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--hf_baseline", help=argparse.SUPPRESS)  # internal: the baseline under the launcher
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batches)))
        return
    if args.hf_baseline:
        hf_baseline_main(json.loads(args.hf_baseline))
        return

    import torch

    from data_tools.clean import CleanConfig, clean
    from data_tools.mask import MaskConfig, mask
    from data_tools.tokenize_shards import TokenizeConfig, tokenize

    corpus, vocab = SHARED / "CLUECorpusSmall_bert_sampled.txt", SHARED / "google_zh_vocab.txt"
    if not (corpus.is_file() and vocab.is_file()):
        raise SystemExit(f"bench/train_throughput.py needs {corpus} and {vocab} (../shared/data)")
    batches = 100 if args.quick else 400
    results = {}
    gpu_figures = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clean(CleanConfig(input_paths=[corpus], output_dir=root / "clean", progress=False))
        tokenize(TokenizeConfig(input_dir=root / "clean", output_dir=root / "tok", vocab_path=vocab, progress=False))
        for scale in (1, 10):
            out = root / f"examples-{scale}x"
            mask(MaskConfig(input_dir=root / "tok", output_dir=out, target="bart", seq_length=512, dup_factor=scale,
                            processes_num=2, progress=False))
            # A fresh process per scale, so the memory figures do not mix.
            output = subprocess.run([sys.executable, __file__, "--measure", str(out), "--batches", str(batches)],
                                    capture_output=True, text=True, check=True, cwd=PROJECT_ROOT).stdout
            results[scale] = json.loads(output.strip().splitlines()[-1])
        padding = {}
        for target, seq, tgt in (("gsg", 512, 128), ("bart", 512, 512)):
            out = root / f"padding-{target}"
            mask(MaskConfig(input_dir=root / "tok", output_dir=out, target=target, seq_length=seq,
                            tgt_seq_length=tgt, processes_num=2, progress=False))
            padding[target] = padding_shares(out, MICRO_BATCH, 16384)
        if torch.cuda.is_available() or args.cpu_smoke:
            gpu_figures = gpu_benchmark(root, root / "tok", args)
        else:
            print("no CUDA device: the GPU part (tokens/s, MFU, peak memory vs Seq2SeqTrainer) was skipped\n")

    print(f"trainer data path, rank 0 of 8, micro batch {MICRO_BATCH}, BART examples of up to 512 tokens, one core")
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
    if not args.cpu_smoke:
        figures += gpu_figures
    for figure in figures:
        print(json.dumps(figure))


if __name__ == "__main__":
    main()
