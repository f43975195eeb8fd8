"""What a first GPU run, and the transformers versions users have, would otherwise hit: each test
here stands for a defect found by reading the code against DeepSpeed 0.19, transformers 4.57 / 5.x
and apex (issue #22), checked on the CPU."""

from __future__ import annotations

import os
import sys
import time
import types

import pytest
import torch
import transformers

from pipeline.loss import IGNORE_INDEX
from tests.conftest import PROJECT_ROOT

SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


def tiny_model(name: str = "bart-tiny", vocab_size: int = 500):
    from pipeline.model import build_model, load_model_config

    torch.manual_seed(0)
    return build_model(load_model_config(name, vocab_size, SPECIALS))


def test_learned_position_embeddings_and_norms_get_no_weight_decay():
    from pipeline.model import weight_decay_groups

    model = tiny_model("bart-tiny")
    decay, no_decay = weight_decay_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"} <= kept
    assert not any("embed_positions" in n or "norm" in n or n.endswith(".bias") for n in decayed)
    assert "model.shared.weight" in decayed and "model.encoder.layers.0.fc1.weight" in decayed
    assert len(decayed) + len(kept) == len(list(model.parameters()))  # every trained parameter, once


def test_apex_without_its_cuda_extension_falls_back_to_torch_layer_norm_with_the_reason(monkeypatch):
    """A Python-only apex build imports apex.normalization fine, then FusedLayerNorm fails in __init__."""
    from pipeline.model import use_fused_layer_norm

    normalization = types.ModuleType("apex.normalization")

    class FusedLayerNorm(torch.nn.LayerNorm):
        def __init__(self, *args, **kwargs):
            import fused_layer_norm_cuda  # noqa: F401  (what apex's __init__ does)

            super().__init__(*args, **kwargs)

    normalization.FusedLayerNorm = FusedLayerNorm
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.normalization", normalization)
    monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", None)  # import raises ImportError
    model = tiny_model()
    kernel = use_fused_layer_norm(model, "cuda")
    assert kernel.startswith("torch.nn.LayerNorm") and "fused_layer_norm_cuda" in kernel
    assert all(type(m) is not FusedLayerNorm for m in model.modules())
    # with the extension present, the same stand-in is used on CUDA (the swap itself)
    monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", types.ModuleType("fused_layer_norm_cuda"))
    kernel = use_fused_layer_norm(model, "cuda")
    assert kernel.startswith("apex.normalization.FusedLayerNorm (")
    assert any(type(m) is FusedLayerNorm for m in model.modules())


def test_evaluation_and_checkpoint_time_is_left_out_of_the_metrics_window():
    from pipeline.metrics import MetricsWindow

    window = MetricsWindow(torch.device("cpu"))
    with window.paused():
        time.sleep(0.2)  # an evaluation or a save
    started = time.perf_counter()
    time.sleep(0.05)  # training
    trained = time.perf_counter() - started
    elapsed = time.perf_counter() - window.start - window.paused_s
    assert window.paused_s >= 0.2 and elapsed < trained + 0.1


def test_the_trainer_loop_pauses_the_window_around_evaluation_and_saves():
    """The loop starts a window at a log step, then evaluates and saves: both inside window.paused()."""
    source = (PROJECT_ROOT / "pipeline" / "trainer.py").read_text()
    loop = source[source.index("    def fit(self"):source.index("    def train_step(self)")]
    paused = loop.index("with self.window.paused():")
    assert loop.index("self.maybe_log(") < paused < loop.index("self.maybe_evaluate()") < loop.index("self.maybe_save()")


