"""Export: a training checkpoint -> a plain-torch model with the same logits; bad inputs fail clearly."""

import re
import shutil

import pytest
import torch
from conftest import TINY_TRAINING, tiny_config

from esolm_dist.checkpoint import CheckpointError
from esolm_dist.convert import export
from esolm_dist.convert_cli import main
from esolm_dist.inference.export_io import ExportError, read_export
from esolm_dist.inference.model import EsoLM
from esolm_dist.train import Trainer


@pytest.fixture(scope="module")
def trained(single_process, tmp_path_factory, shard_dir):
    run_dir = tmp_path_factory.mktemp("export_run")
    trainer = Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=2", "train.save_every=2", "optim.ema=0.5"))
    trainer.fit()
    return run_dir, trainer


def test_export_matches_the_trained_network(trained, tmp_path):
    run_dir, trainer = trained
    path = export(run_dir / "checkpoints" / "latest", tmp_path / "export", verify=True)
    model = EsoLM.from_pretrained(path)
    live = {k: v.detach() for k, v in trainer.network.state_dict().items() if isinstance(v, torch.Tensor)}
    exported = read_export(path).state_dict
    assert torch.equal(exported["embed.weight"], live["embedding.word.weight"])
    assert torch.equal(exported["head.weight"], live["head.output.weight"])
    # megatron's per-head [q, k, v] rows become [all q; all k; all v]
    heads, hidden = 2, 32
    qkv = live["blocks.0.qkv.weight"].view(heads, 3, hidden // heads, hidden)
    assert torch.equal(exported["blocks.0.attn.qkv.weight"][:hidden], qkv[:, 0].reshape(hidden, hidden))
    assert torch.equal(exported["blocks.0.attn.qkv.weight"][2 * hidden:], qkv[:, 2].reshape(hidden, hidden))
    assert model.config.variant == "B" and model.config.alpha0 == 0.25 and model.config.max_seq_len == 32


def test_ema_export_is_the_shadow(trained, tmp_path):
    run_dir, trainer = trained
    path = export(run_dir, tmp_path / "ema", use_ema=True)
    exported = read_export(path).state_dict
    # one process holds the whole EMA, as one flat slice (esolm_dist.ema)
    shadow = trainer.ema.shadow["network.embedding.word.weight"].view_as(trainer.network.embedding.word.weight)
    assert torch.equal(exported["embed.weight"], shadow)
    assert not torch.equal(exported["embed.weight"], trainer.network.embedding.word.weight.detach())


def test_bf16_export(trained, tmp_path):
    path = export(trained[0], tmp_path / "bf16", dtype="bf16", verify=True)
    assert read_export(path).state_dict["embed.weight"].dtype == torch.bfloat16


def test_verify_prints_the_tolerance_and_a_verdict(trained, tmp_path, monkeypatch, capsys):
    """PASS within the tolerance; an export whose weights differ from the checkpoint's (here: the output
    bias shifted by 0.01, which moves every logit by 0.01) is a FAIL with exit code 2."""
    from esolm_dist import convert

    argv = ["export", "--checkpoint", str(trained[0]), "--verify", "--out"]
    assert main([*argv, str(tmp_path / "good")]) == 0
    verdict = capsys.readouterr().out.splitlines()[0]
    match = re.fullmatch(r"esolm-convert: verify: max \|logit difference\| (\S+) <= tolerance 1e-05: PASS", verdict)
    assert match and float(match[1]) <= 1e-5, verdict

    def shifted(network, num_heads):
        weights = to_reference_layout(network, num_heads)
        return {**weights, "head.bias": weights["head.bias"] + 0.01}

    to_reference_layout = convert.to_reference_layout
    monkeypatch.setattr(convert, "to_reference_layout", shifted)
    assert main([*argv, str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    match = re.fullmatch(r"esolm-convert: error: verify: max \|logit difference\| (\S+) > tolerance 1e-05: FAIL; "
                         r"the export in \S+ does not match its checkpoint: report a bug", err)
    assert match and abs(float(match[1]) - 0.01) < 1e-3, err


def test_model_card_rounds_the_validation_nelbo(trained, tmp_path):
    from esolm_dist.checkpoint import read_meta
    from esolm_dist.checkpoint_reader import resolve_checkpoint

    meta = read_meta(resolve_checkpoint(trained[0]))
    card = (export(trained[0], tmp_path / "card") / "README.md").read_text()
    assert f"Last validation NELBO/token: {meta['val_nelbo']:.4f}." in card
    assert repr(meta["val_nelbo"]) not in card.split("## Training config")[0]
    assert "alpha0 = 0.25," in card


def corrupt_copy(trained, tmp_path):
    source = (trained[0] / "checkpoints" / "latest").read_text().strip()
    copy = tmp_path / "ckpt"
    shutil.copytree(trained[0] / "checkpoints" / source, copy)
    return copy


def test_bad_inputs_fail_with_one_line_errors(trained, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="not a complete esolm-dist checkpoint"):
        export(tmp_path, tmp_path / "out")
    truncated = corrupt_copy(trained, tmp_path)
    model_file = truncated / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is truncated or corrupt"):
        export(truncated, tmp_path / "out")
    model_file.unlink()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is missing"):
        export(truncated, tmp_path / "out")
    export(trained[0], tmp_path / "taken")
    with pytest.raises(ExportError, match="already exists"):
        export(trained[0], tmp_path / "taken")
    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("esolm-convert: error:") and "\n" not in err


def test_a_model_trained_here_has_no_reference_form(trained, tmp_path):
    """export --format reference reads training checkpoints too, and refuses what the paper's DiT cannot hold:
    the reference code appends the mask as the last token id (the bundled tokenizer's is id 1), and its block
    has no attention-output bias (ours trains one)."""
    with pytest.raises(ExportError, match="mask id is 1 of 4096 tokenizer ids; the reference code appends the mask"):
        export(trained[0], tmp_path / "paper.ckpt", format="reference")
    with pytest.raises(ExportError, match="--verify and --dtype apply to export folders"):
        export(trained[0], tmp_path / "paper.ckpt", verify=True, format="reference")
    assert not (tmp_path / "paper.ckpt").exists()


def test_a_new_run_starts_from_an_export(trained, tmp_path, shard_dir, capsys):
    """train.init_from=EXPORT: the export's weights go back to megatron's layout, into a new run;
    a model of another shape is refused with one line naming the key to set."""
    from esolm_dist.train import main

    run_dir, trainer = trained
    path = export(run_dir, tmp_path / "export")
    warm = Trainer(tiny_config(tmp_path / "warm", shard_dir, f"train.init_from={path}", "train.max_steps=2"))
    source = {k: v for k, v in trainer.network.state_dict().items() if isinstance(v, torch.Tensor)}
    loaded = {k: v for k, v in warm.network.state_dict().items() if isinstance(v, torch.Tensor)}
    assert loaded.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(loaded[name], tensor), name
    # once the new run has a checkpoint of its own, a restart resumes from it (a requeued job)
    warm.fit()
    trained_warm = {k: v.clone() for k, v in warm.network.state_dict().items() if isinstance(v, torch.Tensor)}
    again = Trainer(tiny_config(tmp_path / "warm", shard_dir, f"train.init_from={path}", "train.max_steps=2"))
    again.resume()
    assert again.state.step == 2
    for name, tensor in again.network.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, trained_warm[name]), name
    with pytest.raises(CheckpointError, match="has 2 layers, this run 3; set model.num_layers=2"):
        Trainer(tiny_config(tmp_path / "deeper", shard_dir, f"train.init_from={path}", "model.num_layers=3"))
    with pytest.raises(CheckpointError, match=r"gives shape \[.*\] here, the model has .*; set model.\*"):
        Trainer(tiny_config(tmp_path / "wider", shard_dir, f"train.init_from={path}", "model.hidden_size=64"))
    assert main([*TINY_TRAINING, f"train.run_dir={tmp_path / 'nothing'}", f"data.shard_dir={shard_dir}",
                 f"train.init_from={tmp_path / 'no-export'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"esolm-train: error: train.init_from={tmp_path / 'no-export'} does not exist; pass an export " \
                  "folder or a checkpoint"


def test_exact_likelihood_of_the_export_equals_the_training_network(trained, tmp_path, shard_dir, monkeypatch,
                                                                     capsys):
    """K = 1: the export's bound is -log p_sigma(x) of the training network for the same order (two
    implementations, one causal pass each); the CLI evaluates validation shards."""
    from esolm_dist import progress
    from esolm_dist.eso.likelihood import likelihood_order, order_log_likelihood
    from esolm_dist.inference.likelihood import evaluate_likelihood, main

    path = export(trained[0], tmp_path / "lik")
    model = EsoLM.from_pretrained(path)
    x = torch.randint(2, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    one = evaluate_likelihood(model, [x], 1, 0.25, seed=7)["nll_bound_per_token"]
    gen = torch.Generator().manual_seed(7)
    orders = torch.stack([likelihood_order(32, 0.25, gen) for _ in range(2)])
    network = trained[1].network.eval()
    with torch.no_grad():
        expected = -order_log_likelihood(lambda t, p, m: network(t, p, m), x, orders, model.mask_token_id).sum() / 64
    assert abs(one - float(expected)) < 1e-5
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a progress line at every pass, as in a long job's log
    assert main(["--model", str(path), "--shards", str(shard_dir), "--orders", "2", "--batches", "1"]) == 0
    assert "esolm-likelihood: causal passes: 2/2 passes (100%)" in capsys.readouterr().err
