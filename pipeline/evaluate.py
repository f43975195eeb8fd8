"""evaluate: how well an HF BART/PEGASUS model predicts masked examples.

Any model directory with a BERT ``vocab.txt`` works (a ``zh-export`` output, a ``zh-import-uer``
import of a UER-py model, a published one), scored on a mask stage output, or on a tokenized
corpus masked with a fixed seed (the trainer's epoch-0 online masks). Reported, over the target
tokens of the chosen examples:

- ``loss``: token-weighted cross entropy (fp32, nats per token) and its ``perplexity``;
- ``token_accuracy``: the teacher-forced argmax equals the target token, split into
  ``context_token_accuracy`` over the target tokens the source still shows (inside a run of at
  least ``CONTEXT_MIN_RUN`` tokens that source and target share, found by ``difflib``'s matching
  blocks: BART's unmasked text) and ``infill_token_accuracy`` over the rest (masked spans, random
  replacements, PEGASUS's removed sentences): a denoiser first learns to copy, then to fill;
- ``unigram_loss``: the entropy of the targets' own token distribution, i.e. the loss of the best
  unigram model of these very targets: a model that does not beat it has learnt no context;
  ``unigram_token_accuracy`` is that model's accuracy (the most frequent target token's share);
- ``exact_match``: greedy generation reproduces the whole target, on ``--generate_examples``.

The same examples and vocab give the same figures for any batch size, so runs, checkpoints and
imported seed models can be compared on one held-out set.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from data_tools.cli import option, required, run_stage
from data_tools.common import UserError
from pipeline.batch_loader import evaluation_batches
from pipeline.collate import Seq2SeqCollator
from pipeline.examples import Seq2SeqExamples, load_training_data
from pipeline.loss import labelled_logits, token_cross_entropy
from pipeline.model import check_model_vocab, check_positions, load_hf_model

# Shared runs shorter than this are not context: single characters such as 的 or ， match by
# chance between a PEGASUS target sentence and the rest of its document.
CONTEXT_MIN_RUN = 3


@dataclass(kw_only=True)
class EvaluateConfig:
    """Score an HF BART/PEGASUS model on masked examples: loss, perplexity, token accuracy, exact match."""

    model_dir: Path = required("HF model directory with a BERT vocab.txt (zh-export, zh-import-uer or a published "
                               "BART/Pegasus).")
    data_dir: Path = required("Mask stage output, or a tokenize stage output with --mask_config.")
    mask_config: Path | None = option(None, "JSON of mask flags to mask a tokenized --data_dir on the fly (e.g. "
                                      "{\"preset\": \"pegasus_paper\", \"seq_length\": 512}); examples get the "
                                      "trainer's epoch-0 masks of that seed.")
    held_out: int = option(0, "Evaluate the last N examples: those zh-train --eval_examples N held out. 0 = the first "
                           "--limit examples.")
    limit: int = option(1000, "With --held_out 0: evaluate the first N examples (0 = all).")
    batch_size: int = option(32, "Examples per forward pass.")
    generate_examples: int = option(16, "Greedy-generate this many of the evaluated examples (the first ones) and "
                                    "report how many reproduce their target exactly; 0 = skip generation.")
    device: str = option("auto", "auto (cuda when available), cpu or cuda[:N].")
    progress: bool = option(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        self.model_dir, self.data_dir = Path(self.model_dir), Path(self.data_dir)
        if self.mask_config is not None:
            self.mask_config = Path(self.mask_config)
        for name in ("held_out", "limit", "generate_examples"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} {getattr(self, name)} must be >= 0")
        if self.batch_size <= 0:
            raise UserError(f"--batch_size {self.batch_size} must be positive")


@dataclass
class Totals:
    """Running sums over target tokens; :meth:`report` turns them into the figures."""

    loss_sum: float = 0.0
    tokens: int = 0
    correct: int = 0
    context_tokens: int = 0
    context_correct: int = 0
    examples: int = 0
    generated: int = 0
    exact: int = 0

    def add(self, examples: Sequence[tuple[np.ndarray, np.ndarray]], loss_sum: float, tokens: int,
            correct: torch.Tensor, token_counts: np.ndarray) -> None:
        """One scored batch (:func:`score_batch`): its loss and accuracy, the accuracy on each example's context
        tokens, and its targets' tokens counted into ``token_counts``."""
        self.loss_sum += loss_sum
        self.tokens += tokens
        self.correct += int(correct.sum())
        for row, (source, target) in enumerate(examples):
            shown = torch.from_numpy(context_positions(source, target))
            self.context_tokens += int(shown.sum())
            self.context_correct += int(correct[row, : len(target)][shown].sum())
            np.add.at(token_counts, np.asarray(target, dtype=np.int64), 1)
        self.examples += len(examples)

    def report(self, token_counts: np.ndarray) -> dict[str, float | int | None]:
        loss = self.loss_sum / max(1, self.tokens)
        return {
            "examples": self.examples,
            "target_tokens": self.tokens,
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "token_accuracy": self.correct / max(1, self.tokens),
            "context_tokens": self.context_tokens,
            "context_token_accuracy": self.context_correct / self.context_tokens if self.context_tokens else None,
            "infill_token_accuracy": ((self.correct - self.context_correct) / (self.tokens - self.context_tokens)
                                      if self.tokens > self.context_tokens else None),
            "unigram_loss": unigram_entropy(token_counts),
            "unigram_token_accuracy": float(token_counts.max() / token_counts.sum()) if token_counts.sum() else 0.0,
            "exact_match": self.exact / self.generated if self.generated else None,
            "generated_examples": self.generated,
        }


