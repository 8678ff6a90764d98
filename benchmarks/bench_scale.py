"""How the cost grows: Partial FC with the number of classes, data-parallel weak scaling, the loader, and
activation checkpointing; tables printed, plots written as PNG to ``--out``.

* ``pfc``: Partial FC step (ArcFace, SGD momentum, 512-d, batch 128 per process) at 10k ... 10M classes,
  sample rates 1.0 / 0.3 / 0.1, 1 / 2 / 4 gloo processes (each holds a 1/W shard of the class centres).
  *Measured* where every process together fits in ``--budget-gib``: median step time, state (class
  centres + momentum), peak RSS growth of a step and the exact peak of its live tensors.  *Derived* for
  every size: the same step run on fake (meta-backed) tensors with its live tensors counted
  (``benchmarks.live_memory``), i.e. exact from the shapes the code allocates.  From the derivation: the
  largest class count one 24 GiB machine trains at each sample rate.
* ``ddp``: weak scaling of an iresnet18 (width 32, 112x112, fixed batch per process, one thread each)
  in DistributedDataParallel with the training loop's summing hook, at 1 / 2 / 4 gloo processes and
  several bucket sizes (``train.ddp_bucket_mb``); the all-reduce share of a step is 1 - (step with a hook
  that skips the all-reduce) / (step with it).
* ``loader``: images/s of ``build_loader`` at 0 / 1 / 2 workers against the decode limit (bare
  ``cv2.imdecode`` of the same records in one process).
* ``activation``: peak training memory and step time of iresnet50 / iresnet100 without and with
  ``model.activation_checkpointing`` (each in its own subprocess, as ``benchmarks.bench_train``).

On a 2-core machine, 4 processes share 2 cores: figures at 4 processes measure that contention, not the
interconnect.

    python -m benchmarks.bench_scale                  # everything (15 min on the busy 2-core machine)
    python -m benchmarks.bench_scale --only pfc ddp   # some sections
    python -m benchmarks.bench_scale --quick          # smoke run (2.6 min there)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks import bench_data, bench_train
from benchmarks.bench_heads import (
    build_head_run,
    head_step,
    return_freed_memory_to_the_os,
    state_bytes,
    time_alternating,
)
from benchmarks.live_memory import LiveTensorBytes
from data.workers import exit_with
from eval.report import new_figure, save_figure
from losses.partial_fc import shard_range

MIB, GIB = 2**20, 2**30
SECTIONS = ("pfc", "ddp", "loader", "activation")
PROCESS_OVERHEAD = 400 * MIB  # resident size of a process after importing torch (for the budget check)


# ----------------------------------------------------------------------------------- processes
def _rank_main(rank: int, world: int, init_file: str, parent: int, job, job_args: tuple, result_file: str):
    exit_with(parent)  # a rank ends with the benchmark, whatever ends it
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecations, once per rank
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = [None] * world
        dist.all_gather_object(results, job(rank, world, *job_args))
        if rank == 0:
            Path(result_file).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, job, *job_args) -> list:
    """``job(rank, world, *job_args)`` in ``world`` spawned gloo processes (one thread each); the list
    of their results in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = f"{tmp}/result.json"
        mp.spawn(_rank_main, args=(world, f"{tmp}/init", os.getpid(), job, job_args, result_file),
                 nprocs=world, join=True)
        return json.loads(Path(result_file).read_text())


