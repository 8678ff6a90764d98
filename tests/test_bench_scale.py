"""benchmarks.bench_scale's pieces: the live-tensor count, the memory derived on fake tensors against a
real step, ranks started and ended, the plots."""
import os

import pytest
import torch

from benchmarks import bench_scale
from benchmarks.bench_heads import build_head_run, head_step, state_bytes
from benchmarks.live_memory import LiveTensorBytes

pytestmark = pytest.mark.usefixtures("one_thread")
MIB = 2**20


def test_live_tensor_bytes_counts_each_storage_while_it_lives():
    before = torch.zeros(1024, 1024)  # 4 MiB that existed before the block: not counted
    with LiveTensorBytes() as live:
        before.mul_(2)[:10].add_(1)  # in place and a view: nothing new
        a = torch.ones(256, 1024)  # 1 MiB
        view = a[:10]  # same storage
        b = a * 2  # 2 MiB alive
        del a, b  # the view keeps a's storage
        c = torch.ones(128, 1024)  # 1.5 MiB alive
        del view, c
        d = torch.ones(64, 1024) + before[:1]
    assert live.peak == 2 * MIB
    assert d.shape == (64, 1024)


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_memory_derived_on_fake_tensors_equals_a_real_step(rate):
    derived = bench_scale.derived_head_memory(3000, 64, 16, 1, rate)
    torch.manual_seed(0)
    run = build_head_run(64, 3000, rate, torch.device("cpu"))
    embeddings = torch.randn(16, 64, requires_grad=True)
    labels = torch.randint(0, 3000, (16,))
    head_step(run, embeddings, labels)
    with LiveTensorBytes() as live:
        head_step(run, embeddings, labels)
    assert derived["state"] == state_bytes(run["pfc"], run["opt"]) == 2 * 3000 * 64 * 4
    assert live.peak > 3000 * 64 * 4 * rate  # the step holds at least the sampled rows' gradient
    assert 0 <= derived["step_peak"] - live.peak <= 4096  # upper bounds of a few index tensors only
    shard = bench_scale.derived_head_memory(3001, 64, 16, 2, rate)
    assert shard["rows"] == 1501 and shard["state"] == 2 * 1501 * 64 * 4


def test_largest_class_count_is_where_the_derived_memory_stops_fitting():
    budget = 256 * MIB
    classes = bench_scale.largest_classes(budget, 64, 16, 0.1)

    def total(c):
        memory = bench_scale.derived_head_memory(c, 64, 16, 1, 0.1)
        return memory["state"] + memory["step_peak"]

    assert total(classes) <= budget < total(int(classes * 1.002))


def test_measured_ranks_agree_with_the_derivation_and_end(tmp_path):
    ranks = bench_scale.run_ranks(2, bench_scale._pfc_job, [(2000, 0.5)], 64, 8, 0, 1)
    assert len(ranks) == 2
    derived = bench_scale.derived_head_memory(2000, 64, 8, 2, 0.5)
    for (result,) in ranks:
        assert result["state"] == derived["state"]
        assert result["step_s"] > 0
        # rank 0's step also holds the all-gathered batch (2 x 8 x 64 floats, twice)
        assert abs(result["live_peak"] - derived["step_peak"]) <= 16 * 1024
    assert not [c for c in os.listdir("/proc") if c.isdigit() and _parent(c) == os.getpid()
                and "spawn" in _cmdline(c)]


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def test_plots_are_written(tmp_path):
    pfc = {"measured": {(1000, 1.0, 1): {"step_s": 0.01}, (10000, 1.0, 1): {"step_s": 0.1}},
           "derived": {(c, 1.0, 1): {"state": c * 4096, "step_peak": c * 2048} for c in (1000, 10000)}}
    ddp = {"results": {w: {"1.0/sum": 0.1 * w, "1.0/skip": 0.08 * w} for w in (1, 2)}, "buckets": [1.0]}
    loader = {"rates": {0: 500.0, 1: 900.0}, "decode_limit": 1000.0}
    activation = {"rows": {("iresnet18", c): {"rss_growth_mib": 100.0, "step_s": 0.1} for c in (False, True)}}
    paths = [bench_scale.plot_pfc(pfc, tmp_path), bench_scale.plot_ddp(ddp, tmp_path),
             bench_scale.plot_loader(loader, tmp_path), bench_scale.plot_activation(activation, tmp_path)]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
