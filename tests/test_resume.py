"""Checkpoints and resuming: a run killed with SIGKILL continues with the same steps, lr and weights."""
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from facerec import checkpoint as ckpt
from facerec.config import load_config
from facerec.train import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def run(config_path: Path, *overrides: str) -> tuple[dict, str]:
    """Train in this process (one thread, as the killed subprocess with OMP_NUM_THREADS=1: float sums in
    another order differ by 1e-7 at first and grow to 1e-1 within 16 steps at this lr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train(load_config(config_path, overrides))
    return summary, out.getvalue()


def lr_by_step(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines]
    assert [r["step"] for r in steps] == sorted({r["step"] for r in steps}), "steps repeated or out of order"
    return {r["step"]: r["lr"] for r in steps}


def test_sigkilled_run_resumes_with_the_same_steps_schedule_and_weights(config_path, tmp_path):
    reference, _ = run(config_path, f"train.output_dir={tmp_path / 'whole'}")
    killed = tmp_path / "killed"
    command = [sys.executable, "run.py", "train", "--config", str(config_path), f"train.output_dir={killed}"]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_6.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    newest = ckpt.step_checkpoints(killed / "checkpoints")[-1]
    assert int(newest.stem.split("_")[1]) < 16

    summary, out = run(config_path, f"train.output_dir={killed}")
    assert f"resumed from {newest}" in out
    assert summary["steps"] == reference["steps"] == 16
    assert summary["trained_steps"] == 16 - int(newest.stem.split("_")[1])
    whole_lr, resumed_lr = lr_by_step(tmp_path / "whole"), lr_by_step(killed)
    assert list(resumed_lr) == list(range(1, 17))
    assert resumed_lr == pytest.approx(whole_lr, rel=1e-9)
    a = ckpt.load_checkpoint(tmp_path / "whole" / "checkpoints" / "step_16.pt")
    b = ckpt.load_checkpoint(killed / "checkpoints" / "step_16.pt")
    for part in ("backbone", "head"):
        for key, value in a[part].items():
            if value.is_floating_point():
                torch.testing.assert_close(b[part][key], value, atol=1e-5, rtol=1e-5, msg=f"{part}.{key}")

    # a finished run resumes at its end and trains nothing more
    again, out = run(config_path, f"train.output_dir={killed}")
    assert again["trained_steps"] == 0 and "at step 16" in out


def test_init_backbone_starts_from_given_weights_and_model_changes_are_refused(config_path, tmp_path):
    run(config_path, f"train.output_dir={tmp_path / 'a'}", "train.max_steps=2")
    source = tmp_path / "a" / "checkpoints" / "step_2.pt"
    run(config_path, f"train.output_dir={tmp_path / 'b'}", "train.max_steps=0",
        f"train.init_backbone={source}")
    first = ckpt.load_checkpoint(source)["backbone"]
    started = ckpt.load_checkpoint(tmp_path / "b" / "checkpoints" / "step_0.pt")["backbone"]
    assert all(torch.equal(first[k], started[k]) for k in first)
    with pytest.raises(ValueError, match="differs from.*train.init_backbone"):
        run(config_path, f"train.output_dir={tmp_path / 'a'}", "model.norm=bn")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        run(config_path, f"train.output_dir={tmp_path / 'c'}", f"train.resume={tmp_path / 'none.pt'}")


def test_checkpoint_files_are_plain_data_and_rotate(tmp_path):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint({"step": step, "rng": state}, tmp_path / f"step_{step}.pt")
    ckpt.prune_checkpoints(tmp_path, keep=2, current=tmp_path / "step_4.pt")
    assert [p.name for p in ckpt.step_checkpoints(tmp_path)] == ["step_3.pt", "step_4.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3.pt", "step_4.pt"]  # no temporary files
    loaded = torch.load(tmp_path / "step_4.pt", weights_only=True)  # no pickled code needed
    ckpt.set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: not a readable checkpoint"):
        ckpt.load_checkpoint(tmp_path / "bad.pt")


def test_checkpoint_saved_before_zero_init_residual_resumes_and_loads(config_path, tmp_path):
    """A checkpoint whose config still says ``norm_kwargs.last_gamma: true`` (the old name of
    ``zero_init_residual``) resumes with today's config of the same model and loads for export/verify."""
    from facerec.model_io import load_model

    run(config_path, f"train.output_dir={tmp_path}", "train.max_steps=3", "model.zero_init_residual=true")
    path = tmp_path / "checkpoints" / "step_3.pt"
    state = ckpt.load_checkpoint(path)
    model = state["config"]["model"]
    assert model.pop("zero_init_residual") is True
    model["norm_kwargs"] = {"last_gamma": True}
    ckpt.save_checkpoint(state, path)
    summary, _ = run(config_path, f"train.output_dir={tmp_path}", "train.max_steps=4",
                     "model.zero_init_residual=true")
    assert summary["steps"] == 4
    loaded, checkpoint = load_model(path)
    assert torch.equal(loaded.state_dict()["fc.weight"], checkpoint["backbone"]["fc.weight"])
