"""What the tools show a user besides their results: a complete --help that answers without importing
torch, progress lines for long jobs, and a word before DeepSpeed's one-off JIT build."""

import argparse
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from esolm_dist import convert_cli, progress
from esolm_dist.inference import cli, likelihood

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "deepspeed", "megatron", "mlflow", "safetensors", "tokenizers", "numpy", "webdataset"}


def _options(parser: argparse.ArgumentParser):
    """Every option of the parser and of its subcommands' parsers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif action.option_strings:
            yield action


def _entries(help_text: str) -> dict[str, list[str]]:
    """Each option's entry in the help ('--flag METAVAR  text (default: X)'), whitespace collapsed."""
    entries: dict[str, list[str]] = {}
    for entry in re.split(r"\n  (?=-)", help_text)[1:]:
        words = entry.split()
        for word in words:
            if not word.startswith("-"):
                break
            entries.setdefault(word.rstrip(","), []).append(" ".join(words))
    return entries


@pytest.mark.parametrize("command,parser", [
    (["tools/convert.py"], convert_cli.build_parser()),
    (["-m", "esolm_dist.inference.cli"], cli.build_parser()),
    (["-m", "esolm_dist.inference.likelihood"], likelihood.build_parser()),
], ids=["convert", "sample", "likelihood"])
def test_help_shows_every_option_and_default_without_importing_torch(command, parser):
    """Bug caught: `convert.py --help` hiding every flag behind `export --help` and taking seconds to
    import torch and DeepSpeed before printing anything."""
    run = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    entries = _entries(run.stdout)
    for action in _options(parser):
        flag = action.option_strings[-1]
        assert flag in entries, f"{flag} is missing from {' '.join(command)} --help"
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS:
            assert any(f"(default: {action.default})" in entry for entry in entries[flag]), entries[flag]
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in run.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "argparse" in imported and not imported & HEAVY, sorted(imported & HEAVY)


def test_progress_in_a_log_is_a_line_per_interval(monkeypatch):
    stream = io.StringIO()
    with progress.Progress(8, "job: work", "things", stream=stream) as bar:
        for _ in range(8):
            bar.update()
    assert stream.getvalue() == ""  # a short job: quiet
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with progress.Progress(8, "job: work", "things", stream=stream) as bar:
        for _ in range(4):
            bar.update(2)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    for done, line in zip((2, 4, 6, 8), lines, strict=True):
        match = re.fullmatch(r"job: work: (\d+)/8 things \((\d+)%\), \d\d:\d\d elapsed, ETA (\S+)", line)
        assert match and int(match[1]) == done and int(match[2]) == round(100 * done / 8), line
    assert lines[-1].endswith("ETA 00:00")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_a_bar():
    stream = Terminal()
    with progress.Progress(8, "job", "things", stream=stream) as bar:
        bar.update(8)
    shown = stream.getvalue()
    assert shown.startswith("\rjob:") and "/8 [" in shown and "things/s" in shown


def test_jit_build_is_announced_only_when_it_will_happen(single_process, tmp_path, capsys):
    """Bug caught: the first export --verify (and first training run) sitting silent for ~3 minutes while
    DeepSpeed compiles its CPU communication op."""
    from esolm_dist.parallel.state import announce_jit_build

    capsys.readouterr()
    # init_parallel (the fixture) has had DeepSpeed build or load the op: where we look is where it is
    announce_jit_build(os.environ["TORCH_EXTENSIONS_DIR"])
    assert capsys.readouterr().err == ""
    announce_jit_build(str(tmp_path))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "building DeepSpeed's CPU communication op once" in err and str(tmp_path) in err
    announce_jit_build(str(tmp_path), "cpu_adam", "CPU Adam (for ZeRO-Offload)")
    assert "building DeepSpeed's CPU Adam (for ZeRO-Offload) once" in capsys.readouterr().err
