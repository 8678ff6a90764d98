"""run.py study: the plan (lr scaling, virtual devices, SN without BN at one image per device), bad
settings refused, and tiny end-to-end studies: report shape, finished runs skipped, a changed config
redone, a killed run resumed, a diverging run recorded while the study goes on."""
import csv
import json
import os
import re
import signal
from pathlib import Path

import pytest

from data import generate_synthetic
from facerec.cli import main
from facerec.config import ConfigError, load_config
from facerec.study import parse_setting, plan_study, run_config, run_study

ROOT = Path(__file__).resolve().parents[1]
SYNTH_CONFIG = ROOT / "configs" / "study_synth.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory):
    """study_synth.yaml's model on a smaller pre-generated synthetic set, 4 steps a run."""
    root = tmp_path_factory.mktemp("study_data")
    generate_synthetic(root, identities=16, images_per_identity=8, size=32, seed=0, verify_identities=20,
                       verify_pairs=40, workers=1, progress=False)
    return [f"data.train={root}", f"data.verify=[{root / 'synth.bin'}]", "data.synth=", "train.max_steps=4",
            "train.checkpoint_every=2"]


def study(output: Path, overrides: list[str], *options: str) -> int:
    return main(["study", "--config", str(SYNTH_CONFIG), "--output", str(output), *options, *overrides])


def test_plan_scales_lr_with_the_batch_and_sets_virtual_devices():
    config = load_config(None, ["optim.lr=0.1", "study.reference_batch=256"])
    specs = {s.setting: s for s in plan_study(config, "out", norms=["bn", "gn", "sn"]) if s.norm == "sn"}
    assert list(specs) == ["8x32", "8x16", "8x8", "8x4", "8x2", "1x16", "1x32", "8x1", "1x8"]
    assert specs["8x32"].lr == pytest.approx(0.1)
    assert specs["8x4"].lr == pytest.approx(0.0125)
    assert specs["8x1"].lr == pytest.approx(0.003125)
    for setting, spec in specs.items():
        cfg = run_config(config, spec)
        gpus, per_device = parse_setting(setting)
        assert cfg["train"]["virtual_devices"] == gpus and cfg["train"]["batch_size"] == gpus * per_device
        assert cfg["train"]["output_dir"] == str(Path("out", f"sn_{setting}"))
        assert cfg["train"]["verify_every"] == 0 and cfg["train"]["progress"] is False
        assert cfg["train"]["resume"] == "auto"
        assert cfg["model"]["norm_kwargs"] == ({"using_bn": False} if per_device == 1 else {})
    quick = plan_study(config, "out", norms=["bn", "sn"], quick=True)
    assert [(s.norm, s.setting) for s in quick[:2]] == [("bn", "8x32"), ("sn", "8x32")]
    bn_one = [s for s in quick if s.norm == "bn" and s.per_device == 1][0]
    assert run_config(config, bn_one)["model"]["norm_kwargs"] == {}  # only SN drops its BN term


@pytest.mark.parametrize("bad", ["8x", "0x4", "8*4", "x", "8x-1", "eightx4"])
def test_bad_settings_are_refused_naming_the_item(bad):
    with pytest.raises(ValueError, match=re.escape(f"--settings: '{bad}' is not a setting GPUSxIMAGES")):
        parse_setting(bad, "--settings")
    with pytest.raises(ConfigError, match=re.escape(f"study.settings: '{bad}' is not a setting")):
        load_config(None, [f"study.settings=[8x32, '{bad}']"])


def test_bad_study_options_are_refused(capsys, tmp_path):
    with pytest.raises(ConfigError, match="study.norms: unknown norm 'xn'"):
        load_config(None, ["study.norms=[bn, xn]"])
    with pytest.raises(ConfigError, match="study.settings lists '8x4' more than once"):
        load_config(None, ["study.settings=[8x4, 8x4]"])
    config = load_config(None)
    with pytest.raises(ValueError, match="--settings or --quick, not both"):
        plan_study(config, "out", settings=["8x4"], quick=True)
    assert study(tmp_path / "s", [], "--settings", "8x4,8by2") == 2
    assert "--settings: '8by2' is not a setting GPUSxIMAGES" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_study_refuses_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = load_config(SYNTH_CONFIG)
    with pytest.raises(ValueError, match="not torchrun"):
        run_study(config, plan_study(config, tmp_path), tmp_path)


