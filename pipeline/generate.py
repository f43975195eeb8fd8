"""generate: batch generation from an exported model, for a file or stdin.

BertTokenizer.decode puts a space between every pair of tokens; Chinese has none, so
spaces next to a CJK character are removed while spaces between Latin words stay.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, TextIO

from data_tools.cli import option, required, run_stage
from data_tools.common import VOCAB_FILE, UserError
from data_tools.outputs import check_apart, check_replaceable_file, overwrite_option, staged_file

_CJK = r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"
_SPACE_NEXT_TO_CJK = re.compile(rf"(?<={_CJK}) +| +(?={_CJK})")


@dataclass(kw_only=True)
class GenerateConfig:
    """Generate text with an exported BART or PEGASUS model."""

    model_dir: Path = required("Exported HF model directory.")
    input_file: str = option("-", "One input per line (UTF-8); '-' reads stdin.")
    output_file: str = option("-", "Where to write one output per line, whole once every input is done; '-' writes "
                              "stdout as it goes. An existing file is refused unless --overwrite.")
    batch_size: int = option(16, "Inputs per generate() call.")
    max_length: int = option(64, "Maximum generated tokens.")
    max_source_length: int = option(512, "Inputs are truncated to this many tokens.")
    num_beams: int = option(1, "Beam search width (1 = greedy unless --do_sample).")
    do_sample: bool = option(False, "Sample instead of greedy/beam search.")
    top_k: int = option(50, "With --do_sample: sample from the k most likely tokens.")
    top_p: float = option(1.0, "With --do_sample: nucleus sampling mass.")
    temperature: float = option(1.0, "With --do_sample: softmax temperature.")
    seed: int = option(0, "Seed for sampling.")
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise UserError(f"{self.model_dir} has no config.json; pass an exported model directory")
        for name in ("top_p", "temperature"):  # every comparison with NaN is False: check first
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"--{name} {getattr(self, name)} must be a finite number")
        for name in ("batch_size", "max_length", "max_source_length", "num_beams", "temperature"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} {getattr(self, name)} must be positive")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top_k {self.top_k} must be >= 0 and --top_p {self.top_p} lie in (0, 1]")
        if self.seed < 0:
            raise UserError(f"--seed {self.seed} must be >= 0")


def remove_cjk_spaces(text: str) -> str:
    """'今 天 很 好 ， hello world' -> '今天很好，hello world'."""
    return _SPACE_NEXT_TO_CJK.sub("", text).strip()


def load_model(model_dir: Path):  # noqa: ANN201 - HF types
    from transformers import BertTokenizer

    from pipeline.model import load_hf_model, quiet_loading

    model = load_hf_model(model_dir, "--model_dir")
    if not (model_dir / VOCAB_FILE).is_file():
        raise UserError(f"--model_dir {model_dir} has no {VOCAB_FILE}; pass a directory written by zh-export")
    with quiet_loading():
        tokenizer = BertTokenizer.from_pretrained(str(model_dir))
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
    # Explicit: transformers 4.x's BertTokenizer cleans up by default ("don ' t" -> "don't"), 5.x does not,
    # and exports made before tokenizer_config.json said so (or published models) name no value.
    texts = tokenizer.batch_decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [remove_cjk_spaces(t) for t in texts]


def _batches(lines: Iterable[str], size: int) -> Iterable[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line.rstrip("\n"))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _decoded_lines(handle: BinaryIO, name: str) -> Iterator[str]:
    """The lines of a UTF-8 byte stream; a line that is not UTF-8 stops with its number."""
    for number, raw in enumerate(handle, start=1):
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            raise UserError(f"{name}:{number}: not UTF-8 text ({error.reason} at byte {error.start}); "
                            "convert the input to UTF-8") from error


def generate(config: GenerateConfig) -> None:
    import torch

    to_file = config.output_file != "-"
    if to_file:
        output = Path(config.output_file)
        check_apart(output, "--output_file", {"--input_file": None if config.input_file == "-" else
                                              Path(config.input_file), "--model_dir": config.model_dir})
        check_replaceable_file(output, "--output_file", "zh-generate", False, config.overwrite)
    torch.manual_seed(config.seed)
    tokenizer, model = load_model(config.model_dir)
    positions = model.config.max_position_embeddings
    cut_beyond_flag = config.max_source_length > positions  # then the positions, not the flag, may cut an input
    config = fit_to_positions(config, positions)
    try:
        source = sys.stdin.buffer if config.input_file == "-" else open(config.input_file, "rb")  # noqa: SIM115
    except OSError as error:
        raise UserError(f"cannot read --input_file {config.input_file}: {error.strerror}") from error
    lines = _decoded_lines(source, "stdin" if config.input_file == "-" else config.input_file)
    if cut_beyond_flag:
        lines = _noting_cut_inputs(lines, tokenizer, positions)
    try:
        if to_file:  # the file appears whole, once every input is generated
            with staged_file(output) as staging, open(staging, "w", encoding="utf-8") as sink:
                _generate_into(sink, tokenizer, model, lines, config)
        else:
            _generate_into(sys.stdout, tokenizer, model, lines, config)
    finally:
        if source is not sys.stdin.buffer:
            source.close()


def fit_to_positions(config: GenerateConfig, positions: int) -> GenerateConfig:
    """The model has ``positions`` positions on each side: a longer output cannot be generated (refused),
    and inputs are never longer than them, whatever ``--max_source_length`` says."""
    if config.max_length > positions:
        raise UserError(f"--max_length {config.max_length} is above the model's {positions} positions "
                        f"(max_position_embeddings in {config.model_dir / 'config.json'}); pass at most {positions}")
    return dataclasses.replace(config, max_source_length=min(config.max_source_length, positions))


def _noting_cut_inputs(lines: Iterable[str], tokenizer, positions: int) -> Iterator[str]:  # noqa: ANN001
    """The lines as they are; the first one longer than the model's positions is said once on stderr."""
    said = False
    for line in lines:
        # verbose=False: transformers would warn about the length too, in a second line of its own
        if not said and len(tokenizer(line, verbose=False)["input_ids"]) > positions:
            print(f"generate: inputs longer than the model's {positions} positions are cut to them "
                  "(first seen in this input)", file=sys.stderr)
            said = True
        yield line


def _generate_into(sink: TextIO, tokenizer, model, lines: Iterable[str], config: GenerateConfig) -> None:  # noqa: ANN001
    for batch in _batches(lines, config.batch_size):
        for text in generate_texts(tokenizer, model, batch, config):
            sink.write(text + "\n")
        sink.flush()


def main(argv: list[str] | None = None) -> int:
    return run_stage(generate, GenerateConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