# ----------------------------------------------------------------------------------- Partial FC
def derived_head_memory(classes: int, dim: int, batch: int, world: int, rate: float) -> dict:
    """Bytes of rank 0's Partial FC at ``classes`` over ``world`` processes, derived from shapes: its
    shard run on fake tensors (a one-process PartialFC over the shard, fed the global batch).

    ``state``: class centres + SGD momentum; ``step_peak``: the most bytes of tensors a step (forward,
    backward, optimizer step; after the first, which creates the momentum) has alive at once: cosine
    logits and softmax of the global batch x the sampled rows, the sampled rows, their gradients and
    momentum while they are stepped, the embeddings' gradient."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    start, end = shard_range(classes, world, 0)
    with FakeTensorMode():
        run = build_head_run(dim, end - start, rate, torch.device("cpu"))
        embeddings = torch.randn(world * batch, dim, requires_grad=True)
        labels = torch.randint(0, end - start, (world * batch,))
        for _ in range(2):  # the first step creates the momentum; the second is counted
            with LiveTensorBytes(fake=True) as live:
                head_step(run, embeddings, labels)
        return {"rows": end - start, "state": state_bytes(run["pfc"], run["opt"]), "step_peak": live.peak}


def largest_classes(budget: int, dim: int, batch: int, rate: float) -> int:
    """The most classes (to 0.1%) whose derived state + step peak fit in ``budget`` bytes, one process."""
    def fits(classes):
        memory = derived_head_memory(classes, dim, batch, 1, rate)
        return memory["state"] + memory["step_peak"] <= budget

    low, high = 1000, 1000
    while fits(high):
        low, high = high, high * 4
    while high - low > low // 1000:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _pfc_job(rank: int, world: int, configs: list, dim: int, batch: int, warmup: int, steps: int) -> list:
    """Measure each (classes, rate) on this rank: step times, state, step peaks (RSS and live tensors)."""
    return_freed_memory_to_the_os()
    device = torch.device("cpu")
    out = []
    for classes, rate in configs:
        torch.manual_seed(rank)
        run = build_head_run(dim, classes, rate, device)
        embeddings = torch.randn(batch, dim, requires_grad=True)
        labels = torch.randint(0, classes, (batch,))
        time_alternating([run], embeddings, labels, device, warmup, steps)
        with LiveTensorBytes() as live:
            head_step(run, embeddings, labels)
        out.append({"classes": classes, "rate": rate, "step_s": statistics.median(run["times"]),
                    "state": state_bytes(run["pfc"], run["opt"]), "rss_peak": statistics.median(run["peaks"]),
                    "live_peak": live.peak})
        del run
    return out


def bench_pfc(args) -> dict:
    dim, batch = 512, args.pfc_batch
    derived = {}
    for classes in args.classes:
        for rate in args.rates:
            for world in args.worlds:
                derived[classes, rate, world] = derived_head_memory(classes, dim, batch, world, rate)
    measured = {}
    for world in args.worlds:
        configs = [(c, r) for c in args.classes for r in args.rates
                   if world * (derived[c, r, world]["state"] + derived[c, r, world]["step_peak"]
                               + PROCESS_OVERHEAD) <= args.budget_gib * GIB]
        if not configs:
            continue
        print(f"  measuring {len(configs)} configurations at {world} process(es) ...", flush=True)
        ranks = run_ranks(world, _pfc_job, configs, dim, batch, args.warmup, args.steps)
        for i, (classes, rate) in enumerate(configs):
            per_rank = [r[i] for r in ranks]
            measured[classes, rate, world] = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
    largest = {rate: largest_classes(24 * GIB, dim, batch, rate) for rate in args.rates}

    print(f"\nPartial FC, 512-d, batch {batch} per process, ArcFace + SGD momentum; per process (the largest "
          f"shard); measured where all processes fit in {args.budget_gib:g} GiB, one thread per process")
    print(f"{'classes':>10} {'rate':>5} {'procs':>5} | {'step ms':>8} {'state MiB':>9} {'RSS peak':>8} "
          f"{'live peak':>9} | {'derived state':>13} {'step peak':>9} {'total GiB':>9}")
    for (classes, rate, world), d in derived.items():
        m = measured.get((classes, rate, world))
        seen = (f"{m['step_s'] * 1e3:>8.0f} {m['state'] / MIB:>9.0f} {m['rss_peak'] / MIB:>8.0f} "
                f"{m['live_peak'] / MIB:>9.0f}") if m else f"{'(derived only)':>38}"
        print(f"{classes:>10,} {rate:>5.1f} {world:>5} | {seen} | {d['state'] / MIB:>13.0f} "
              f"{d['step_peak'] / MIB:>9.0f} {(d['state'] + d['step_peak']) / GIB:>9.2f}")
    print("MiB per process. measured: step time (median), state = class centres + momentum (tensor sizes), "
          "RSS peak = peak RSS growth of a step, live peak = exact peak of the step's live tensors. "
          "derived: the same step on fake tensors (shapes only).")
    if any(w > os.cpu_count() for w in args.worlds):
        print(f"{max(args.worlds)} processes on {os.cpu_count()} cores: step times there measure CPU "
              "contention, not communication.")
    print("Largest class count one 24 GiB machine trains (one process, derived state + step peak of the "
          "head: class centres, momentum, logits/softmax of the batch x sampled rows, sampled rows and their "
          "gradients; the backbone, its activations and the process itself are not included):")
    for rate, classes in largest.items():
        print(f"  sample rate {rate:.1f}: {classes:,} classes")
    return {"derived": derived, "measured": measured, "largest": largest, "batch": batch}


def plot_pfc(result: dict, out: Path) -> Path:
    fig, (left, right) = new_figure(1, 2, figsize=(11, 4.2))
    series = {}
    for (classes, rate, world), m in sorted(result["measured"].items()):
        series.setdefault((rate, world), []).append((classes, m["step_s"] * 1e3))
    for (rate, world), points in series.items():
        left.plot(*zip(*points), marker="o", label=f"rate {rate:.1f}, {world} proc")
    left.set(xscale="log", yscale="log", xlabel="classes", ylabel="step ms (measured)",
             title="Partial FC step time")
    left.legend(fontsize=7)
    series = {}
    for (classes, rate, world), d in sorted(result["derived"].items()):
        series.setdefault((rate, world), []).append((classes, (d["state"] + d["step_peak"]) / GIB))
    for (rate, world), points in series.items():
        right.plot(*zip(*points), marker=".", label=f"rate {rate:.1f}, {world} proc")
    right.axhline(24, color="k", linestyle="--", linewidth=0.8)
    right.set(xscale="log", yscale="log", xlabel="classes", ylabel="GiB per process (derived)",
              title="state + step peak")
    right.legend(fontsize=7)
    return save_figure(fig, out / "scale_pfc.png", dpi=110)


# ----------------------------------------------------------------------------------- data parallel
def skip_allreduce_hook(process_group, bucket):
    """DDP communication hook that communicates nothing (the step's cost without the all-reduce)."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _ddp_job(rank: int, world: int, buckets: list, width: int, size: int, batch: int, warmup: int,
             steps: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from backbones import build_backbone
    from facerec.train import _allreduce_sum_hook

    runs = {}
    for bucket in buckets:
        for name, hook in (("sum", _allreduce_sum_hook), ("skip", skip_allreduce_hook)):
            torch.manual_seed(0)
            model = build_backbone("iresnet18", norm="bn", input_size=size, width=width)
            ddp = DistributedDataParallel(model, broadcast_buffers=False, bucket_cap_mb=bucket)
            ddp.register_comm_hook(None, hook)
            runs[f"{bucket}/{name}"] = (ddp, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), [])
    images = torch.randn(batch, 3, size, size)
    for i in range(warmup + steps):
        for ddp, optimizer, times in runs.values():  # configurations alternate step by step
            dist.barrier()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            ddp(images).square().mean().backward()
            optimizer.step()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    grad_mib = sum(p.numel() * 4 for p in model.parameters()) / MIB
    return {"grad_mib": grad_mib, **{key: statistics.median(times) for key, (_, _, times) in runs.items()}}