def test_label_positions_come_from_the_host_and_give_the_boolean_mask_loss():
    """The loader computes the labelled positions with the batch; the loss indexes with them (no sync) and
    equals the boolean-mask selection bit for bit."""
    from pipeline.loss import label_positions, seq2seq_loss, with_label_positions

    model = tiny_model().eval()
    labels = torch.randint(104, 500, (3, 8))
    labels[0, 5:] = IGNORE_INDEX
    labels[2, 1:] = IGNORE_INDEX
    batch = {"input_ids": torch.randint(104, 500, (3, 10)), "attention_mask": torch.ones(3, 10, dtype=torch.long),
             "decoder_input_ids": torch.randint(104, 500, (3, 8)), "labels": labels}
    positions = label_positions(labels)
    assert positions.dtype == torch.int64 and positions.tolist() == torch.nonzero(
        (labels != IGNORE_INDEX).flatten()).flatten().tolist()
    with torch.no_grad():
        from_host = seq2seq_loss(model, with_label_positions(batch))
        found_on_device = seq2seq_loss(model, batch)
        hidden = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    assert torch.equal(from_host, found_on_device)
    reference = torch.nn.functional.cross_entropy(hidden.float()[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    torch.testing.assert_close(from_host, reference, rtol=1e-6, atol=0)


def test_loaded_micro_batches_carry_their_label_positions(bart_examples_dir):
    from pipeline.batch_loader import PlannedBatchDataset
    from pipeline.collate import Seq2SeqCollator
    from pipeline.examples import ExampleShards
    from pipeline.sampler import PlannedBatch, SamplerState

    examples = ExampleShards(bart_examples_dir)
    dataset = PlannedBatchDataset(examples, Seq2SeqCollator(pad_id=0, decoder_start_id=101), lambda s, t: 0.0)
    plan = PlannedBatch(indices=[0, 1, 2, 3], epoch=0, state_after=SamplerState())
    loaded = dataset.__getitems__(plan)
    labels = loaded.tensors["labels"]
    assert torch.equal(loaded.tensors["label_positions"], torch.nonzero(labels.flatten() != IGNORE_INDEX).flatten())


def test_gradient_checkpointing_is_non_reentrant_on_every_transformers_version():
    """4.x and 5.x default to different torch.utils.checkpoint modes; the trainer asks for one."""
    from pipeline.model import build_training_model

    model, _ = build_training_model(None, tiny_model().config, "cpu", gradient_checkpointing=True, compiled=False)
    functions = [m._gradient_checkpointing_func for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert functions and all(f.func is torch.utils.checkpoint.checkpoint and f.keywords == {"use_reentrant": False}
                             for f in functions)
    assert model.config.use_cache is False


def test_ranks_started_by_a_launcher_get_the_project_on_pythonpath_and_the_launcher_is_a_module():
    from pipeline.distributed import deepspeed_launcher, launched_env

    env = launched_env({"PYTHONPATH": "/elsewhere"}, PROJECT_ROOT)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(PROJECT_ROOT), "/elsewhere"]
    assert launched_env({}, PROJECT_ROOT)["PYTHONPATH"] == str(PROJECT_ROOT)
    assert deepspeed_launcher() == [sys.executable, "-m", "deepspeed.launcher.runner"]
    source = (PROJECT_ROOT / "tests" / "test_gpu.py").read_text()
    assert '["deepspeed",' not in source and "*DEEPSPEED," in source


def test_the_throughput_bench_reads_the_data_from_zh_shared_data(tmp_path):
    env = {**os.environ, "ZH_SHARED_DATA": str(tmp_path)}
    import subprocess

    shown = subprocess.run([sys.executable, "-c", "import bench.train_throughput as m; print(m.SHARED)"],
                           env=env, capture_output=True, text=True, check=True, cwd=PROJECT_ROOT).stdout.strip()
    assert shown == str(tmp_path)


def test_the_peers_length_grouping_is_spelled_for_the_installed_transformers():
    from transformers import Seq2SeqTrainingArguments

    from bench import train_throughput

    for grouped in (True, False):
        arguments = Seq2SeqTrainingArguments(output_dir="unused", use_cpu=True, report_to=[],
                                             **train_throughput.length_grouping_argument(grouped))
        if TRANSFORMERS_4:
            assert arguments.group_by_length is grouped
        else:
            assert arguments.train_sampling_strategy == ("group_by_length" if grouped else "random")


@pytest.mark.slow  # inductor compiles the layers: ~25-50 s on 2 cores
def test_compiled_layers_give_the_eager_loss_and_gradients_and_keep_the_parameter_names():
    from pipeline.loss import seq2seq_loss, with_label_positions
    from pipeline.model import compile_layers

    eager, compiled = tiny_model().eval(), tiny_model().eval()
    assert compile_layers(compiled) == len(compiled.get_encoder().layers) + len(compiled.get_decoder().layers)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and exports unchanged
    torch.manual_seed(1)
    labels = torch.randint(104, 500, (4, 16))
    labels[1, 9:] = IGNORE_INDEX
    batch = with_label_positions({"input_ids": torch.randint(104, 500, (4, 24)),
                                  "attention_mask": torch.ones(4, 24, dtype=torch.long),
                                  "decoder_input_ids": torch.randint(104, 500, (4, 16)), "labels": labels})
    expected, actual = seq2seq_loss(eager, batch), seq2seq_loss(compiled, batch)
    expected.backward()
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
