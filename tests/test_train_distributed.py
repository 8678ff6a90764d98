"""Data-parallel training with torchrun on CPU (gloo): 2 processes x B images step exactly like 1 x 2B.

What has to be identical for that: the initial weights (both runs resume one step-0 checkpoint), the data
(the engine's sampler gives process r the samples r, r+2, ... of the same epoch permutation, so the two
halves of each global batch are the one-process batch), the statistics (SyncSN in every 2-D norm and a
synchronised embedding BatchNorm1d), the loss (Partial FC's loss is the global-batch mean and DDP sums
the backbone's gradient shares), and no randomness (dropout 0, no flips, sample_rate 1).
Tolerance: the two runs sum float32 numbers in different orders; the weights agree to ~1e-6 until a
last-bit difference tips something non-smooth (an activation across a PReLU kink, most likely) and that
unit's gradient changes. How soon that happens depends on the data and the learning rate: a single
weight then differs by up to ~2e-3 within 3 steps (seen), while the weights as a whole stay together.
So the runs are compared by the size of their difference relative to the size of the training update
(L2 over all floating-point tensors): < 2% is required; a real mismatch is far larger (averaging
instead of summing the gradient shares halves the update: ~50%).
"""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data import generate_synthetic
from facerec.checkpoint import load_checkpoint
from facerec.config import load_config
from facerec.train import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 0.02


def run_train(config: Path, *overrides: str, nproc: int = 1) -> str:
    """Train in this process (nproc 1) or under torchrun; returns what rank 0 printed."""
    if nproc == 1:  # on one thread (the one_thread fixture), as each torchrun process
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            train(load_config(config, overrides))
        return out.getvalue()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = subprocess.run([*launcher, "run.py", "train", "--config", str(config), *overrides], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def distance(a: dict, b: dict) -> float:
    """L2 distance between two state dicts over their floating-point tensors."""
    return sum((a[k].double() - b[k].double()).square().sum().item()
               for k in a if a[k].is_floating_point()) ** 0.5


def relative_difference(a: dict, b: dict, start: dict) -> float:
    """|a - b| relative to the update |a - start| that training made."""
    return distance(a, b) / distance(a, start)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    generate_synthetic(root / "data", identities=8, images_per_identity=8, size=32, seed=0,
                       verify_identities=20, verify_pairs=20, workers=1, progress=False)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "iresnet18", "norm": "syncsn", "embedding_size": 16, "input_size": 32, "width": 8},
        "head": {"type": "cosface", "scale": 16.0, "margin": 0.2},
        "data": {"train": "data", "num_workers": 0, "flip": False},
        "optim": {"lr": 0.02, "momentum": 0.9},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "train": {"batch_size": 16, "epochs": 3, "checkpoint_every": 3, "log_every": 1, "progress": False,
                  "device": "cpu", "grad_clip": None},  # clipping to a norm would hide a gradient scale
    }))
    run_train(config, "train.max_steps=0", f"train.output_dir={root / 'init'}")
    return root, config


def test_two_processes_match_one_process_with_the_double_batch_and_resume_in_one(setup):
    root, config = setup
    init = f"train.resume={root / 'init' / 'checkpoints' / 'step_0.pt'}"
    run_train(config, init, "train.max_steps=3", f"train.output_dir={root / 'one'}")
    two = run_train(config, init, "train.max_steps=3", "train.batch_size=8",  # many small DDP buckets
                    "train.ddp_bucket_mb=0.01", f"train.output_dir={root / 'two'}", nproc=2)
    assert "(2 x 8)" in two
    start = load_checkpoint(root / "init" / "checkpoints" / "step_0.pt")
    one3 = load_checkpoint(root / "one" / "checkpoints" / "step_3.pt")
    two3 = load_checkpoint(root / "two" / "checkpoints" / "step_3.pt")
    assert two3["world_size"] == 2 and one3["world_size"] == 1
    assert distance(one3["backbone"], start["backbone"]) > 0.1
    assert relative_difference(one3["backbone"], two3["backbone"], start["backbone"]) < TOL
    assert relative_difference(one3["head"], two3["head"], start["head"]) < TOL
    lr = [c["optimizer"]["param_groups"][0]["lr"] for c in (one3, two3)]
    assert lr[0] == pytest.approx(lr[1])

    # the 2-process checkpoint resumes in 1 process (same global batch) and continues like the
    # 1-process run, head momentum included (kept in world-size independent form)
    resumed = run_train(config, "train.max_steps=6", f"train.output_dir={root / 'two'}")
    assert "resumed from" in resumed and "at step 3" in resumed
    run_train(config, "train.max_steps=6", f"train.output_dir={root / 'one'}")
    one6 = load_checkpoint(root / "one" / "checkpoints" / "step_6.pt")
    two6 = load_checkpoint(root / "two" / "checkpoints" / "step_6.pt")
    assert relative_difference(one6["backbone"], two6["backbone"], start["backbone"]) < TOL
    assert relative_difference(one6["head"], two6["head"], start["head"]) < TOL
    assert distance(one6["backbone"], one3["backbone"]) > 0.01
    full = two6["head_optimizer"]["full"]["momentum_buffer"]["weight"]
    assert full.shape == (8, 16) and full.abs().max() > 0
