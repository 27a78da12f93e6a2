"""The seams between the model, its parallelism and the loop: pipeline stages cut from the one model,
the engine adapter's steps, the weights' layout, and each training callback on its own."""

from __future__ import annotations

import math
import subprocess
import sys
import types

import pytest
import torch
from conftest import MASK_ID, TINY_VOCAB, random_tokens, tiny_config

from esolm_dist.eso.rows import build_rows


def rows_of(seed: int, length: int = 8, batch: int = 4):
    return build_rows(random_tokens(batch, length, seed), alpha0=0.5, kappa=0.5, variant="B", loss_type="elbo",
                      eps=1e-3, mask_id=MASK_ID, generator=torch.Generator().manual_seed(seed))


# ---- pipeline stages are views of the one model -------------------------------------------------------
def test_pipeline_stages_share_the_models_weights_and_compute_its_loss(tiny_network):
    from esolm_dist.model.objective import EsoObjective, row_tensors
    from esolm_dist.parallel.pipeline import pipeline_inputs, pipeline_module

    objective = EsoObjective(tiny_network, "B", tiny_network.cfg.seq_len)
    module = pipeline_module(objective, tp=1, pp=1, dp=1, activation_checkpointing=False)
    network_params = {id(p) for p in tiny_network.parameters()}
    assert {id(p) for p in module.parameters()} == network_params  # the same tensors, none built twice
    # every stage keeps its component's own names (layer 0 = embedding, 1..L = blocks, L + 1 = head)
    assert set(module.state_dict()) == ({f"0.{k}" for k in tiny_network.embedding.state_dict()}
                                        | {f"{i + 1}.{k}" for i, b in enumerate(tiny_network.blocks)
                                           for k in b.state_dict()}
                                        | {f"{len(tiny_network.blocks) + 1}.{k}" for k in tiny_network.head.state_dict()})
    rows = rows_of(0)
    inputs, labels = pipeline_inputs(rows)
    with torch.no_grad():
        expected = objective(*row_tensors(rows))
        logits = module(inputs)
        got = module.loss_fn(logits, labels)
    assert torch.allclose(got, expected["loss"], rtol=0, atol=1e-6)
    parts = module.loss_fn.take()
    assert torch.allclose(parts, torch.stack([expected[k] for k in ("loss", "loss_diffusion", "loss_sequential")]))


def test_a_stage_moved_to_meta_frees_its_components_weights(tiny_network):
    from esolm_dist.parallel.pipeline import HeadStage

    stage = HeadStage(tiny_network.head)
    stage.to("meta")
    assert tiny_network.head.output.weight.is_meta and tiny_network.head.blocked.is_meta
    assert not tiny_network.embedding.word.weight.is_meta


# ---- the engine adapter -----------------------------------------------------------------------------
def test_plain_engine_step_returns_the_mean_loss_parts_of_its_micro_batches(tiny_network):
    from esolm_dist.config import load_config
    from esolm_dist.model.objective import EsoObjective, row_tensors
    from esolm_dist.model.transformer import EsoTransformer
    from esolm_dist.parallel.engine import build_engine
    from esolm_dist.parallel.state import Topology

    twin = EsoTransformer(tiny_network.cfg, TINY_VOCAB, MASK_ID)
    twin.load_state_dict(tiny_network.state_dict())
    reference = EsoObjective(twin.eval(), "B", tiny_network.cfg.seq_len)
    micro = [rows_of(seed) for seed in (1, 2, 3)]
    with torch.no_grad():  # the optimizer steps after the last micro-batch: all see the initial weights
        outs = [reference(*row_tensors(r)) for r in micro]
    expected = torch.tensor([sum(float(o[k]) for o in outs) / 3 for k in ("loss", "loss_diffusion", "loss_sequential")])
    cfg = load_config(None, ["train.global_batch_size=12", "train.micro_batch_size=4", "optim.ema=0"])
    engine = build_engine(EsoObjective(tiny_network, "B", tiny_network.cfg.seq_len), cfg,
                          Topology.single_process(torch.device("cpu")))
    try:
        before = tiny_network.head.output.bias.detach().clone()
        got = engine.train_step(iter(micro), micro_batches=3)
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.equal(before, tiny_network.head.output.bias)  # one optimizer step was taken
        assert math.isfinite(engine.grad_norm()) and engine.lr() > 0
        evaluated = engine.eval_step(iter(micro[:1]), micro_batches=1)
        with torch.no_grad():
            after = EsoObjective(tiny_network, "B", tiny_network.cfg.seq_len)(*row_tensors(micro[0]))["loss"]
        assert torch.allclose(evaluated[0], after, atol=1e-6)
    finally:
        engine.destroy()


# ---- the weights' layout ----------------------------------------------------------------------------
# megatron-core's convention, written out by hand: column-parallel layers split their output rows (dim 0,
# bias too), row-parallel ones their input columns (dim 1; the bias is replicated); LayerNorms replicated.
MEGATRON_DIMS = {"embedding.word.weight": 0, "blocks.0.qkv.weight": 0, "blocks.0.out.weight": 1,
                 "blocks.0.out.bias": None, "blocks.0.fc1.weight": 0, "blocks.0.fc1.bias": 0,
                 "blocks.0.fc2.weight": 1, "blocks.0.fc2.bias": None, "blocks.0.ln1.weight": None,
                 "blocks.0.ln2.bias": None, "head.final_ln.weight": None, "head.output.weight": 0,
                 "head.output.bias": 0, "blocks.11.qkv.weight": 0}


