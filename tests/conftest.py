"""Fixtures shared by the test modules."""
import pytest
import torch
import yaml

from data import generate_synthetic


@pytest.fixture
def one_thread():
    """Run the test on one torch thread: tiny tensors are as fast, immune to the OpenMP stalls of a busy
    machine, and in-process training sums floats in the same order as a torchrun process
    (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    """A tiny training config (iresnet18 width 8, 32x32, 4 steps per epoch) and its synthetic set."""
    root = tmp_path_factory.mktemp("resume")
    generate_synthetic(root / "data", identities=8, images_per_identity=8, size=32, seed=1,
                       verify_identities=20, verify_pairs=20, workers=1, progress=False)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "iresnet18", "norm": "sn", "embedding_size": 16, "input_size": 32, "width": 8},
        "head": {"type": "cosface", "scale": 16.0, "margin": 0.2},
        "data": {"train": "data", "num_workers": 0, "flip": False},
        "schedule": {"name": "cosine", "warmup_steps": 3},
        "train": {"batch_size": 16, "epochs": 5, "max_steps": 16, "checkpoint_every": 3,
                  "keep_checkpoints": 2, "log_every": 1, "progress": False, "device": "cpu"},
    }))
    return path
