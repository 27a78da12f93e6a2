"""The data tools as a user runs them: bad numbers and missing arguments are one-line errors
(exit 2), and no tool overwrites a file unless told to with --overwrite."""

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from esolm_dist.data.corpus import BUNDLED_CORPUS, iter_documents
from esolm_dist.data.tokenizer import BUNDLED_TOKENIZER, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def last_line_error(result: subprocess.CompletedProcess) -> str:
    """The error line of a failed tool, after checking it failed without a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "kjv.jsonl.gz"
    chapters = list(iter_documents([next(BUNDLED_CORPUS.glob("*.jsonl.gz"))]))[:40]
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"text": chapter}) + "\n" for chapter in chapters)
    return path


@pytest.mark.parametrize("option, value, message", [
    ("--seq-len", "0", "argument --seq-len: must be an integer >= 1, got 0"),
    ("--workers", "-1", "argument --workers: must be an integer >= 1, got -1"),
    ("--workers", "0", "argument --workers: must be an integer >= 1, got 0"),
    ("--val-fraction", "1.5", r"argument --val-fraction: must be in \[0, 1\), got 1.5"),
    ("--min-shards", "0", "argument --min-shards: must be an integer >= 1, got 0"),
    ("--shard-tokens", "0", "argument --shard-tokens: must be an integer >= 1, got 0"),
])
def test_make_shards_refuses_bad_numbers(small_corpus, tmp_path, option, value, message):
    args = {"--seq-len": "32", "--workers": "1", option: value}
    result = tool("make_shards.py", "--input", small_corpus, "--out", tmp_path / "out",
                  "--no-progress", *[item for pair in args.items() for item in pair])
    assert result.returncode == 2
    assert last_line_error(result).startswith("make_shards.py: error: ")
    assert re.search(message, last_line_error(result))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool_name, required", [
    ("make_shards.py", "--input, --seq-len, --out"),
    ("train_tokenizer.py", "--out"),
    ("build_corpus.py", "--out"),
])
def test_required_arguments_are_required(tool_name, required):
    before = hashlib.sha256(BUNDLED_TOKENIZER.read_bytes()).hexdigest()
    result = tool(tool_name)
    assert result.returncode == 2
    assert last_line_error(result).endswith(f"the following arguments are required: {required}")
    assert hashlib.sha256(BUNDLED_TOKENIZER.read_bytes()).hexdigest() == before


def test_make_shards_replaces_a_build_only_with_overwrite(small_corpus, tmp_path):
    out = tmp_path / "out"
    common = ["--input", small_corpus, "--seq-len", "32", "--workers", "1", "--no-progress",
              "--val-fraction", "0.1", "--out", out]
    assert tool("make_shards.py", *common).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = tool("make_shards.py", *common)
    assert refused.returncode == 1
    assert last_line_error(refused) == (f"error: {out} already holds a shard build "
                                        f"(manifest.json); pass --overwrite to replace the shard "
                                        f"build there (other files are kept), or choose an "
                                        f"empty --out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert tool("make_shards.py", *common, "--overwrite").returncode == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the same build again


def test_train_tokenizer_writes_only_a_new_file_or_with_overwrite(small_corpus, tmp_path):
    out = tmp_path / "tok.json"
    out.write_text("mine")
    refused = tool("train_tokenizer.py", "--input", small_corpus, "--vocab-size", "300",
                   "--out", out)
    assert refused.returncode == 2 and out.read_text() == "mine"
    assert last_line_error(refused).endswith(f"error: {out} exists; pass --overwrite to "
                                             f"replace it")
    small = tool("train_tokenizer.py", "--input", small_corpus, "--vocab-size", "100",
                 "--out", tmp_path / "new.json")
    assert small.returncode == 2 and "must be >= 258" in last_line_error(small)
    done = tool("train_tokenizer.py", "--input", small_corpus, "--vocab-size", "300",
                "--out", out, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert load_tokenizer(out).vocab_size == 300 and not list(tmp_path.glob("*.tmp"))


def test_build_corpus_refuses_an_existing_file(tmp_path):
    out = tmp_path / "corpus.jsonl.gz"
    out.write_bytes(b"mine")
    result = tool("build_corpus.py", "--out", out)
    assert result.returncode == 2 and out.read_bytes() == b"mine"
    assert last_line_error(result).endswith(f"error: {out} exists; pass --overwrite to replace it")