def test_partition_dims_come_from_megatrons_attributes_without_process_groups():
    """In a fresh process with no parallel groups (an offline export), and leaving megatron as it was."""
    script = ("import json\nfrom megatron.core import parallel_state as ps\nfrom esolm_dist.weight_layout import "
              f"partition_dim\nprint(json.dumps({{n: partition_dim(n) for n in {list(MEGATRON_DIMS)!r}}}))\n"
              "try:\n    ps.get_tensor_model_parallel_world_size()\n    print('still set')\n"
              "except AssertionError:\n    print('restored')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    import json

    assert json.loads(out[0]) == MEGATRON_DIMS and out[1] == "restored"


def test_merge_and_slice_invert_each_other_along_megatrons_dims(tiny_network):
    from esolm_dist.weight_layout import (
        VOCAB_ROWS,
        merge_tensor_parallel,
        network_parameters,
        tensor_parallel_slice,
    )

    params = {name: p for _, name, p in network_parameters(tiny_network) if name not in VOCAB_ROWS}
    full = {name: p.detach() for name, p in params.items()}
    shards = [{name: tensor_parallel_slice(t, params[name], name, rank, 2) for name, t in full.items()}
              for rank in range(2)]
    assert torch.equal(shards[1]["blocks.0.out.weight"], full["blocks.0.out.weight"][:, 16:])  # row-parallel: columns
    assert torch.equal(shards[1]["blocks.0.qkv.weight"], full["blocks.0.qkv.weight"][48:])  # column-parallel: rows
    assert torch.equal(shards[1]["blocks.0.ln1.weight"], full["blocks.0.ln1.weight"])  # replicated
    merged = merge_tensor_parallel(shards)
    assert all(torch.equal(merged[name], full[name]) for name in full)


def test_vocabulary_rows_are_padded_to_the_layouts_vocabulary_before_slicing():
    from esolm_dist.weight_layout import tensor_parallel_slice

    full = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)  # 5 tokenizer rows
    shard = torch.nn.Parameter(torch.empty(4, 3))  # TP=2 shard of a vocabulary padded to 8
    shard.tensor_model_parallel, shard.partition_dim = True, 0
    assert torch.equal(tensor_parallel_slice(full, shard, "embedding.word.weight", 0, 2), full[:4])
    assert torch.equal(tensor_parallel_slice(full, shard, "embedding.word.weight", 1, 2),
                       torch.cat([full[4:], torch.zeros(3, 3)]))
    cut = tensor_parallel_slice(torch.ones(10, 3), torch.nn.Parameter(torch.empty(8, 3)), "head.output.weight", 0, 1)
    assert cut.shape == (8, 3)  # a larger source vocabulary is cut to this layout's


# ---- callbacks, each alone --------------------------------------------------------------------------
def fake_trainer(step: int, max_steps: int = 10, **extra):
    state = types.SimpleNamespace(step=step, consumed_samples=step * 8, last_val_nelbo=None, best_val_nelbo=None,
                                  saved_at=0)
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(log_every=5, eval_every=4, save_every=3,
                                                           max_steps=max_steps),
                                model=types.SimpleNamespace(seq_len=16))
    trainer = types.SimpleNamespace(state=state, cfg=cfg, topo=types.SimpleNamespace(world_size=2,
                                                                                      device=torch.device("cpu")),
                                    said=[], recorded=[], stopping=False, summary={}, **extra)
    trainer.due = lambda every: state.step % every == 0 or state.step == max_steps
    trainer.evaluation_due = lambda: trainer.due(cfg.train.eval_every)
    trainer.say = lambda message, from_logging_rank=False: trainer.said.append(message)
    trainer.record = lambda group, metrics: trainer.recorded.append((group, dict(metrics)))
    return trainer


def test_throughput_rates_of_a_window():
    from esolm_dist.callbacks import Throughput

    meter = types.SimpleNamespace(take_window=lambda: (3, 2.0))
    trainer = fake_trainer(step=5, meter=meter)
    callback = Throughput(flops_per_step=1e9, hardware_flops_per_step=2e9, peak_flops=1e10, peak_source="test",
                          tokens_per_step=8 * 16)
    metrics = {"loss": 1.0}
    callback.on_step_end(trainer, metrics)
    # 3 steps of 128 tokens in 2 s; MFU = FLOPs per second / (peak x 2 processes)
    assert metrics["tokens_per_s"] == 3 * 128 / 2.0 and metrics["step_time_s"] == 2.0 / 3
    assert metrics["mfu"] == pytest.approx(1e9 * 3 / 2.0 / 2e10) and metrics["hfu"] == pytest.approx(2 * metrics["mfu"])
    assert metrics["tokens_seen"] == 5 * 8 * 16
    untouched = {"loss": 1.0}
    callback.on_step_end(fake_trainer(step=4, meter=meter), untouched)  # not a log step
    assert untouched == {"loss": 1.0}


