"""Benchmark SwitchNorm2d against nn.BatchNorm2d and a straightforward autograd SN (forward + backward).

Prints, per ResNet-stage shape, the median forward+backward time of each layer (samples interleaved
side by side, each sample as many consecutive steps as fill about 50 ms of the fastest layer, so that
the few-millisecond steps of small maps are not measured by timer and scheduler jitter), the ratios
SN/BN (target <= 1.3) and naive/SN (target >= 4), and the bytes each layer
saves for backward (saved_tensors_hooks, distinct storages; target SN/BN <= 1.5). On CUDA it also
prints the peak allocated memory of one forward+backward above the inputs. With ``--virtual-devices V``
(default 8; 1: off) it also times SN and BN taking their batch statistics per virtual device (the
``train.virtual_devices`` path) in the same rotation, and prints their cost over V = 1.

    python -m benchmarks.bench_norm [--device cpu|cuda] [--quick] [--threads N] [--iters K]
                                    [--virtual-devices V]
"""

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn as nn

from backbones.switchnorm import SwitchNorm2d
from backbones.virtual_devices import split_batch_statistics

FULL_SHAPES = [(64, 64, 56, 56), (64, 128, 28, 28), (64, 256, 14, 14), (64, 512, 7, 7)]
QUICK_SHAPES = [(8, 64, 28, 28), (8, 128, 14, 14), (8, 256, 7, 7)]


class NaiveSwitchNorm2d(nn.Module):
    """The published formulas written literally with autograd ops: the baseline SN is measured against."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
        self.register_buffer("running_var", torch.ones(1, num_features, 1))

    def forward(self, x):
        n, c, h, w = x.size()
        x = x.view(n, c, -1)
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        temp = var_in + mean_in**2
        var_ln = temp.mean(1, keepdim=True) - mean_ln**2
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = temp.mean(0, keepdim=True) - mean_bn**2
            with torch.no_grad():
                self.running_mean.lerp_(mean_bn, self.momentum)
                self.running_var.lerp_(var_bn, self.momentum)
        else:
            mean_bn, var_bn = self.running_mean, self.running_var
        mean_weight = self.mean_weight.softmax(0)
        var_weight = self.var_weight.softmax(0)
        mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln + mean_weight[2] * mean_bn
        var = var_weight[0] * var_in + var_weight[1] * var_ln + var_weight[2] * var_bn
        x = (x - mean) / (var + self.eps).sqrt()
        return x.view(n, c, h, w) * self.weight + self.bias


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(layer, x, grad):
    layer(x).backward(grad)
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def saved_bytes(layer, x, grad):
    """Bytes of the distinct storages the layer's forward saves for backward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.backward(grad)
    x.grad = None
    return sum(storages.values())