def bench_ddp(args) -> dict:
    results = {}
    for world in args.worlds:
        print(f"  data parallel at {world} process(es) ...", flush=True)
        ranks = run_ranks(world, _ddp_job, args.buckets, args.ddp_width, args.ddp_size, args.ddp_batch,
                          args.warmup, args.steps)
        results[world] = {k: max(r[k] for r in ranks) for k in ranks[0]}  # the slowest rank sets the pace
    grad_mib = results[args.worlds[0]]["grad_mib"]
    print(f"\nData-parallel weak scaling: iresnet18 width {args.ddp_width}, {args.ddp_size}x{args.ddp_size}, "
          f"batch {args.ddp_batch} per process, 1 thread per process, gradients {grad_mib:.1f} MiB, "
          f"median of {args.steps} alternated steps")
    print(f"{'procs':>5} {'bucket MiB':>10} {'step ms':>8} {'efficiency':>10} {'all-reduce share':>16}")
    for world, row in results.items():
        for bucket in args.buckets:
            step, skip = row[f"{bucket}/sum"], row[f"{bucket}/skip"]
            one = results[args.worlds[0]][f"{bucket}/sum"]
            print(f"{world:>5} {bucket:>10g} {step * 1e3:>8.0f} {one / step:>10.2f} "
                  f"{max(0.0, 1 - skip / step):>16.0%}")
    print("efficiency = step time at 1 process / at W (same batch per process); all-reduce share = "
          "1 - step without the all-reduce / step with it.")
    if max(args.worlds) > (os.cpu_count() or 1):
        print(f"{max(args.worlds)} processes on {os.cpu_count()} cores: oversubscribed, the efficiency there "
              "measures CPU contention, not the network.")
    return {"results": results, "buckets": args.buckets}