def test_evaluation_keeps_the_best_nelbo_and_records_the_bound():
    from esolm_dist.callbacks import Evaluation

    values = iter([3.0, 2.0, 2.5])
    trainer = fake_trainer(step=4)
    trainer.evaluate = lambda: {"nelbo": next(values), "loss_diffusion": 1.0, "loss_sequential": 1.0}
    callback = Evaluation()
    for step in (4, 5, 8, 10):  # 5 is not an evaluation step
        trainer.state.step = step
        callback.on_step_boundary(trainer)
    assert [m["nelbo"] for _, m in trainer.recorded] == [3.0, 2.0, 2.5]
    assert trainer.recorded[1][1]["ppl_bound"] == pytest.approx(math.exp(2.0))
    assert trainer.state.last_val_nelbo == 2.5 and trainer.state.best_val_nelbo == 2.0


def test_checkpointing_saves_when_due_and_when_stopping(monkeypatch):
    from esolm_dist.callbacks import Checkpointing

    saved = []
    monkeypatch.setattr(Checkpointing, "save", lambda self, trainer: saved.append(trainer.state.step))
    trainer = fake_trainer(step=0, max_steps=10)
    callback = Checkpointing()
    for step in range(1, 11):
        trainer.state.step = step
        trainer.stopping = step == 7
        callback.on_step_boundary(trainer)
    assert saved == [3, 6, 7, 9, 10]
    assert any("stop signal received" in message for message in trainer.said)


def test_stop_callback_sets_stopping_once_signalled(single_process):
    from esolm_dist.callbacks import StopOnSignal
    from esolm_dist.signals import StopRequest

    request = StopRequest()
    trainer = fake_trainer(step=1)
    callback = StopOnSignal(request)
    callback.on_step_end(trainer, None)
    assert trainer.stopping is False
    request.received = 15
    callback.on_step_end(trainer, None)
    assert trainer.stopping is True


def test_the_loop_calls_the_hooks_in_order_and_reads_metrics_only_at_log_and_save_steps(single_process, tmp_path,
                                                                                       shard_dir):
    from esolm_dist.callbacks import Callback
    from esolm_dist.train import Trainer

    class Recorder(Callback):
        def __init__(self):
            self.events = []

        def on_train_start(self, trainer):
            self.events.append(("start", trainer.state.step))

        def on_step_end(self, trainer, metrics):
            self.events.append(("end", trainer.state.step, metrics is not None))

        def on_step_boundary(self, trainer):
            self.events.append(("boundary", trainer.state.step))

        def on_train_end(self, trainer, finished):
            self.events.append(("finish", trainer.state.step, finished))

    trainer = Trainer(tiny_config(tmp_path / "run", shard_dir, "train.max_steps=4", "train.log_every=3",
                                  "train.save_every=2", "train.eval_every=4", "logging.samples=0",
                                  "train.eval_batches=1"))
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    trainer.fit()
    assert recorder.events == [("start", 0), ("end", 1, False), ("boundary", 1), ("end", 2, True), ("boundary", 2),
                               ("end", 3, True), ("boundary", 3), ("end", 4, True), ("boundary", 4),
                               ("finish", 4, True)]
    trainer.engine.destroy()


def test_meter_windows_count_their_own_steps_and_training_seconds(monkeypatch):
    """An off-schedule evaluation or save inside a window is excluded from its seconds, and the
    window's step count starts again with its timer (else tokens/s and MFU are inflated)."""
    from esolm_dist import meter as meter_module

    now = [0.0]
    monkeypatch.setattr(meter_module.time, "perf_counter", lambda: now[0])
    meter = meter_module.StepMeter(first_step=0, max_steps=10)
    now[0] = 1.0
    meter.count_step()
    now[0] = 2.0
    meter.count_step()
    meter.pause()  # an evaluation or save between steps: 10 s
    now[0] = 12.0
    meter.resume()
    now[0] = 13.0
    meter.count_step()
    assert meter.take_window() == (3, 3.0)
    now[0] = 14.0
    meter.count_step()
    assert meter.take_window() == (1, 1.0)
    assert (meter.total_steps, meter.total_seconds) == (4, 4.0)
    assert meter.elapsed() == 14.0  # wall clock, the evaluation included


def test_a_stop_signal_after_the_loop_cannot_kill_the_process_while_it_exits():
    """Caught by the SLURM test under load: a resent SIGUSR1 landing while Python shuts down (CPython
    resets the signals it handles to their default action, terminate, but leaves ignored ones ignored)
    failed the job instead of requeueing it. After the loop the stop signal is ignored at the OS level."""
    script = ("import os, signal\nfrom esolm_dist.signals import StopRequest\nrequest = StopRequest()\n"
              "print(signal.getsignal(signal.SIGUSR1) == request._handle)\nrequest.stop_listening()\n"
              "print(signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN)\nos.kill(os.getpid(), signal.SIGUSR1)\n"
              "print(request.received)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "True", "None"], (proc.returncode, proc.stderr[-500:])