def peak_cuda_bytes(layer, x, grad):
    sync(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    base = torch.cuda.memory_allocated(x.device)
    step(layer, x, grad)
    sync(x.device)
    return torch.cuda.max_memory_allocated(x.device) - base


def steps_per_sample(step_seconds: float, min_sample: float) -> int:
    """Consecutive steps per timed sample so that a sample lasts about ``min_sample`` seconds: single
    steps of a few milliseconds are dominated by timer and scheduler jitter."""
    return max(1, math.ceil(min_sample / max(step_seconds, 1e-9)))


def bench_shape(shape, device, iters, warmup, virtual_devices=1, min_sample=0.05):
    torch.manual_seed(0)
    x = torch.randn(*shape, device=device).mul_(2).add_(0.5).requires_grad_()
    grad = torch.randn(*shape, device=device)
    layers = {
        "BN": nn.BatchNorm2d(shape[1]).to(device),
        "SN": SwitchNorm2d(shape[1]).to(device),
        "naive": NaiveSwitchNorm2d(shape[1]).to(device),
    }
    if virtual_devices > 1:
        split = nn.ModuleDict({"BN_V": nn.BatchNorm2d(shape[1]), "SN_V": SwitchNorm2d(shape[1])}).to(device)
        layers.update(split_batch_statistics(split, virtual_devices).items())
    with torch.no_grad():
        diff = (layers["SN"](x) - layers["naive"](x)).abs().max().item()
    times = {name: [] for name in layers}
    order = list(layers)
    repeats = 1
    for i in range(warmup + iters):
        k = i % len(order)
        for name in order[k:] + order[:k]:  # rotate to spread machine noise evenly
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                step(layers[name], x, grad)
            sync(device)
            times[name].append((time.perf_counter() - start) / repeats)
        if i == warmup - 1:
            repeats = steps_per_sample(min(t[-1] for t in times.values()), min_sample)
            times = {name: [] for name in layers}
    row = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    row["repeats"] = repeats
    row["saved"] = {name: saved_bytes(layer, x, grad) for name, layer in layers.items()}
    if device.type == "cuda":
        row["peak"] = {name: peak_cuda_bytes(layer, x, grad) for name, layer in layers.items()}
    row["diff"] = diff
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_norm", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small shapes, few iterations (smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per layer and shape")
    parser.add_argument("--virtual-devices", type=int, default=8, metavar="V",
                        help="also time SN and BN with batch statistics per V virtual devices (1: off)")
    args = parser.parse_args(argv)
    if args.virtual_devices < 1:
        parser.error(f"--virtual-devices must be >= 1, got {args.virtual_devices}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    devices = args.virtual_devices
    if any(shape[0] % devices for shape in shapes):
        parser.error(f"--virtual-devices {devices} does not divide the batch of every shape "
                     f"({', '.join(str(s[0]) for s in shapes)})")
    iters = args.iters or (3 if args.quick else 15)
    warmup = 1 if args.quick else 3
    print(f"device={device} threads={torch.get_num_threads()} iters={iters} torch={torch.__version__}")
    print("forward+backward, train mode, float32; median ms per step of interleaved samples (steps per "
          "sample in the last column); saved = bytes saved for backward")
    head = (f"{'shape (N,C,H,W)':<20}{'BN ms':>9}{'SN ms':>9}{'naive ms':>10}{'SN/BN':>8}{'naive/SN':>10}"
            f"{'saved BN MB':>13}{'SN MB':>8}{'naive MB':>10}{'SN/BN':>7}{'max|SN-naive|':>15}")
    if device.type == "cuda":
        head += f"{'peak BN MB':>12}{'SN MB':>8}{'naive MB':>10}"
    if devices > 1:
        head += f"{f'SN V={devices} ms':>14}{'/SN':>6}{f'BN V={devices} ms':>14}{'/BN':>6}"
    head += f"{'steps':>7}"
    print(head)
    worst = {"sn_bn": 0.0, "naive_sn": float("inf"), "mem": 0.0}
    for shape in shapes:
        r = bench_shape(shape, device, iters, warmup, devices)
        sn_bn, naive_sn = r["SN"] / r["BN"], r["naive"] / r["SN"]
        mem = r["saved"]["SN"] / r["saved"]["BN"]
        worst = {"sn_bn": max(worst["sn_bn"], sn_bn), "naive_sn": min(worst["naive_sn"], naive_sn),
                 "mem": max(worst["mem"], mem)}
        mb = {k: v / 2**20 for k, v in r["saved"].items()}
        line = (f"{str(shape):<20}{r['BN']:>9.2f}{r['SN']:>9.2f}{r['naive']:>10.2f}"
                f"{sn_bn:>8.2f}{naive_sn:>10.2f}"
                f"{mb['BN']:>13.1f}{mb['SN']:>8.1f}{mb['naive']:>10.1f}{mem:>7.2f}{r['diff']:>15.2e}")
        if device.type == "cuda":
            peak = {k: v / 2**20 for k, v in r["peak"].items()}
            line += f"{peak['BN']:>12.1f}{peak['SN']:>8.1f}{peak['naive']:>10.1f}"
        if devices > 1:
            line += (f"{r['SN_V']:>14.2f}{r['SN_V'] / r['SN']:>6.2f}"
                     f"{r['BN_V']:>14.2f}{r['BN_V'] / r['BN']:>6.2f}")
        line += f"{r['repeats']:>7d}"
        print(line, flush=True)
    verdict = lambda ok: "ok" if ok else "MISSED"  # noqa: E731
    print(f"worst SN/BN time {worst['sn_bn']:.2f} (target <= 1.3: {verdict(worst['sn_bn'] <= 1.3)}); "
          f"worst naive/SN {worst['naive_sn']:.2f} (target >= 4: {verdict(worst['naive_sn'] >= 4)}); "
          f"worst saved SN/BN {worst['mem']:.2f} (target <= 1.5: {verdict(worst['mem'] <= 1.5)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