def plot_ddp(result: dict, out: Path) -> Path:
    fig, (left, right) = new_figure(1, 2, figsize=(10, 4))
    results, buckets = result["results"], result["buckets"]
    worlds = list(results)
    for bucket in buckets:
        one = results[worlds[0]][f"{bucket}/sum"]
        left.plot(worlds, [one / results[w][f"{bucket}/sum"] for w in worlds], marker="o",
                  label=f"bucket {bucket:g} MiB")
        right.plot(worlds, [100 * max(0.0, 1 - results[w][f"{bucket}/skip"] / results[w][f"{bucket}/sum"])
                            for w in worlds], marker="o", label=f"bucket {bucket:g} MiB")
    left.set(xlabel="gloo processes", ylabel="efficiency vs 1 process", title="weak scaling", xticks=worlds)
    right.set(xlabel="gloo processes", ylabel="% of the step", title="all-reduce share", xticks=worlds)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    return save_figure(fig, out / "scale_ddp.png", dpi=110)


# ----------------------------------------------------------------------------------- loader
def bench_loader(args) -> dict:
    from data.datasets import FaceRecordDataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers; with 0 workers, OpenMP threads stall on a busy machine
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bench_data.build_pack(Path(tmp), args.records)
            dataset = FaceRecordDataset(Path(tmp), train=True)
            bare, per_worker = bench_data.bench_decode([dataset], repeat=2)
            rates = {w: bench_data.bench_loader(dataset, batch_size=64, epochs=args.loader_epochs,
                                                num_workers=w) for w in args.workers}
    finally:
        torch.set_num_threads(threads)
    print(f"\nLoader: {args.records} JPEG records 112x112, batch 64 (decode + flip + normalise per image), "
          f"{args.loader_epochs} epoch(s), torch on 1 thread")
    print(f"{'workers':>7} {'images/s':>9} {'x decode limit':>14}")
    for workers, rate in rates.items():
        print(f"{workers:>7} {rate:>9.0f} {rate / bare:>14.2f}")
    print(f"decode limit (bare cv2.imdecode, one process): {bare:.0f} images/s; one process's "
          f"decode + flip + normalise: {per_worker:.0f} images/s. {os.cpu_count()} cores.")
    return {"rates": rates, "decode_limit": bare, "per_worker": per_worker}


def plot_loader(result: dict, out: Path) -> Path:
    fig, ax = new_figure(figsize=(5, 4))
    workers = list(result["rates"])
    ax.bar([str(w) for w in workers], [result["rates"][w] for w in workers])
    ax.axhline(result["decode_limit"], color="k", linestyle="--", linewidth=0.8,
               label="bare decode, 1 process")
    ax.set(xlabel="loader workers", ylabel="images/s", title="build_loader throughput")
    ax.legend(fontsize=8)
    return save_figure(fig, out / "scale_loader.png", dpi=110)


