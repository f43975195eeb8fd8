"""The trainer's start-up decision: may this run start, and how.

:func:`read_startup` reads what a run depends on: the data and its manifest, the DeepSpeed and model
configs, the run directory, the checkpoint to resume, the accelerator. What cannot be read becomes a
problem, not an exception. :func:`plan_run` then checks the flags against all of it, in one pure
function (no DeepSpeed, no process group, nothing written: tests call it with hand-made inputs), and
returns a :class:`RunPlan` or raises one error naming every problem, as litgpt's ``validate_args``
does. So bad input fails fast on every rank, and a failed start leaves the run directory as it was.

The run directory's layout lives here too: the files the trainer writes at its top, and
:func:`prepare_run_dir`, which writes them once the start is decided.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from data_tools.common import VOCAB_FILE, UserError, write_json_atomic
from data_tools.outputs import check_apart, output_lock
from pipeline.checkpointing import (CHECKPOINTS, MODEL_CONFIG_FILE, TrainerState, digests_recorded, find_resume_tag,
                                   read_trainer_state)
from pipeline.distributed import accelerator_problem, launcher_world_size, nvidia_gpus_visible
from pipeline.ds_config import load_ds_config, mixed_precision, resolve_batch_sizes
from pipeline.examples import Seq2SeqExamples, load_training_data
from pipeline.mixture import MixtureExamples, parse_mixture
from pipeline.model import init_from_problem, load_model_config, model_vocab_sha256, positions_problem, read_hf_config
from pipeline.plot import PLOT_FILE
from pipeline.train_config import (
    TRAIN_CONFIG_FILE,
    TrainConfig,
    data_label,
    data_paths,
    read_previous_config,
    resumable_problem,
)

DS_CONFIG_FILE = "ds_config.json"
DATA_MANIFEST_FILE = "data_manifest.json"
# Every file the trainer writes at the top of a run directory.
RUN_FILES = (TRAIN_CONFIG_FILE, DS_CONFIG_FILE, MODEL_CONFIG_FILE, VOCAB_FILE, DATA_MANIFEST_FILE,
             "metrics.jsonl", "metrics.csv", "tensorboard", PLOT_FILE, CHECKPOINTS)

T = TypeVar("T")


@dataclass(frozen=True)
class RunDirState:
    """What --output_dir holds before the run starts."""

    exists: bool = False
    is_dir: bool = False
    written_by_trainer: bool = False  # it has the model and DeepSpeed configs an earlier start wrote
    run_files: tuple[str, ...] = ()  # names of RUN_FILES present


@dataclass(frozen=True)
class StartupInputs:
    """What the start-up checks look at, as read from disk and the environment (:func:`read_startup`)."""

    world_size: int
    accelerator: str  # DeepSpeed's device name: "cuda", "cpu", ...
    examples: Seq2SeqExamples | None = None
    model_config: Any = None  # the HF config the model is built from
    init_from_values: dict | None = None  # --init_from's config.json
    init_from_vocab_sha256: str | None = None  # of --init_from's vocab.txt; None when it has none
    raw_ds_config: dict | None = None
    ds_config_path: Path | None = None
    run_dir: RunDirState = RunDirState()
    previous_config: dict | None = None  # train_config.json of a run directory with a checkpoint
    resume_tag: str | None = None
    saved_state: dict = field(default_factory=dict)  # the resume tag's trainer_state.json
    recorded_manifest: dict | None = None  # data_manifest.json of a run being resumed
    gpus_visible: int = 0  # what nvidia-smi lists, whatever torch thinks
    requested_accelerator: str | None = None  # DS_ACCELERATOR
    unreadable: dict[str, str] = field(default_factory=dict)  # input -> why it could not be read


@dataclass(frozen=True)
class RunPlan:
    """What a start decided: everything the trainer builds from."""

    examples: Seq2SeqExamples
    model_config: Any
    ds_config: dict  # batch sizes and optimizer values filled in from the flags (the run directory's copy)
    precision: str  # "bf16", "fp16" or "fp32"
    world_size: int
    train_examples: int  # the first ones; the last --eval_examples are held out
    resume_tag: str | None
    start: TrainerState  # step and data position to continue from (zeros for a fresh run)
    universal: bool = False  # resuming a checkpoint zh-to-universal converted
    resume_digests: bool = True  # the checkpoint resumed records its files' sha256 (those written before do not)

    @property
    def vocab(self) -> dict:
        return self.examples.manifest["vocab"]

    def engine_config(self) -> dict:
        """The DeepSpeed config to start the engine with: a universal checkpoint loads on any number of ranks."""
        if not self.universal:
            return self.ds_config
        return {**self.ds_config, "checkpoint": {**self.ds_config.get("checkpoint", {}), "load_universal": True}}


# -- reading ---------------------------------------------------------------------------------------


def read_training_data(config: TrainConfig) -> Seq2SeqExamples:
    """One corpus, or the weighted mixture of --data_dirs (vocabs checked equal)."""
    if config.data_dir is not None:
        return load_training_data(config.data_dir, config.online_mask_config, config.verify_data_sha256)
    specs = parse_mixture(config.data_dirs)
    corpora = [load_training_data(spec.path, config.online_mask_config, config.verify_data_sha256) for spec in specs]
    return MixtureExamples(corpora, specs, config.seed, config.eval_examples)


def run_model_config(config: TrainConfig, vocab: dict) -> Any:
    """The HF config: the --init_from model's, or a packaged/path config with the data's vocab and special ids."""
    if config.init_from is not None:
        from transformers import (
            AutoConfig,  # deferred: transformers' import takes ~2 s (pipeline/model.py)
        )

        return AutoConfig.from_pretrained(str(config.init_from))
    return load_model_config(config.model_config, vocab["size"], vocab["special_token_ids"])


def read_run_dir(directory: Path) -> RunDirState:
    if not directory.exists():
        return RunDirState()
    if not directory.is_dir():
        return RunDirState(exists=True)
    return RunDirState(True, True, (directory / MODEL_CONFIG_FILE).is_file() and (directory / DS_CONFIG_FILE).is_file(),
                       tuple(sorted(name for name in RUN_FILES if (directory / name).exists())))


def read_recorded_manifest(config: TrainConfig) -> dict | None:
    """The data manifest a run directory was trained on, None when it has none."""
    recorded = config.output_dir / DATA_MANIFEST_FILE
    if not recorded.is_file():
        return None
    try:
        return json.loads(recorded.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{recorded} is not the data manifest zh-train wrote ({error!r}); restore it, or use a new "
                        "--output_dir") from error


def _read(unreadable: dict[str, str], what: str, read: Callable[[], T]) -> T | None:
    """``read()``, or None with its one-line problem recorded under ``what``."""
    try:
        return read()
    except UserError as error:
        unreadable[what] = str(error)
        return None


def read_startup(config: TrainConfig, accelerator: str) -> StartupInputs:
    """Everything the start-up checks need, read once; nothing is written."""
    unreadable: dict[str, str] = {}
    examples = _read(unreadable, "data", lambda: read_training_data(config))
    raw = _read(unreadable, "ds_config", lambda: load_ds_config(config.deepspeed_config))
    init_values = init_vocab = model_config = None
    if config.init_from is not None:
        init_values = _read(unreadable, "init_from", lambda: read_hf_config(config.init_from, "--init_from"))
        init_vocab = model_vocab_sha256(config.init_from)
    if examples is not None and "init_from" not in unreadable:
        model_config = _read(unreadable, "model_config", lambda: run_model_config(config, examples.manifest["vocab"]))
    root = config.output_dir / CHECKPOINTS
    tag = _read(unreadable, "resume", lambda: find_resume_tag(root))
    return StartupInputs(
        world_size=launcher_world_size(), accelerator=accelerator, examples=examples, model_config=model_config,
        init_from_values=init_values, init_from_vocab_sha256=init_vocab,
        raw_ds_config=raw[0] if raw else None, ds_config_path=raw[1] if raw else None,
        run_dir=read_run_dir(config.output_dir),
        previous_config=_read(unreadable, "previous_config", lambda: read_previous_config(config)),
        resume_tag=tag, saved_state=read_trainer_state(root / tag) if tag else {},
        recorded_manifest=_read(unreadable, "recorded_manifest", lambda: read_recorded_manifest(config)) if tag else None,
        gpus_visible=nvidia_gpus_visible() if accelerator == "cpu" else 0,
        requested_accelerator=os.environ.get("DS_ACCELERATOR"), unreadable=unreadable)


# -- checking --------------------------------------------------------------------------------------


def run_dir_problem(config: TrainConfig, found: RunDirState) -> str | None:
    """The run directory is apart from the inputs, and either new, a run directory, or a folder holding none
    of the files the trainer writes (say, the launcher's log): the trainer never overwrites a file it did not write."""
    inputs = {f"--data_dirs {path}" if config.data_dirs else "--data_dir": path for path in data_paths(config)}
    try:
        check_apart(config.output_dir, "--output_dir", {**inputs, "--init_from": config.init_from,
                                                        "--online_mask_config": config.online_mask_config})
    except UserError as error:
        return str(error)
    directory = config.output_dir
    if not found.exists or (found.is_dir and found.written_by_trainer):
        return None  # new, or written by an earlier start of this trainer
    if not found.is_dir:
        return f"--output_dir {directory} is a file; give a directory for the run"
    if found.run_files:
        return (f"--output_dir {directory} is not a zh-train run directory but holds {', '.join(found.run_files)}, "
                "which the trainer would overwrite; nothing was changed: choose a new --output_dir")
    return None


def same_data_problem(config: TrainConfig, recorded: dict | None, manifest: dict) -> str | None:
    """A run resumes only on the data it was trained on: same vocab, same shards (a regenerated corpus
    with another vocab would not even load; one with other examples would not resume exactly)."""
    if recorded is None:
        return None
    where = config.output_dir / DATA_MANIFEST_FILE
    try:
        same_vocab = recorded["vocab"]["sha256"] == manifest["vocab"]["sha256"]
        same_shards = [s["sha256"] for s in recorded["shards"]] == [s["sha256"] for s in manifest["shards"]]
    except (KeyError, TypeError) as error:
        return f"{where} is not the data manifest zh-train wrote ({error!r}); restore it, or use a new --output_dir"
    if same_vocab and same_shards:
        return None
    what = "vocab" if not same_vocab else "examples (shard checksums)"
    return (f"{data_label(config)} is not the data {config.output_dir} was trained on: its {what} differ from "
            f"{where}; resume with the original data, or start a new --output_dir (--init_from an export of this "
            "run to continue from its weights)")


def resume_world_size_problem(config: TrainConfig, saved: dict, world_size: int, tag: str) -> str | None:
    """A ZeRO-2 checkpoint holds one optimizer partition per rank: it loads only on as many ranks, unless
    zh-to-universal converted it."""
    written_by = saved.get("world_size")
    if saved.get("universal") or not written_by or written_by == world_size:
        return None
    return (f"{config.output_dir / CHECKPOINTS / tag} was written by {written_by} ranks and this run has {world_size}: "
            f"ZeRO-2 optimizer partitions load only on as many ranks; convert it once with `zh-to-universal --run_dir "
            f"{config.output_dir}`, then relaunch on any number of ranks")


def _checked(problems: list[str], compute: Callable[[], T]) -> T | None:
    """``compute()``, or None with its UserError added to ``problems``."""
    try:
        return compute()
    except UserError as error:
        problems.append(str(error))
        return None


def plan_run(config: TrainConfig, found: StartupInputs) -> RunPlan:
    """Check the flags against what start-up read; the plan, or one UserError naming every problem (in the
    order the trainer once met them one at a time). Checks whose input could not be read are skipped."""
    problems = [run_dir_problem(config, found.run_dir), found.unreadable.get("data")]
    examples, vocab = found.examples, found.examples.manifest["vocab"] if found.examples is not None else None
    if examples is not None and config.eval_examples >= len(examples):
        problems.append(f"--eval_examples {config.eval_examples} leaves nothing to train on ({len(examples)} examples)")
    problems += [found.unreadable.get("ds_config"),
                 found.unreadable.get("previous_config") or resumable_problem(config, found.previous_config)]
    ds_config = None
    if found.raw_ds_config is not None:
        ds_config = _checked(problems, lambda: resolve_batch_sizes(config, found.raw_ds_config, found.world_size,
                                                                    str(found.ds_config_path)))
    if config.init_from is not None:
        problems.append(found.unreadable.get("init_from") or vocab and init_from_problem(
            config.init_from, found.init_from_values, found.init_from_vocab_sha256, vocab, data_label(config)))
    problems.append(found.unreadable.get("model_config"))
    if examples is not None and found.model_config is not None:
        problems.append(positions_problem(examples.max_lengths(), found.model_config, data_label(config)))
    problems.append(found.unreadable.get("resume"))
    start = TrainerState()
    if found.resume_tag is not None:
        problems.append(found.unreadable.get("recorded_manifest"))
        if examples is not None:
            problems.append(same_data_problem(config, found.recorded_manifest, examples.manifest))
        problems.append(resume_world_size_problem(config, found.saved_state, found.world_size, found.resume_tag))
        start = _checked(problems, lambda: TrainerState.from_json(found.saved_state))
    if found.raw_ds_config is not None:
        problems.append(accelerator_problem(found.accelerator, found.gpus_visible, found.requested_accelerator,
                                            mixed_precision(found.raw_ds_config), config.allow_cpu_mixed_precision,
                                            str(found.ds_config_path)))
    problems = [problem for problem in problems if problem]
    if problems:
        raise UserError(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(
            f"({number}) {problem}" for number, problem in enumerate(problems, 1)))
    return RunPlan(examples, found.model_config, ds_config, mixed_precision(ds_config), found.world_size,
                   len(examples) - config.eval_examples, found.resume_tag, start, bool(found.saved_state.get("universal")),
                   found.resume_tag is None or digests_recorded(found.saved_state))


def plan_locked_run(config: TrainConfig, accelerator: str, locked_by: str | None) -> RunPlan:
    """:func:`plan_run` of what :func:`read_startup` reads, for a rank 0 that may have found the run directory
    locked (``locked_by``, :func:`run_dir_lock`): alone, it stops at once; with other ranks, it tells them once the
    process group is up. A problem in what it read then is named as the lock: it may be another run's half-done work."""
    if locked_by and launcher_world_size() == 1:
        raise UserError(locked_by)
    try:
        return plan_run(config, read_startup(config, accelerator))
    except UserError:
        if locked_by:
            raise UserError(locked_by) from None
        raise


# -- the run directory -----------------------------------------------------------------------------


def prepare_run_dir(config: TrainConfig, plan: RunPlan) -> None:
    """Rank 0 writes what the export and a resume need (train_config.json only once the start succeeded).
    A resumed run keeps the model config, vocab and data manifest its checkpoints were trained with."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.output_dir / DS_CONFIG_FILE, plan.ds_config)
    if plan.resume_tag and all((config.output_dir / name).is_file() for name in (MODEL_CONFIG_FILE, VOCAB_FILE)):
        return
    plan.model_config.to_json_file(config.output_dir / MODEL_CONFIG_FILE)
    shutil.copyfile(data_paths(config)[0] / VOCAB_FILE, config.output_dir / VOCAB_FILE)  # a mixture has one vocab
    write_json_atomic(config.output_dir / DATA_MANIFEST_FILE, plan.examples.manifest)


@contextlib.contextmanager
def run_dir_lock(output_dir: Path, is_main: bool) -> Iterator[str | None]:
    """Rank 0 holds an exclusive lock on the run directory for the whole run (data_tools.outputs.output_lock:
    ``fcntl.flock`` on ``.NAME.lock`` beside it, which names the holder's pid and host; the kernel releases it when
    the process dies, so a killed run's lock does not block the next). Yields None, or the one line naming the
    run that holds it: two runs in one directory would interleave their steps in metrics.jsonl and write each
    other's checkpoints. Taken before anything is read, so the plan is never of a directory another run is
    changing. Other ranks lock nothing (they may be on other hosts): rank 0 tells them once the process group is up
    (:func:`pipeline.distributed.refuse_on_every_rank`). A run directory whose parent does not exist yet is not
    locked: the lock lives in that parent."""
    if not is_main:
        yield None
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(output_lock(output_dir))
        except UserError as error:
            yield str(error)
            return
        yield None
