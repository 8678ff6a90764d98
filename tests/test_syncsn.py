"""SyncSwitchNorm2d on 2 gloo processes (batch 4 each) equals SwitchNorm2d on one process with batch 8."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from backbones import SwitchNorm2d, SyncSwitchNorm2d
from facerec.distributed import SyncBatchNorm1d

WORLD, LOCAL, C, H, W, STEPS = 2, 4, 5, 4, 3, 2
PARAMS = ("weight", "bias", "mean_weight", "var_weight")


def make_layer(cls, dtype):
    torch.manual_seed(0)
    layer = cls(C, momentum=0.3)
    with torch.no_grad():
        for name in PARAMS:
            getattr(layer, name).normal_()
        layer.weight.add_(1.5)
    return layer.to(dtype)


def batches(dtype):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(WORLD * LOCAL, C, H, W, generator=g, dtype=dtype) * 2 + s for s in range(STEPS + 1)]
    grads = [torch.randn(WORLD * LOCAL, C, H, W, generator=g, dtype=dtype) for _ in range(STEPS)]
    return xs, grads


def run(layer, rows, dtype):
    """STEPS training steps on ``x[rows]`` (loss = sum(y * grad) over these rows), then one eval forward."""
    xs, grads = batches(dtype)
    record = {"y": [], "x_grad": [], "param_grads": []}
    layer.train()
    for x, grad in zip(xs, grads):
        x = x[rows].clone().requires_grad_()
        y = layer(x)
        (y * grad[rows]).sum().backward()
        record["y"].append(y.detach())
        record["x_grad"].append(x.grad)
        record["param_grads"].append({n: getattr(layer, n).grad.clone() for n in PARAMS})
        layer.zero_grad()
    record["eval_y"] = layer.eval()(xs[-1][rows]).detach()
    record["running"] = (
        layer.running_mean.clone(),
        layer.running_var.clone(),
        layer.num_batches_tracked.clone(),
    )
    return record


def run_bn1d(layer, rows):
    """One training forward of a BatchNorm1d on ``features[rows]``: output and running statistics."""
    features = torch.randn(WORLD * LOCAL, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = layer.double().train()(features[rows])
    return {"y": y.detach(), "running": (layer.running_mean.clone(), layer.running_var.clone())}


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {
            str(dtype): run(make_layer(SyncSwitchNorm2d, dtype), rows, dtype)
            for dtype in (torch.float64, torch.float32)
        }
        alone = [dist.new_group([r]) for r in range(WORLD)][rank]
        for name, group in (("bn1d_world", None), ("bn1d_alone", alone)):
            results[name] = run_bn1d(SyncBatchNorm1d(C, momentum=0.3, process_group=group), rows)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_syncsn_two_processes_equal_one_big_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        full = run(make_layer(SwitchNorm2d, dtype), slice(None), dtype)
        parts = [r[str(dtype)] for r in ranks]
        close = lambda a, b, tol=tol: torch.testing.assert_close(a, b, atol=tol, rtol=tol)  # noqa: E731
        for step in range(STEPS):
            close(torch.cat([p["y"][step] for p in parts]), full["y"][step])
            close(torch.cat([p["x_grad"][step] for p in parts]), full["x_grad"][step])
            for name in PARAMS:  # the global loss is the sum of the local ones: parameter grads add up
                close(sum(p["param_grads"][step][name] for p in parts), full["param_grads"][step][name])
        close(torch.cat([p["eval_y"] for p in parts]), full["eval_y"])
        for p in parts:
            close(p["running"][0], full["running"][0])
            close(p["running"][1], full["running"][1])
            assert p["running"][2].item() == full["running"][2].item() == STEPS
    # SyncBatchNorm1d: the whole batch over the default group, each process's own over a group of one
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)  # noqa: E731
    world = run_bn1d(nn.BatchNorm1d(C, momentum=0.3), slice(None))
    close(torch.cat([r["bn1d_world"]["y"] for r in ranks]), world["y"])
    for rank, r in enumerate(ranks):
        close(r["bn1d_world"]["running"], world["running"])
        own = run_bn1d(nn.BatchNorm1d(C, momentum=0.3), slice(rank * LOCAL, (rank + 1) * LOCAL))
        close(r["bn1d_alone"]["y"], own["y"])
        close(r["bn1d_alone"]["running"], own["running"])
