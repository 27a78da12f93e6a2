"""esolm-eval: generative perplexity under an evaluator causal LM (a random-weight GPT-2 built here,
nothing downloaded), unigram entropy, the sweep's files and MLflow run, and 2 processes == 1."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from esolm_dist.evaluation import cli
from esolm_dist.evaluation.entropy import unigram_entropy
from esolm_dist.evaluation.evaluator import CausalLMEvaluator
from esolm_dist.evaluation.gen_ppl import evaluator_ids, perplexity, sample_nll
from esolm_dist.inference.export_io import ExportConfig, training_run_card_line, write_export
from esolm_dist.inference.model import EsoLM

REPO = Path(__file__).resolve().parents[1]
TEXT = ["the masked diffusion model fills the sequence in any order",
        "then the autoregressive part writes the rest from left to right"] * 20
EXPORT_CONFIG = {"format": "esolm-export-v1", "vocab_size": 320, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                 "ffn_hidden_size": 64, "rotary_base": 10000.0, "layernorm_eps": 1e-5, "mask_token_id": 1,
                 "eos_token_id": 0, "max_seq_len": 32, "variant": "B", "alpha0": 0.5, "dtype": "float32"}
CONTEXT = 16  # the evaluator's n_positions: samples longer than this are scored in chunks
TRAINING_RUN = ("0123456789abcdef0123456789abcdef", "sqlite:///somewhere/mlflow.db")


def byte_level_bpe(vocab_size: int, specials: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory):
    """A GPT-2 from a config with random weights and a GPT-2-style tokenizer (<|endoftext|> = BOS = EOS),
    saved as a transformers folder."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("evaluator")
    tokenizer = byte_level_bpe(280, ["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(root)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def evaluator(evaluator_dir):
    return CausalLMEvaluator(str(evaluator_dir), batch_size=2)  # 2 chunks per forward: padding is exercised


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A random-weight export (tokenizer with <|endoftext|> = 0, [MASK] = 1) whose card names a training run."""
    root = tmp_path_factory.mktemp("exports")
    tokenizer_path = root / "tokenizer.json"
    byte_level_bpe(300, ["<|endoftext|>", "[MASK]"]).save(str(tokenizer_path))
    torch.manual_seed(0)
    model = EsoLM(ExportConfig.from_dict(EXPORT_CONFIG, "test config"), 300)
    card = f"# tiny\n\n{training_run_card_line(*TRAINING_RUN)}\n"
    return write_export(root / "tiny", EXPORT_CONFIG, model.state_dict(), tokenizer_path, card)


def nll_by_hand(model, chunk: list[int]) -> float:
    """-sum_{t>=1} log softmax(logits[t-1])[chunk[t]], one unpadded chunk at a time, float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([chunk])).logits[0].double()
    return sum(-(logits[t - 1] - logits[t - 1].logsumexp(0))[chunk[t]].item() for t in range(1, len(chunk)))


def test_gen_ppl_is_exp_of_the_token_weighted_mean_nll(evaluator):
    """Catches a mean of per-sample perplexities (not token-weighted), the chunk's first token counted
    as scored, chunks longer than the context, padding that leaks into the NLL (2 chunks per forward,
    different lengths), and a missing exp."""
    sequences = [list(range(3, 43)), [5, 9, 2, 7, 7], [0, 11]]  # 40 tokens: chunks of 16, 16, 8
    got = sample_nll(evaluator, sequences)
    chunks = [[list(range(3, 19)), list(range(19, 35)), list(range(35, 43))], [[5, 9, 2, 7, 7]], [[0, 11]]]
    want = [(sum(nll_by_hand(evaluator.model, c) for c in cs), sum(len(c) - 1 for c in cs)) for cs in chunks]
    assert [n for _, n in got] == [15 + 15 + 7, 4, 1] == [n for _, n in want]
    for (a, _), (b, _) in zip(got, want, strict=True):
        assert abs(a - b) < 1e-4 * abs(b)
    total_nll, total_tokens = sum(n for n, _ in want), sum(k for _, k in want)
    assert abs(perplexity(got) - math.exp(total_nll / total_tokens)) < 1e-4 * math.exp(total_nll / total_tokens)


def test_samples_are_cut_at_their_first_eos_and_retokenised(evaluator, export_dir):
    """Catches scoring past the first EOS, dropping the final EOS, a missing BOS, and export ids
    passed to the evaluator without retokenising."""
    from esolm_dist.inference.export_io import read_export

    tokenizer = read_export(export_dir).tokenizer
    words = tokenizer.encode("the masked model writes").ids
    sample = [*words, 0, *tokenizer.encode(" any order").ids, 0]
    text = tokenizer.decode(words)
    want = [0, *evaluator.tokenizer(text, add_special_tokens=False)["input_ids"], 0]
    assert evaluator_ids(sample, tokenizer, 0, evaluator) == want
    assert evaluator_ids(words, tokenizer, 0, evaluator) == want[:-1]  # no EOS: nothing appended


def test_unigram_entropy_of_constructed_samples():
    """Catches log base 2, entropy over distinct ids only (uniform), and counts not normalised."""
    assert unigram_entropy([4, 4, 4, 4, 4, 4]) == 0.0
    assert abs(unigram_entropy([1, 2, 1, 2]) - math.log(2)) < 1e-12
    assert abs(unigram_entropy([0, 1, 2, 3]) - math.log(4)) < 1e-12
    assert abs(unigram_entropy([7, 7, 7, 9]) - (-0.75 * math.log(0.75) - 0.25 * math.log(0.25))) < 1e-12


def eval_args(export_dir, evaluator_dir, out, *extra):
    return ["--model", str(export_dir), "--evaluator", str(evaluator_dir), "--num-samples", "5", "--length", "24",
            "--steps", "2", "8", "--batch-size", "2", "--top-p", "1.0", "--seed", "3", "--out", str(out), *extra]


def test_a_two_setting_sweep_writes_every_file_and_one_mlflow_run(export_dir, evaluator_dir, evaluator, tmp_path):
    """Catches a missing file or field, rows not matching their samples, samples of a setting not
    scored as one set, and an MLflow run without its metrics, artifacts or training-run link."""
    from mlflow.tracking import MlflowClient

    out, uri = tmp_path / "eval", f"sqlite:///{tmp_path}/mlflow.db"
    assert cli.main(eval_args(export_dir, evaluator_dir, out, "--mlflow-uri", uri)) == 0
    rows = json.loads((out / "results.json").read_text())
    export_tokenizer = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    assert [(r["method"], r["steps"], r["alpha0"]) for r in rows] == [("eso", 2, 0.5), ("eso", 8, 0.5)]
    for row in rows:
        assert {"nfe", "seconds", "gen_ppl", "entropy"} <= set(row) and row["num_samples"] == 5
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["method", "steps", "alpha0"] and "gen_ppl" in header
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 10 and all(len(s["token_ids"]) == 24 and s["seed"] == 3 for s in samples)
    for row in rows:
        mine = [s for s in samples if s["steps"] == row["steps"]]
        # recomputed from the samples: the sample's own ids re-scored by hand under the evaluator
        scored = [evaluator_ids(s["token_ids"], export_tokenizer, 0, evaluator) for s in mine]
        nll = sum(nll_by_hand(evaluator.model, c) for ids in scored for c in
                  [ids[i:i + CONTEXT] for i in range(0, len(ids), CONTEXT)])
        tokens = sum(len(ids) - math.ceil(len(ids) / CONTEXT) for ids in scored)
        assert abs(row["gen_ppl"] - math.exp(nll / tokens)) < 1e-4 * row["gen_ppl"]
        assert abs(row["entropy"] - sum(unigram_entropy(s["token_ids"]) for s in mine) / 5) < 1e-12
        assert 1 <= row["nfe"] <= 24
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("esolm-eval").experiment_id])
    assert (run.data.tags["esolm.training_run_id"], run.data.tags["esolm.training_tracking_uri"]) == TRAINING_RUN
    assert run.data.params["num_samples"] == "5"
    history = client.get_metric_history(run.info.run_id, "eso_alpha0_0.5/gen_ppl")
    assert sorted((m.step, m.value) for m in history) == [(2, rows[0]["gen_ppl"]), (8, rows[1]["gen_ppl"])]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "results.json", "results.csv", "samples.jsonl", "pareto.png"}


