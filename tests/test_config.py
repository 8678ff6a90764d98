"""Training config: defaults, overrides, ``base:`` inheritance, path resolution, errors, shipped configs."""
from pathlib import Path

import pytest
import yaml

from facerec import cli
from facerec.config import SCHEMA, ConfigError, defaults, load_config, save_config, upgrade_model_section
from facerec.model_io import model_kwargs

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_cover_every_section_and_key():
    config = defaults()
    assert set(config) == set(SCHEMA)
    for section, keys in SCHEMA.items():
        assert set(config[section]) == set(keys)
    assert config["optim"]["momentum"] == 0.9 and config["train"]["resume"] == "auto"


def test_overrides_are_yaml_scalars_and_lists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path / "c.yaml", {"optim": {"lr": 0.2}})
    config = load_config(cfg, ["optim.lr=1e-3", "train.max_steps=7", "train.channels_last=false",
                               "model.norm_kwargs.using_bn=false", "schedule.milestones=[8, 14]",
                               "data.synth.identities=5", "head.type=cosface"])
    assert config["optim"]["lr"] == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string: accepted
    assert config["train"]["max_steps"] == 7 and config["train"]["channels_last"] is False
    assert config["model"]["norm_kwargs"] == {"using_bn": False}
    assert config["schedule"]["milestones"] == [8.0, 14.0]
    assert config["data"]["synth"]["identities"] == 5 and config["data"]["synth"]["seed"] == 0
    assert config["optim"]["momentum"] == 0.9  # untouched keys keep their defaults
    assert config["train"]["output_dir"] == str(tmp_path / "runs" / "c")


def test_paths_resolve_against_the_config_file_and_overrides_against_cwd(tmp_path, monkeypatch):
    (tmp_path / "conf" / "sub").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    write(tmp_path / "conf" / "base.yaml", {"data": {"train": "../data/set", "verify": ["a.bin"]}})
    child = write(tmp_path / "conf" / "sub" / "child.yaml", {"base": "../base.yaml", "optim": {"lr": 0.01}})
    monkeypatch.chdir(tmp_path / "work")
    config = load_config(child)
    assert config["data"]["train"] == str(tmp_path / "data" / "set")
    assert config["data"]["verify"] == [str(tmp_path / "conf" / "a.bin")]
    assert config["optim"]["lr"] == 0.01
    config = load_config(child, ["data.train=here", "train.output_dir=out"])
    assert config["data"]["train"] == str(tmp_path / "work" / "here")
    assert config["train"]["output_dir"] == str(tmp_path / "work" / "out")


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(None, ["model.name=iresnet18", "data.verify=[/x/a.bin]", "train.output_dir=/x/run"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lrr=1", "unknown key 'optim.lrr'; allowed: name, lr, momentum"),
    ("optimizer.lr=1", "unknown section 'optimizer'; allowed: model, head, data"),
    ("model.norm=batchnorm", "model.norm must be one of sn, syncsn, bn"),
    ("train.batch_size=big", "train.batch_size must be an integer, got str 'big'"),
    ("train.precision=fp8", "train.precision must be one of off, bf16, fp16"),
    ("model.input_size=100", "model.input_size must be a multiple of 16"),
    ("data.synth.people=3", "unknown key 'data.synth.people'; allowed: identities"),
    ("optim.lr", "override 'optim.lr' must look like section.key=value"),
    ("train.ddp_bucket_mb=0", "train.ddp_bucket_mb must be positive, got 0.0"),
    ("model.activation_checkpointing=1", "model.activation_checkpointing must be true or false"),
])
def test_bad_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_bad_configs_through_the_cli_exit_2_with_the_message(tmp_path, capsys):
    cfg = write(tmp_path / "c.yaml", {"optim": {"lrr": 0.1}})
    assert cli.main(["train", "--config", str(cfg)]) == 2
    assert "error: unknown key 'optim.lrr'; allowed: name, lr, momentum" in capsys.readouterr().err
    cfg = write(tmp_path / "c.yaml", {"train": {"epochs": "many"}})
    assert cli.main(["train", "--config", str(cfg)]) == 2
    assert "error: train.epochs must be an integer, got str 'many'" in capsys.readouterr().err
    cfg = write(tmp_path / "c.yaml", {"head": {"type": "arcfce"}})
    assert cli.main(["train", "--config", str(cfg)]) == 2
    assert "error: head.type must be one of arcface, cosface" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "error: config file not found" in capsys.readouterr().err
    cfg = write(tmp_path / "c.yaml", {"data": {"train": "missing_set"}, "train": {"device": "cpu"}})
    assert cli.main(["train", "--config", str(cfg), f"train.output_dir={tmp_path / 'run'}"]) == 2
    missing = tmp_path / "missing_set"
    assert f"error: data.train: no such file or directory: {missing}" in capsys.readouterr().err


def test_base_chain_loops_are_refused(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config["data"]["train"], f"{path.name} names no training set"


def test_bn_and_gn_twins_differ_from_sn_only_in_the_norm():
    for twin in (p for p in SHIPPED if "_bn_" in p.name or "_gn_" in p.name):
        sn = load_config(twin.with_name(twin.name.replace("_bn_", "_sn_").replace("_gn_", "_sn_")))
        other = load_config(twin)
        assert other["model"]["norm"] in ("bn", "gn")
        other["model"]["norm"] = "sn"
        other["train"]["output_dir"] = sn["train"]["output_dir"]
        assert other == sn, twin.name


def test_full_scale_configs_have_the_published_recipe():
    pfc = load_config(ROOT / "configs" / "glint360k_r100_sn_cosface_pfc.yaml")
    assert pfc["head"] == {**pfc["head"], "type": "cosface", "margin": 0.4, "sample_rate": 0.1}
    assert pfc["model"]["name"] == "iresnet100"
    one = load_config(ROOT / "configs" / "ms1mv3_r50_sn_arcface_1img.yaml")
    assert one["model"]["norm_kwargs"] == {"using_bn": False} and one["train"]["batch_size"] == 1


def test_old_last_gamma_key_is_refused_in_configs_and_mapped_in_checkpoints():
    """``last_gamma`` meant three things; backbones now take ``zero_init_residual``. A config that still
    writes ``model.norm_kwargs.last_gamma`` gets a clear error; a checkpoint saved with it (its config
    cannot be edited) is mapped, so it loads and resumes as the same model."""
    with pytest.raises(ConfigError, match="model.norm_kwargs.last_gamma .* model.zero_init_residual: true"):
        load_config(None, ["model.norm_kwargs.last_gamma=true"])
    config = load_config(None, ["model.zero_init_residual=true", "model.name=iresnet18"])
    old = {k: v for k, v in config["model"].items() if k != "zero_init_residual"}
    old["norm_kwargs"] = {"last_gamma": True}
    assert upgrade_model_section(old) == config["model"]
    assert model_kwargs({"model": old})["zero_init_residual"] is True
    older = {k: v for k, v in config["model"].items() if k != "zero_init_residual"}  # before the key
    assert upgrade_model_section(older) == load_config(None, ["model.name=iresnet18"])["model"]