def unigram_entropy(token_counts: np.ndarray) -> float:
    """Entropy (nats) of a token distribution given by counts: the cross entropy of the best
    unigram model of exactly those tokens."""
    counts = token_counts[token_counts > 0].astype(np.float64)
    if not len(counts):
        return 0.0
    probabilities = counts / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())


def context_positions(source: np.ndarray, target: np.ndarray, min_run: int = CONTEXT_MIN_RUN) -> np.ndarray:
    """Boolean mask over ``target``: True where the token lies in a run of at least ``min_run``
    tokens that also appears, in the same order, in ``source`` (the matching blocks of a
    longest-common-subsequence-like alignment), i.e. where the model can copy rather than infer."""
    shown = np.zeros(len(target), dtype=bool)
    matcher = SequenceMatcher(None, [int(t) for t in source], [int(t) for t in target], autojunk=False)
    for block in matcher.get_matching_blocks():
        if block.size >= min_run:
            shown[block.b : block.b + block.size] = True
    return shown


def load_examples(config: EvaluateConfig) -> Seq2SeqExamples:
    """The dataset (stored or online-masked), with the checks the trainer makes."""
    try:
        return load_training_data(config.data_dir, config.mask_config)
    except UserError as error:  # the trainer's loader names the trainer's flag
        raise UserError(str(error).replace("--online_mask_config", "--mask_config")) from None


def example_indices(total: int, config: EvaluateConfig) -> range:
    if config.held_out:
        if config.held_out > total:
            raise UserError(f"--held_out {config.held_out} exceeds the {total} examples of {config.data_dir}")
        return range(total - config.held_out, total)
    return range(0, min(total, config.limit) if config.limit else total)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available; use --device cpu")
    return device


def score_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int, torch.Tensor]:
    """(summed fp32 cross entropy, target tokens, "argmax is right" per target position, False on padding)
    of one collated batch: the trainer's loss, on the labelled positions' logits (pipeline/loss.py)."""
    logits, labels = labelled_logits(model, batch)
    loss = token_cross_entropy(logits, labels, reduction="sum")
    correct = torch.zeros(batch["labels"].numel(), dtype=torch.bool)
    correct[batch["label_positions"].cpu()] = (logits.argmax(-1) == labels).cpu()
    return float(loss), len(labels), correct.view(batch["labels"].shape)


def exact_matches(model: torch.nn.Module, examples: list[tuple[np.ndarray, np.ndarray]], batch: dict,
                  eos_id: int) -> int:
    """How many greedy generations equal their target (ids up to and including the end token)."""
    longest = max(len(target) for _, target in examples)
    output = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                            num_beams=1, max_length=longest + 1)
    matches = 0
    for row, (_, target) in enumerate(examples):
        generated = output[row, 1:].tolist()  # drop the decoder start token
        if eos_id in generated:
            generated = generated[: generated.index(eos_id) + 1]
        matches += generated == [int(t) for t in target]
    return matches


def evaluate(config: EvaluateConfig) -> dict:
    """Score the model on the chosen examples, batched as the trainer's eval loss is; print the table and the
    JSON line, and return the figures."""
    dataset = load_examples(config)
    check_model_vocab(config.model_dir, dataset.manifest["vocab"], config.data_dir, "--model_dir", required=True)
    model = load_hf_model(config.model_dir, "--model_dir")
    indices = example_indices(len(dataset), config)
    check_positions(dataset.max_lengths(), model.config, config.data_dir)
    device = resolve_device(config.device)
    model.to(device).eval()
    collate = Seq2SeqCollator(pad_id=model.config.pad_token_id, decoder_start_id=model.config.decoder_start_token_id)
    totals = Totals()
    token_counts = np.zeros(model.config.vocab_size, dtype=np.int64)
    bar = tqdm(total=len(indices), desc="evaluate", unit=" examples", disable=not config.progress, file=sys.stderr)
    with torch.no_grad():
        for examples, tensors in evaluation_batches(dataset, indices, config.batch_size, collate):
            batch = {key: value.to(device) for key, value in tensors.items()}
            totals.add(examples, *score_batch(model, batch), token_counts)
            wanted = min(len(examples), config.generate_examples - totals.generated)
            if wanted > 0:
                subset = {key: batch[key][:wanted] for key in ("input_ids", "attention_mask")}
                totals.exact += exact_matches(model, examples[:wanted], subset, model.config.eos_token_id)
                totals.generated += wanted
            bar.update(len(examples))
    bar.close()
    report = {"model_dir": str(config.model_dir), "data_dir": str(config.data_dir),
              "examples_from": f"last {config.held_out}" if config.held_out else f"first {len(indices)}",
              **totals.report(token_counts)}
    print_table(report)
    print(json.dumps(report))
    return report


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def print_table(report: dict) -> None:
    rows = [("examples", f"{report['examples']} ({report['examples_from']})"),
            ("target tokens", str(report["target_tokens"])),
            ("loss (nats/token)", f"{report['loss']:.4f}"),
            ("perplexity", f"{report['perplexity']:.2f}"),
            ("token accuracy", f"{report['token_accuracy']:.2%}"),
            ("  on context shown in the source", percent(report["context_token_accuracy"])
             + f" of {report['context_tokens']} tokens"),
            ("  on the rest (infill)", percent(report["infill_token_accuracy"])),
            ("unigram loss of the targets", f"{report['unigram_loss']:.4f}"),
            ("  its token accuracy", f"{report['unigram_token_accuracy']:.2%}"),
            ("exact match", "-" if report["exact_match"] is None else
             f"{report['exact_match']:.2%} of {report['generated_examples']} generated")]
    width = max(len(name) for name, _ in rows)
    print(f"{report['model_dir']} on {report['data_dir']}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    return run_stage(evaluate, EvaluateConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
