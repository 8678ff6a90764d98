"""train.compile: compiled SN trains to eager's function, checkpoints cross between compiled and eager
runs, and a machine without a C++ compiler trains eager with a one-line reason.

Inductor's CPU compilation is slow on a busy 2-core machine, so only two small graphs are compiled: a
two-layer SN net, and one leg of the engine's tiny iresnet18 (width 8, 32x32, batch 16).
"""
import contextlib
import copy
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from backbones import build_backbone
from backbones.switchnorm import SwitchNorm2d
from facerec import checkpoint as ckpt
from facerec.compiled import compile_model, missing_compiler
from facerec.config import ConfigError, load_config
from facerec.export import export_onnx
from facerec.model_io import load_backbone_state, load_model
from facerec.train import train
from losses import build_head

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def sn_net() -> nn.Module:
    """Conv + SN (IN/LN/BN) + PReLU, a strided conv + SN without the BN term, then a linear embedding."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SwitchNorm2d(8), nn.PReLU(8),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), SwitchNorm2d(8, using_bn=False),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 16))


def train_steps(model: nn.Module, net: nn.Module, steps: int) -> tuple[list[float], list[dict]]:
    """Losses and gradients of ``steps`` SGD steps of ``model`` (``net`` or its compiled wrapper) with an
    ArcFace head on fixed batches."""
    torch.manual_seed(1)
    head = build_head({"type": "arcface", "scale": 16.0, "margin": 0.2}, embedding_size=16, num_classes=6)
    optimizer = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    losses, grads = [], []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        images = torch.randn(4, 3, 16, 16, generator=generator) * 2 + 0.5
        labels = torch.randint(0, 6, (4,), generator=generator)
        optimizer.zero_grad()
        loss = head(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        grads.append({name: p.grad.clone() for name, p in net.named_parameters()})
    return losses, grads


@pytest.mark.skipif(missing_compiler(torch.device("cpu")) is not None, reason="no C++ compiler for inductor")
def test_compiled_switchnorm_trains_to_the_same_function_as_eager():
    eager_net = sn_net()
    compiled_net = copy.deepcopy(eager_net)
    compiled, message = compile_model(compiled_net, "default", torch.device("cpu"))
    assert compiled is not compiled_net and "compiled" in message
    eager_losses, eager_grads = train_steps(eager_net, eager_net, 3)
    compiled_losses, compiled_grads = train_steps(compiled, compiled_net, 3)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    for step, (want, got) in enumerate(zip(eager_grads, compiled_grads)):
        scale = max(g.abs().max().item() for g in want.values())
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-3, atol=1e-5 * scale,
                                       msg=lambda m, n=name, s=step: f"step {s} grad {n}: {m}")
    # same weights and running statistics after the steps: the BN term's buffers update under compile
    for (name, want), got in zip(eager_net.state_dict().items(), compiled_net.state_dict().values()):
        if want.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert torch.equal(got, want), name
    assert eager_net[1].num_batches_tracked.item() == 3


def test_no_cxx_compiler_falls_back_to_eager_with_a_one_line_reason(monkeypatch, tmp_path, config_path,
                                                                   capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ (nor $CXX, nor anything else) on it
    reason = missing_compiler(torch.device("cpu"))
    assert reason is not None and "C++ compiler" in reason and "not found on PATH" in reason
    net = sn_net()
    model, message = compile_model(net, "default", torch.device("cpu"))
    assert model is net and message == f"train.compile: {reason}; training eager instead"

    run_dir = tmp_path / "run"
    summary = train(load_config(config_path, ["train.compile=true", "train.max_steps=2",
                                              f"train.output_dir={run_dir}"]))
    assert summary["steps"] == 2
    assert message in capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any("compile_seconds" in r for r in records)


def test_compile_options_are_checked():
    assert load_config(None)["train"]["compile"] is False
    assert load_config(None, ["train.compile_mode=max-autotune"])["train"]["compile_mode"] == "max-autotune"
    with pytest.raises(ConfigError, match="train.compile_mode"):
        load_config(None, ["train.compile_mode=fastest"])
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        compile_model(sn_net(), "fastest", torch.device("cpu"))


def test_state_dict_of_a_compiled_model_loads_into_an_eager_one():
    source = build_backbone("iresnet18", norm="sn", embedding_size=16, input_size=32, width=8)
    state = torch.compile(source).state_dict()  # keys "_orig_mod.*" (no compilation happens here)
    assert all(key.startswith("_orig_mod.") for key in state)
    target = build_backbone("iresnet18", norm="sn", embedding_size=16, input_size=32, width=8)
    load_backbone_state(target, state)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def run(config_path: Path, *overrides: str) -> tuple[dict, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train(load_config(config_path, ["schedule.name=constant", "train.checkpoint_every=2",
                                                  *overrides]))
    return summary, out.getvalue()


def losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.skipif(missing_compiler(torch.device("cpu")) is not None, reason="no C++ compiler for inductor")
def test_engine_alternates_eager_and_compiled_legs_like_one_eager_run(config_path, tmp_path):
    """Steps 1-2 eager, 3-4 compiled (resumed from the eager checkpoint), 5-6 eager again (from the
    compiled leg's checkpoint): the same losses and weights as one eager run of 6 steps; the compiled
    leg's checkpoint exports to ONNX."""
    whole, legs = tmp_path / "whole", tmp_path / "legs"
    run(config_path, f"train.output_dir={whole}", "train.max_steps=6")
    run(config_path, f"train.output_dir={legs}", "train.max_steps=2")
    _, out = run(config_path, f"train.output_dir={legs}", "train.max_steps=4", "train.compile=true")
    assert "train.compile: model compiled with inductor (mode default)" in out
    assert "train.compile: the first step took" in out
    compiled_leg = ckpt.load_checkpoint(legs / "checkpoints" / "step_4.pt")
    assert not any("_orig_mod" in key for key in compiled_leg["backbone"])
    model, _ = load_model(legs / "checkpoints" / "step_4.pt")  # export is unaffected by compilation
    assert export_onnx(model, tmp_path / "model.onnx", input_size=32) < 1e-4
    run(config_path, f"train.output_dir={legs}", "train.max_steps=6")

    records = [json.loads(line) for line in (legs / "metrics.jsonl").read_text().splitlines()]
    compile_record = next(r for r in records if "compile_seconds" in r)
    assert compile_record["step"] == 3 and compile_record["compile_seconds"] > 0
    assert compile_record["images_per_sec"] != compile_record["images_per_sec"]  # NaN: only the compile step
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert losses(legs) == pytest.approx(losses(whole), rel=1e-4)
    a = ckpt.load_checkpoint(whole / "checkpoints" / "step_6.pt")["backbone"]
    b = ckpt.load_checkpoint(legs / "checkpoints" / "step_6.pt")["backbone"]
    for key, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(b[key], value, rtol=1e-3, atol=1e-4, msg=key)


def test_gpu_check_cuts_a_hanging_step_and_still_prints_its_table(tmp_path):
    """benchmarks/gpu_check.sh (its full --dry-run takes minutes, run by hand): a step that hangs is
    stopped at the time budget, every later step is reported as skipped, and the summary table is printed."""
    hang = tmp_path / "python"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    start = time.time()
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                            env={**os.environ, "PYTHON": str(hang), "BUDGET_S": "3", "TMPDIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert time.time() - start < 30
    assert result.returncode == 1
    table = result.stdout[result.stdout.index("step           status"):].splitlines()[1:]
    assert [line.split()[0] for line in table] == ["install", "bench_norm", "bench_heads", "nccl",
                                                   "torchrun", "export", "verify", "bench_train"]
    assert "failed (timeout 3s)" in table[0]
    assert all("skipped (budget spent)" in line for line in table[1:])