# ----------------------------------------------------------------------------------- activation
def bench_activation(args) -> dict:
    rows = {}
    for model in args.models:
        for checkpointed in (False, True):
            print(f"  {model}, activation checkpointing {'on' if checkpointed else 'off'} ...", flush=True)
            ns = SimpleNamespace(model=model, device="cpu", input_size=args.act_size,
                                 threads=torch.get_num_threads())
            rows[model, checkpointed] = bench_train.memory_of("sn", ns, args.act_batch, "off", False,
                                                              checkpointed)
    print(f"\nActivation checkpointing: SN, {args.act_size}x{args.act_size}, batch {args.act_batch}, "
          f"ArcFace head (1,000 classes), {torch.get_num_threads()} threads, each in its own process")
    print(f"{'model':>11} {'checkpointing':>13} {'peak MiB':>9} {'step ms':>8} {'memory':>7} {'time':>6}")
    for (model, checkpointed), row in rows.items():
        base = rows[model, False]
        print(f"{model:>11} {'on' if checkpointed else 'off':>13} {row['rss_growth_mib']:>9.0f} "
              f"{row['step_s'] * 1e3:>8.0f} {row['rss_growth_mib'] / base['rss_growth_mib']:>6.2f}x "
              f"{row['step_s'] / base['step_s']:>5.2f}x")
    print("peak = peak RSS growth of 3 training steps (weights, gradients, momentum and activations); "
          "step = median of the last 2.")
    return {"rows": rows}


def plot_activation(result: dict, out: Path) -> Path:
    fig, (left, right) = new_figure(1, 2, figsize=(10, 4))
    models = list(dict.fromkeys(model for model, _ in result["rows"]))
    for offset, checkpointed in ((-0.2, False), (0.2, True)):
        xs = [i + offset for i in range(len(models))]
        label = "checkpointing on" if checkpointed else "off"
        left.bar(xs, [result["rows"][m, checkpointed]["rss_growth_mib"] for m in models], 0.4, label=label)
        right.bar(xs, [result["rows"][m, checkpointed]["step_s"] * 1e3 for m in models], 0.4, label=label)
    for ax, ylabel in ((left, "peak MiB"), (right, "step ms")):
        ax.set(xticks=range(len(models)), xticklabels=models, ylabel=ylabel)
        ax.legend(fontsize=8)
    left.set_title("peak training memory")
    right.set_title("step time")
    return save_figure(fig, out / "scale_activation.png", dpi=110)


# ----------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for the PNG plots")
    parser.add_argument("--quick", action="store_true", help="smoke run of every section, small sizes")
    parser.add_argument("--budget-gib", type=float, default=4.0,
                        help="measure Partial FC sizes whose processes together fit in this (default 4)")
    args = parser.parse_args(argv)
    full = dict(classes=[10_000, 100_000, 1_000_000, 10_000_000], rates=[1.0, 0.3, 0.1], worlds=[1, 2, 4],
                pfc_batch=128, warmup=1, steps=3, buckets=[0.25, 1.0, 25.0], ddp_width=32, ddp_size=112,
                ddp_batch=8, records=2000, workers=[0, 1, 2], loader_epochs=2,
                models=["iresnet50", "iresnet100"], act_size=112, act_batch=8)
    quick = dict(classes=[1000, 10_000], rates=[1.0, 0.1], worlds=[1, 2], pfc_batch=32, warmup=1, steps=2,
                 buckets=[0.25, 25.0], ddp_width=8, ddp_size=32, ddp_batch=4, records=300, workers=[0, 1],
                 loader_epochs=1, models=["iresnet18"], act_size=32, act_batch=4)
    for key, value in (quick if args.quick else full).items():
        setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average {' '.join(load)}")
    sections = {"pfc": (bench_pfc, plot_pfc), "ddp": (bench_ddp, plot_ddp),
                "loader": (bench_loader, plot_loader), "activation": (bench_activation, plot_activation)}
    for name in args.only:
        measure, plot = sections[name]
        start = time.perf_counter()
        print(f"\n[{name}]", flush=True)
        result = measure(args)
        print(f"plot: {plot(result, args.out)}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
