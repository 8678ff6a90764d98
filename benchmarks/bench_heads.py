"""Partial FC training-step cost: sample_rate 0.1 vs 1.0, side by side in one run.

One step = zero_grad + forward (cosine logits, ArcFace margin, sharded softmax cross-entropy) + backward
+ SGD step (momentum 0.9, weight decay 5e-4) of a single-process PartialFC; the embeddings stand in for
a backbone's output.  The configurations alternate step by step and the table shows medians.

Memory: ``state`` is the class centres + optimizer state after a step (tensor sizes); ``step peak`` is
the extra memory at the peak of a step over what was resident before it (CUDA: allocator peak; CPU:
the process's peak RSS, reset before each step through /proc/self/clear_refs, with glibc told to mmap
every block over 128 KiB so that freed tensors leave the RSS: it counts the step's transient buffers).

    python -m benchmarks.bench_heads                 # 100,000 classes, 512-d, batch 128, CPU
    python -m benchmarks.bench_heads --device cuda
    python -m benchmarks.bench_heads --quick         # small smoke run
"""
import argparse
import contextlib
import ctypes
import ctypes.util
import re
import statistics
import time
from pathlib import Path

import torch

from losses import ArcFace, PartialFC

MIB = 2**20


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


class PeakMemory:
    """Peak extra bytes during a block: CUDA allocator stats, or Linux peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_ok = device.type == "cpu" and Path("/proc/self/clear_refs").exists()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        elif self.cpu_ok:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:
                self.cpu_ok = False
            self.before = _proc_kib("VmRSS") * 1024 if self.cpu_ok else 0
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.before
        else:
            self.peak = _proc_kib("VmHWM") * 1024 - self.before if self.cpu_ok else float("nan")


def return_freed_memory_to_the_os() -> None:
    """glibc: serve every allocation over 128 KiB by mmap (fixed threshold), so that freed tensors leave
    the RSS at once and the peak RSS of a step measures the memory it really had live."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def state_bytes(pfc: PartialFC, optimizer: torch.optim.Optimizer) -> int:
    tensors = [pfc.weight] + [v for v in optimizer.state[pfc.weight].values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def build_head_run(dim: int, classes: int, rate: float, device: torch.device) -> dict:
    """A PartialFC (ArcFace, ``classes`` centres, or this process's shard of them under a process group)
    with SGD (momentum 0.9, weight decay 5e-4) attached; times and peaks are filled in by the steps."""
    pfc = PartialFC(dim, classes, ArcFace(), sample_rate=rate)
    if pfc.weight.device != device:  # (not .to() on fake tensors, which cannot be swapped)
        pfc.to(device)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    pfc.attach_optimizer(opt)
    return {"rate": rate, "pfc": pfc, "opt": opt, "times": [], "peaks": []}


def head_step(run: dict, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    """zero_grad + forward + backward + optimizer step of ``run``'s PartialFC."""
    run["opt"].zero_grad(set_to_none=True)
    embeddings.grad = None
    run["pfc"](embeddings, labels).backward()
    run["opt"].step()


def time_alternating(runs: list[dict], embeddings, labels, device: torch.device, warmup: int,
                     steps: int) -> None:
    """Append each timed step's seconds and peak extra memory to its run, the runs alternating."""
    for i in range(warmup + steps):
        for run in runs:
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                head_step(run, embeddings, labels)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - start
            if i >= warmup:
                run["times"].append(elapsed)
                run["peaks"].append(memory.peak)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_heads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10,000 classes, batch 32, 3 steps")
    args = parser.parse_args()
    if args.quick:
        args.classes, args.batch, args.steps, args.warmup = 10_000, 32, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    if device.type == "cpu":
        return_freed_memory_to_the_os()

    torch.manual_seed(0)
    runs = [build_head_run(args.dim, args.classes, rate, device) for rate in args.rates]
    embeddings = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    time_alternating(runs, embeddings, labels, device, args.warmup, args.steps)

    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"Partial FC step (fwd + bwd + SGD momentum/wd), {args.classes:,} classes, {args.dim}-d, "
          f"batch {args.batch}, {device.type} (threads {threads}), median of {args.steps} alternated steps")
    print(f"{'sample_rate':>11} {'rows/step':>10} {'step ms':>9} {'speed-up':>9} {'state MiB':>10} "
          f"{'step peak MiB':>14}")
    base = statistics.median(runs[-1]["times"])
    for run in runs:
        median = statistics.median(run["times"])
        rows = run["pfc"].num_sample if run["rate"] < 1 else run["pfc"].num_local
        print(f"{run['rate']:>11.2f} {rows:>10,} {median * 1e3:>9.1f} {base / median:>8.2f}x "
              f"{state_bytes(run['pfc'], run['opt']) / MIB:>10.0f} "
              f"{statistics.median(run['peaks']) / MIB:>14.0f}")
    print("speed-up relative to the last configuration listed (--rates order).")


if __name__ == "__main__":
    main()
