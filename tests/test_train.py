"""Trainer: parameter groups, schedules, a short run that learns, mixed precision, divergence handling."""
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from backbones import build_backbone
from data import decode_image, load_bin
from eval.verification import evaluate
from facerec.checkpoint import load_checkpoint, step_checkpoints
from facerec.config import load_config
from facerec.optim import build_optimizer, lr_factor, param_groups
from facerec.train import TrainingDiverged, train
from losses import build_head

TINY = ["model.name=iresnet18", "model.width=8", "model.input_size=32", "model.embedding_size=32",
        "head.scale=16", "head.margin=0.2", "data.num_workers=0", "train.progress=false",
        "train.device=cpu", "train.batch_size=32", "train.log_every=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    """Where the trainer generates a small synthetic set on first use (data.synth)."""
    return tmp_path_factory.mktemp("synth") / "set"


def tiny_config(synth_dir: Path, run_dir: Path, *overrides: str) -> dict:
    synth = ["data.synth.identities=16", "data.synth.images_per_identity=12", "data.synth.size=32",
             "data.synth.seed=3", "data.synth.verify_identities=20", "data.synth.verify_pairs=200"]
    data = [f"data.train={synth_dir}", f"data.verify=[{synth_dir}/synth.bin]"]
    return load_config(None, [*TINY, *synth, *data, f"train.output_dir={run_dir}", *overrides])


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_param_groups_exclude_norms_biases_and_prelu_from_weight_decay():
    backbone = build_backbone("iresnet18", norm="sn", embedding_size=16, input_size=32, width=8)
    head = build_head({"type": "arcface"}, embedding_size=16, num_classes=10)
    optim = load_config(None, ["optim.sn_lr_scale=0.5", "optim.sn_weight_decay=1e-5", "optim.momentum=0.8",
                               "optim.head_lr_scale=2"])["optim"]
    groups = {g["name"]: g for g in param_groups(backbone, head, optim)}
    names = {id(p): n for n, p in backbone.named_parameters()}
    assert all(p.ndim > 1 for p in groups["backbone"]["params"])
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"]) and groups["no_decay"]["weight_decay"] == 0
    assert any("prelu" in names[id(p)] for p in groups["no_decay"]["params"])
    mixing = {names[id(p)].rsplit(".", 1)[1] for p in groups["sn_mix"]["params"]}
    assert mixing == {"mean_weight", "var_weight"}
    assert groups["sn_mix"]["lr"] == pytest.approx(0.05) and groups["sn_mix"]["weight_decay"] == 1e-5
    assert groups["head"]["params"] == [head.weight] and groups["head"]["lr"] == pytest.approx(0.2)
    assert not backbone.features.weight.requires_grad
    grouped = {id(p) for g in groups.values() for p in g["params"]}
    assert id(backbone.features.weight) not in grouped  # the frozen BatchNorm1d gamma is left out
    assert grouped == {id(p) for p in [*backbone.parameters(), *head.parameters()] if p.requires_grad}
    sgd = build_optimizer(list(groups.values()), optim)
    assert isinstance(sgd, torch.optim.SGD) and all(g["momentum"] == 0.8 for g in sgd.param_groups)
    adam_cfg = {**optim, "name": "adamw"}
    adamw = build_optimizer(param_groups(backbone, head, adam_cfg), adam_cfg)
    assert isinstance(adamw, torch.optim.AdamW)


def test_lr_factor_warmup_then_decay():
    base = load_config(None, ["schedule.warmup_steps=10", "schedule.min_lr_ratio=0.1"])["schedule"]
    assert [lr_factor(s, base, 110, 10) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, base, 110, 10) == pytest.approx(1.0)
    assert lr_factor(60, base, 110, 10) == pytest.approx(0.55)
    assert lr_factor(110, base, 110, 10) == pytest.approx(0.1)
    poly = {**base, "name": "poly", "power": 2.0, "warmup_steps": 0, "min_lr_ratio": 0.0}
    assert lr_factor(50, poly, 100, 10) == pytest.approx(0.25)
    step = {**poly, "name": "step", "milestones": [2.0, 3.5], "gamma": 0.1}
    assert [lr_factor(s, step, 100, 10) for s in (19, 20, 34, 35)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert lr_factor(5, {**poly, "name": "constant"}, 100, 10) == 1.0


def test_short_run_learns_and_writes_the_run_directory(synth_dir, tmp_path, capsys):
    untrained = train(tiny_config(synth_dir, tmp_path / "untrained", "train.max_steps=0"))
    baseline = untrained["final"]["synth"]["accuracy"]
    run = tmp_path / "run"
    summary = train(tiny_config(synth_dir, run, "train.epochs=6", "train.verify_every=12",
                                "train.checkpoint_every=10", "schedule.warmup_steps=3",
                                "train.baselines=true"))
    out = capsys.readouterr().out
    # baselines before training: the same seed gives the same untrained model; raw pixels computed here
    images, issame = load_bin(synth_dir / "synth.bin")
    pixels = np.stack([decode_image(b, size=32) for b in images]).reshape(len(images), -1)
    raw = evaluate((pixels.astype(np.float64) / 255 - 0.5) / 0.5, issame)["accuracy"]
    assert summary["baselines"]["synth"] == pytest.approx({"untrained": baseline, "raw_pixels": raw})
    assert f"untrained model {baseline:.4f}, raw pixels {raw:.4f}" in out
    assert summary["steps"] == 36 == 6 * (16 * 12 // 32)
    losses = [r["loss"] for r in records(run) if "loss" in r]
    assert len(losses) == 36 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6
    accuracy = summary["final"]["synth"]["accuracy"]
    assert accuracy > baseline + 0.05, (baseline, accuracy)
    verified = [r for r in records(run) if "verify" in r]
    assert [r["step"] for r in verified] == [12, 24, 36]
    keys = {"step", "epoch", "loss", "lr", "images_per_sec"}
    assert all(keys <= set(r) for r in records(run) if "loss" in r)
    assert summary["best"]["accuracy"] == max(r["verify_mean"] for r in verified)
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml")["train"]["max_steps"] is None
    assert any((run / "tensorboard").iterdir())
    # every 10 steps and at each epoch end (6 steps), newest 3 kept
    kept = [p.name for p in step_checkpoints(run / "checkpoints")]
    assert kept == ["step_24.pt", "step_30.pt", "step_36.pt"]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["step"] == summary["best"]["step"] and "backbone" in best
    assert "done: 36 steps" in out and f"run dir: {run}" in out and "synth" in out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_on_cpu(synth_dir, tmp_path, precision):
    with warnings.catch_warnings(record=True) as caught:  # fp16's skipped first steps warn nothing
        warnings.simplefilter("always")
        train(tiny_config(synth_dir, tmp_path, f"train.precision={precision}", "train.max_steps=2",
                          "data.verify=[]"))
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    state = load_checkpoint(tmp_path / "checkpoints" / "step_2.pt")
    assert all(torch.isfinite(v).all() for v in state["backbone"].values() if v.is_floating_point())
    assert ("scale" in state["scaler"]) == (precision == "fp16")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synth_dir, tmp_path):
    # lr x 1e13 from the second epoch (step 6 on): the loss becomes NaN/inf a step or two later
    config = tiny_config(synth_dir, tmp_path, "schedule.name=step", "schedule.milestones=[1]",
                         "schedule.gamma=1e13", "train.grad_clip=null", "data.verify=[]",
                         "train.checkpoint_every=100")
    with pytest.raises(TrainingDiverged) as err:
        train(config)
    message = str(err.value)
    assert "training diverged at step" in message and "lower optim.lr" in message and "bf16" in message
    kept = step_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step_6.pt"] and str(kept[0]) in message
    state = load_checkpoint(kept[0])
    assert all(torch.isfinite(v).all() for v in state["backbone"].values() if v.is_floating_point())
    assert torch.isfinite(state["head"]["weight"]).all()


def test_a_synthetic_set_made_with_other_settings_is_refused(synth_dir, tmp_path):
    """data.synth describes the set at data.train: a stale one (other settings) stops the run, untouched."""
    train(tiny_config(synth_dir, tmp_path / "first", "train.max_steps=1", "train.baselines=false"))
    before = {p.name: p.stat().st_mtime_ns for p in synth_dir.iterdir()}
    with pytest.raises(ValueError, match=r"images_per_identity: 12 there, 14 asked") as err:
        train(tiny_config(synth_dir, tmp_path / "second", "data.synth.images_per_identity=14"))
    assert str(synth_dir) in str(err.value) and "Delete that directory" in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in synth_dir.iterdir()} == before


@pytest.mark.parametrize("is_main", [True, False])
@pytest.mark.parametrize("exists", [True, False])
def test_every_rank_waits_once_for_the_synthetic_set(tmp_path, monkeypatch, is_main, exists):
    """Ranks pass the same barriers whatever they see: another rank may see rank 0's half-written set."""
    import facerec.train as engine
    from facerec.distributed import DistInfo

    data_cfg = tiny_config(tmp_path / "set", tmp_path / "run")["data"]
    if exists:
        (tmp_path / "set").mkdir()
    waits = []

    def barrier():  # by the time it returns, rank 0 has made the set
        waits.append(1)
        (tmp_path / "set").mkdir(exist_ok=True)

    monkeypatch.setattr(engine, "barrier", barrier)
    monkeypatch.setattr("data.generate_synthetic", lambda path, **kw: Path(path).mkdir())
    engine.prepare_train_data(data_cfg, DistInfo(0 if is_main else 1, 2, 0, torch.device("cpu")))
    assert len(waits) == 1


def test_a_built_run_verifies_before_fit_with_the_verification_command_path(synth_dir, tmp_path):
    """build_run makes the parts, Trainer resumes and opens the log: verify() works before fit(), and gives
    what `run.py verify`'s code path (facerec.verify_sets.verify) gives for the same model."""
    from facerec.distributed import init_distributed
    from facerec.train import Trainer, build_run
    from facerec.verify_sets import VerificationSet, verify

    trainer = Trainer(build_run(tiny_config(synth_dir, tmp_path / "run"), init_distributed("cpu")))
    try:
        results = trainer.verify()
    finally:
        trainer.log.close()
    vset = VerificationSet("synth", *load_bin(synth_dir / "synth.bin"), "synth.bin")
    expected, _ = verify(trainer.parts.backbone, vset, 32, device="cpu")
    assert results["synth"]["accuracy"] == expected["accuracy"]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "config.yaml").is_file()