def launch(world_size: int, args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    prefix = ([sys.executable] if world_size == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size)])
    done = subprocess.run([*prefix, "-m", "esolm_dist.evaluation.cli", *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_give_the_result_of_one(export_dir, evaluator_dir, tmp_path):
    """Catches ranks drawing the same batches (duplicates), batches lost in the uneven split (3 batches
    on 2 ranks), seeds that depend on the rank, and rank 0 writing only its own share."""
    for world_size in (1, 2):
        launch(world_size, eval_args(export_dir, evaluator_dir, tmp_path / f"w{world_size}", "--no-mlflow"))
    one, two = ([json.loads(line) for line in (tmp_path / f"w{w}" / "samples.jsonl").read_text().splitlines()]
                for w in (1, 2))
    assert [s["token_ids"] for s in one] == [s["token_ids"] for s in two]
    assert len({tuple(s["token_ids"]) for s in one}) == 10
    assert [s["nll"] for s in one] == pytest.approx([s["nll"] for s in two], rel=1e-9)
    rows = [json.loads((tmp_path / f"w{w}" / "results.json").read_text()) for w in (1, 2)]
    assert len(rows[0]) == len(rows[1]) == 2
    for a, b in zip(*rows, strict=True):
        assert a.keys() == b.keys() and a["method"] == b["method"]
        for key in ("steps", "alpha0", "nfe", "gen_ppl", "entropy", "num_samples", "num_batches", "scored_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key


def test_the_model_card_of_an_export_names_its_training_run(tmp_path):
    """Catches convert.py's card losing the checkpoint's MLflow run (esolm-eval could not link to it)."""
    from esolm_dist.config import RunConfig, to_dict
    from esolm_dist.convert import model_card
    from esolm_dist.inference.export_io import read_training_run

    config = to_dict(RunConfig())
    meta = {"config": config, "step": 4, "layout": "tp1", "mlflow_run_id": TRAINING_RUN[0]}
    (tmp_path / "README.md").write_text(model_card(meta, tmp_path, use_ema=True))
    assert read_training_run(tmp_path) == (TRAINING_RUN[0], config["logging"]["mlflow_uri"])
    (tmp_path / "README.md").write_text(model_card({**meta, "mlflow_run_id": None}, tmp_path, use_ema=True))
    assert read_training_run(tmp_path) is None


def baseline_export(root: Path, model: str, tokenizer_source: Path) -> Path:
    """A random-weight export of one baseline model (config.json "model")."""
    config = {**EXPORT_CONFIG, "model": model, "block_size": 4}
    torch.manual_seed(1)
    weights = EsoLM(ExportConfig.from_dict(config, "test config"), 300).state_dict()
    return write_export(root / model, config, weights, tokenizer_source, f"# tiny {model}\n")


def test_gen_ppl_under_an_ar_export_is_exp_of_its_prefix_nlls(export_dir, tmp_path):
    """The evaluator may be an esolm-dist `ar` export. Expected NLLs come from one forward per prefix
    ([BOS], [BOS, x0], ...: input position i holds the token before target i), not from the causal mask
    of one forward; catches a missing shift, scoring the chunk's first token, and the wrong BOS."""
    from esolm_dist.evaluation.evaluator import ArExportEvaluator
    from esolm_dist.inference.export_io import read_export

    path = baseline_export(tmp_path, "ar", export_dir / "tokenizer.json")
    evaluator = ArExportEvaluator(str(path))
    assert evaluator.context_len == EXPORT_CONFIG["max_seq_len"] + 1 and evaluator.bos_id == 0
    model = EsoLM.from_export(read_export(path), "cpu", torch.float32).eval()

    def prefix_nll(chunk):
        total = 0.0
        for i in range(1, len(chunk)):
            with torch.no_grad():
                logits = model(torch.tensor([chunk[:i]]), torch.arange(i)[None])[0, -1].double()
            total -= float(logits.log_softmax(-1)[chunk[i]])
        return total

    sequences = [[0, *range(5, 60)], [0, 7, 8]]  # 56 tokens: chunks of 33 and 23 (context 33)
    got = sample_nll(evaluator, sequences)
    want = [(prefix_nll(s[:33]) + prefix_nll(s[33:]), 32 + 22) for s in sequences[:1]] + [(prefix_nll(sequences[1]), 2)]
    for (a, n), (b, m) in zip(got, want, strict=True):
        assert n == m and abs(a - b) < 1e-6 * abs(b)
    assert abs(perplexity(got) - math.exp(sum(b for b, _ in want) / 56)) < 1e-6 * perplexity(got)


def test_an_mdlm_export_is_refused_as_evaluator_in_one_line(export_dir, tmp_path, capsys):
    path = baseline_export(tmp_path, "mdlm", export_dir / "tokenizer.json")
    with pytest.raises(SystemExit, match=r"^esolm-eval: error: --evaluator \S+: \S+ is an mdlm export; an "
                                         r"evaluator export must be eso.model=ar$"):
        cli.main(["--model", str(export_dir), "--evaluator", str(path), "--num-samples", "1", "--length", "8",
                  "--steps", "2", "--no-mlflow", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("model, expected", [
    ("ar", [("ar", 2, 0.0)]),  # AR: one setting, NFE = L whatever T
    ("mdlm", [("mdlm", 2, 1.0), ("mdlm", 8, 1.0)]),
    ("bd3lm", [("bd3lm", 8, 1.0), ("bd3lm", 24, 1.0)]),
])
def test_baseline_exports_are_evaluated_with_their_own_sampler(export_dir, evaluator_dir, tmp_path, model, expected):
    path = baseline_export(tmp_path, model, export_dir / "tokenizer.json")
    steps = ["8", "24"] if model == "bd3lm" else ["2", "8"]  # bd3lm: at least one step per block of 4
    args = ["--model", str(path), "--evaluator", str(evaluator_dir), "--num-samples", "2", "--length", "24",
            "--steps", *steps, "--batch-size", "2", "--seed", "1", "--no-mlflow", "--out", str(tmp_path / "out")]
    assert cli.main(args) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["method"], r["steps"], r["alpha0"]) for r in rows] == expected
    if model == "ar":
        assert rows[0]["nfe"] == 24  # one token per step
    else:
        assert all(r["nfe"] <= r["steps"] for r in rows)
