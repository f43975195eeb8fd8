"""generate: batch generation from an exported model, for a file or stdin.

BertTokenizer.decode puts a space between every pair of tokens; Chinese has none, so
spaces next to a CJK character are removed while spaces between Latin words stay.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from data_tools.cli import option, required, run_stage
from data_tools.common import UserError

_CJK = r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"
_SPACE_NEXT_TO_CJK = re.compile(rf"(?<={_CJK}) +| +(?={_CJK})")


@dataclass(kw_only=True)
class GenerateConfig:
    """Generate text with an exported BART or PEGASUS model."""

    model_dir: Path = required("Exported HF model directory.")
    input_file: str = option("-", "One input per line; '-' reads stdin.")
    output_file: str = option("-", "Where to write one output per line; '-' writes stdout.")
    batch_size: int = option(16, "Inputs per generate() call.")
    max_length: int = option(64, "Maximum generated tokens.")
    max_source_length: int = option(512, "Inputs are truncated to this many tokens.")
    num_beams: int = option(1, "Beam search width (1 = greedy unless --do_sample).")
    do_sample: bool = option(False, "Sample instead of greedy/beam search.")
    top_k: int = option(50, "With --do_sample: sample from the k most likely tokens.")
    top_p: float = option(1.0, "With --do_sample: nucleus sampling mass.")
    temperature: float = option(1.0, "With --do_sample: softmax temperature.")
    seed: int = option(0, "Seed for sampling.")

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise UserError(f"{self.model_dir} has no config.json; pass an exported model directory")


def remove_cjk_spaces(text: str) -> str:
    """'今 天 很 好 ， hello world' -> '今天很好，hello world'."""
    return _SPACE_NEXT_TO_CJK.sub("", text).strip()


def load_model(model_dir: Path):  # noqa: ANN201 - HF types
    from transformers import AutoModelForSeq2SeqLM, BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir))
    model.eval()
    return tokenizer, model


def generate_texts(tokenizer, model, inputs: list[str], config: GenerateConfig) -> list[str]:  # noqa: ANN001
    import torch

    encoded = tokenizer(inputs, return_tensors="pt", padding=True, truncation=True,
                        max_length=config.max_source_length, return_token_type_ids=False)
    with torch.no_grad():
        output = model.generate(
            **encoded, max_length=config.max_length, num_beams=config.num_beams, do_sample=config.do_sample,
            top_k=config.top_k, top_p=config.top_p, temperature=config.temperature,
        )
    return [remove_cjk_spaces(t) for t in tokenizer.batch_decode(output, skip_special_tokens=True)]


def _batches(lines: Iterable[str], size: int) -> Iterable[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line.rstrip("\n"))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def generate(config: GenerateConfig) -> None:
    import torch

    torch.manual_seed(config.seed)
    tokenizer, model = load_model(config.model_dir)
    try:
        source = sys.stdin if config.input_file == "-" else open(config.input_file, encoding="utf-8")  # noqa: SIM115
    except OSError as error:
        raise UserError(f"cannot read --input_file {config.input_file}: {error.strerror}") from error
    sink = sys.stdout if config.output_file == "-" else open(config.output_file, "w", encoding="utf-8")  # noqa: SIM115
    try:
        for batch in _batches(source, config.batch_size):
            for text in generate_texts(tokenizer, model, batch, config):
                sink.write(text + "\n")
            sink.flush()
    finally:
        if source is not sys.stdin:
            source.close()
        if sink is not sys.stdout:
            sink.close()


def main(argv: list[str] | None = None) -> int:
    return run_stage(generate, GenerateConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