def test_smoke_study_report_skip_and_redo(data_overrides, tmp_path, capsys):
    out = tmp_path / "study"
    assert study(out, data_overrides) == 0
    md = (out / "study.md").read_text()
    table = md.split("## synth\n\n")[1].split("\n\n")[0].splitlines()
    assert table[0] == "|  | (8,4) | (8,1) |"
    assert [row.split(" | ")[0] for row in table[2:]] == ["| BN", "| SN", "| SN−BN"]
    assert all(cell.count("±") == 1 for row in table[2:4] for cell in row.strip("|").split("|")[1:])
    assert "## SN: learned importance" in md and "| (8,1) |" in md
    rows = list(csv.DictReader((out / "study.csv").open()))
    assert [(r["norm"], r["gpus"], r["per_device"], r["batch"], r["steps"], r["set"], r["status"])
            for r in rows] == [(norm, "8", b, str(8 * int(b)), "4", "synth", "done")
                               for b in ("4", "1") for norm in ("bn", "sn")]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and float(r["seconds"]) > 0 for r in rows)
    for name in ("study.png", "study_sn.png"):
        assert (out / name).stat().st_size > 1000
    sn_one = json.loads((out / "sn_8x1" / "result.json").read_text())
    assert {tuple(layer["terms"]) for layer in sn_one["sn_weights"]} == {("IN", "LN")}  # using_bn: false
    assert {tuple(layer["terms"]) for layer in json.loads((out / "sn_8x4" / "result.json").read_text())
            ["sn_weights"]} == {("IN", "LN", "BN")}

    # a run recorded before a config key existed (here: activation checkpointing) used that key's default
    recorded = json.loads((out / "sn_8x4" / "result.json").read_text())
    del recorded["config"]["model"]["activation_checkpointing"]
    (out / "sn_8x4" / "result.json").write_text(json.dumps(recorded))
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    capsys.readouterr()
    assert study(out, data_overrides) == 0  # everything finished: nothing trained again
    assert "4 of 4 runs already finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == stamps

    assert study(out, [*data_overrides, "train.max_steps=3"], "--norms", "bn", "--settings", "8x1") == 0
    assert "bn_8x1: the config changed since its run (train.max_steps)" in capsys.readouterr().out
    assert json.loads((out / "bn_8x1" / "result.json").read_text())["steps"] == 3
    previous = list((out / "bn_8x1").glob("previous-*/result.json"))
    assert len(previous) == 1 and json.loads(previous[0].read_text())["steps"] == 4


def test_interrupted_study_resumes_its_run(data_overrides, tmp_path, monkeypatch, capsys):
    """Ctrl-C (a real SIGINT) during a run: the run stops with a checkpoint, the study says how to go on;
    the same command again resumes that run from its checkpoint instead of starting over."""
    import facerec.train

    real_train = facerec.train.train

    def interrupted_at_step_5(config, on_step=None):
        def step(done, total):
            on_step(done, total)
            if done == 5:
                os.kill(os.getpid(), signal.SIGINT)
        return real_train(config, on_step=step)

    out = tmp_path / "study"
    overrides = [*data_overrides, "train.max_steps=8"]
    monkeypatch.setattr(facerec.train, "train", interrupted_at_step_5)
    assert study(out, overrides, "--norms", "bn", "--settings", "8x4") == 130
    assert "run the same command to resume" in capsys.readouterr().out
    assert not (out / "bn_8x4" / "result.json").exists()
    assert (out / "bn_8x4" / "checkpoints" / "step_5.pt").exists()
    monkeypatch.setattr(facerec.train, "train", real_train)

    assert study(out, overrides, "--norms", "bn", "--settings", "8x4") == 0
    assert "resumed from" in (out / "bn_8x4" / "train.log").read_text()
    result = json.loads((out / "bn_8x4" / "result.json").read_text())
    assert result["status"] == "done" and result["steps"] == 8


def test_diverging_run_is_recorded_and_the_study_goes_on(data_overrides, tmp_path):
    """Weight decay at lr * wd far above SGD's stability limit makes the weights grow geometrically: the
    (8,8) run's lr (48, 32 times that of (1,2)) diverges within 6 steps; (1,2) at lr 1.5 trains on."""
    out = tmp_path / "study"
    overrides = [*data_overrides, "train.max_steps=6", "optim.weight_decay=1.0", "optim.lr=1.5",
                 "study.reference_batch=2"]
    assert study(out, overrides, "--norms", "bn", "--settings", "8x8,1x2") == 0
    diverged = json.loads((out / "bn_8x8" / "result.json").read_text())
    assert diverged["status"] == "diverged" and "not finite" in diverged["reason"]
    assert json.loads((out / "bn_1x2" / "result.json").read_text())["status"] == "done"
    table = (out / "study.md").read_text().split("## synth\n\n")[1].split("\n\n")[0].splitlines()
    assert table[2].startswith("| BN | — | ")
    assert "- — BN (8,8): training diverged" in (out / "study.md").read_text()
    rows = {r["batch"]: r for r in csv.DictReader((out / "study.csv").open())}
    assert rows["64"]["status"] == "diverged" and rows["64"]["accuracy"] == "" and rows["64"]["reason"]
    assert rows["2"]["status"] == "done"
