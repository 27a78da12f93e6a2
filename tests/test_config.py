"""Config: typed, validated once, one-line errors naming the key; the quickstart file equals the defaults."""

from pathlib import Path

import pytest

from esolm_dist.config import ConfigError, RunConfig, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_file_equals_builtin_defaults():
    assert to_dict(load_config(REPO / "configs" / "quickstart.yaml")) == to_dict(RunConfig())


@pytest.mark.parametrize("name", ["quickstart", "small", "1b"])
def test_shipped_configs_validate(name):
    load_config(REPO / "configs" / f"{name}.yaml")


def test_small_config_is_the_papers_model():
    cfg = load_config(REPO / "configs" / "small.yaml")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.num_layers, m.hidden_size, m.num_heads, m.seq_len) == (12, 768, 12, 1024)
    assert (o.lr, o.warmup_steps, t.global_batch_size, o.ema) == (3e-4, 2500, 512, 0.9999)


@pytest.mark.parametrize("overrides, message", [
    (["eso.variant=C"], "'eso.variant' is 'C'; allowed values: A, B"),
    (["model.hiden_size=64"], "unknown config key 'model.hiden_size'"),
    (["model.hidden_size=abc"], "'model.hidden_size' must be an integer"),
    (["model.hidden_size=130"], "divisible by model.num_heads"),
    (["eso.alpha0=1.5"], "'eso.alpha0' must be in [0, 1]"),
    (["train.micro_batch_size=6"], "must be an even integer"),
    (["train.global_batch_size=20"], "multiple of train.micro_batch_size"),
    (["parallel.tensor=3"], "divisible by parallel.tensor"),
    (["parallel.pipeline=3"], "model.num_layers (4) must be divisible by parallel.pipeline (3)"),
    (["parallel.pipeline=2", "parallel.zero_stage=2"], "DeepSpeed supports only ZeRO-0/1 with pipeline"),
    (["parallel.zero_stage=4"], "allowed values: 0, 1, 2, 3"),
    (["train.max_steps"], "must look like section.key=value"),
    # ranges that reached torch (a traceback) or were accepted before
    (["optim.beta1=1.5"], "'optim.beta1' must be in [0, 1), got 1.5"),
    (["optim.beta2=-0.1"], "'optim.beta2' must be in [0, 1), got -0.1"),
    (["optim.lr=inf"], "'optim.lr' must be a finite number, got 'inf'"),
    (["optim.lr=.nan"], "'optim.lr' must be a finite number, got nan"),
    (["optim.lr=0"], "'optim.lr' must be > 0, got 0.0"),
    (["optim.warmup_steps=-5"], "'optim.warmup_steps' must be >= 0, got -5"),
    (["optim.adam_eps=0"], "'optim.adam_eps' must be > 0, got 0.0"),
    (["optim.weight_decay=-0.1"], "'optim.weight_decay' must be >= 0, got -0.1"),
    (["optim.grad_clip=-1"], "'optim.grad_clip' must be >= 0"),
    (["optim.min_lr_ratio=0"], "'optim.min_lr_ratio' must be in (0, 1], got 0.0"),
    (["optim.ema=1"], "'optim.ema' must be in [0, 1), got 1.0"),
    (["model.layernorm_eps=0"], "'model.layernorm_eps' must be > 0, got 0.0"),
    (["model.rotary_base=-1"], "'model.rotary_base' must be > 0, got -1.0"),
    (["model.init_std=0"], "'model.init_std' must be > 0, got 0.0"),
    (["model.ffn_hidden_size=-4"], "'model.ffn_hidden_size' must be >= 0"),
    (["model.dropout=1"], "'model.dropout' must be in [0, 1), got 1.0"),
    (["eso.eps=0"], "'eso.eps' must be in (0, 0.5), got 0.0"),
    (["train.seed=-1"], "'train.seed' must be >= 0, got -1"),
    (["train.keep_last=0"], "'train.keep_last' must be >= 1, got 0"),
    (["data.val_fraction=1"], "'data.val_fraction' must be in [0, 1), got 1.0"),
    (["data.num_workers=-1"], "'data.num_workers' must be >= 0, got -1"),
    (["train.overwrite=true"], "train.overwrite=true needs train.resume=false"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_overrides_are_typed():
    cfg = load_config(None, ["eso.alpha0=0.125", "parallel.cpu_offload=true", "parallel.zero_stage=1",
                             "data.corpus=a,b"])
    assert cfg.eso.alpha0 == 0.125 and cfg.parallel.cpu_offload is True and cfg.data.corpus == ["a", "b"]
    assert cfg.eso.kappa == 0.5
    assert load_config(None, ["eso.alpha0=1"]).eso.kappa == 1.0


def test_help_lists_every_key_with_default_type_and_allowed_values(capsys):
    """Bug caught: a config key missing from `esolm-train --help`, or shown with a wrong default or range."""
    from esolm_dist.config import flatten
    from esolm_dist.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split("=")[0].strip() for line in lines if line.startswith("  ") and "=" in line}
    assert listed >= set(flatten(to_dict(RunConfig()))), set(flatten(to_dict(RunConfig()))) - listed
    for expected in ("  optim.beta1=0.9  (float; in [0, 1))", "  eso.variant=B  (str; A, B)",
                     "  train.max_steps=400  (int; >= 1)", "  train.resume=true  (true or false)",
                     "  data.corpus=bundled  (comma-separated list)", "  optim.min_lr_ratio=1.0  (float; in (0, 1])",
                     "  parallel.zero_stage=0  (int; 0, 1, 2, 3)"):
        assert expected in lines, expected
