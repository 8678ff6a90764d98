"""Training-step cost of Switchable Normalization against BatchNorm, side by side in one run.

One step = forward + backward + SGD step of an IResNet with a Partial FC ArcFace head (1,000 classes)
on a fixed random batch, as ``facerec.train`` does it. SN and BN steps alternate (so machine load
hits both alike) and medians are compared; target: SN/BN <= 1.15. Peak memory of each is measured in
its own subprocess (CPU: peak RSS growth over the process's state before building the model, via
``resource.getrusage``; CUDA: ``torch.cuda.max_memory_allocated``).

    python -m benchmarks.bench_train                       # iresnet50, batch 16, 112x112, CPU
    python -m benchmarks.bench_train --device cuda         # + images/s, bf16, channels-last, batch 128
    python -m benchmarks.bench_train --quick               # smoke run (iresnet18, batch 4, 64x64)

``--compile``: eager against ``torch.compile``d (inductor) training steps, BN and SN side by side, on the
quickstart model (configs/quickstart.yaml: iresnet18 width 16, 48x48, batch 64, 128-d) and on iresnet50
(batch 16, 112x112; on cuda batch 128, bf16, channels-last). The backbone is compiled, as
``train.compile`` does; the first step of each compiled model (its compilation) is timed apart.
Target: compiled SN >= 1.3x eager SN on the quickstart model (CPU).

    python -m benchmarks.bench_train --compile                       # both setups, CPU
    python -m benchmarks.bench_train --compile --setups quickstart   # one of them
    python -m benchmarks.bench_train --compile --device cuda --setups iresnet50
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from backbones import build_backbone
from facerec.compiled import MODES, missing_compiler
from facerec.config import load_config
from facerec.optim import build_optimizer, param_groups
from losses import build_head

NUM_CLASSES = 1000
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@dataclass(frozen=True)
class Setup:
    """One benchmarked training step: backbone, its sizes, batch and numerics."""

    label: str
    model: str
    input_size: int
    batch: int
    width: int = 64
    embedding: int = 512
    precision: str = "off"
    channels_last: bool = False
    activation_checkpointing: bool = False

    def describe(self) -> str:
        return (f"{self.label}: {self.model} width {self.width}, {self.input_size}x{self.input_size}, "
                f"batch {self.batch}, {self.embedding}-d, precision {self.precision}"
                f"{', channels-last' if self.channels_last else ''}")


def quickstart_setup() -> Setup:
    """The model and batch of configs/quickstart.yaml."""
    config = load_config(QUICKSTART)
    model, train = config["model"], config["train"]
    return Setup("quickstart", model["name"], model["input_size"], train["batch_size"], model["width"],
                 model["embedding_size"])


def compile_setups(args) -> dict[str, Setup]:
    """The setups of ``--compile`` by name (``--quick``: tiny stand-ins of the same names)."""
    gpu = dict(precision="bf16", channels_last=True) if args.device == "cuda" else {}
    if args.quick:
        tiny = Setup("tiny", "iresnet18", 32, 4, width=8, embedding=16)
        return {"quickstart": replace(tiny, label="quickstart (tiny)"),
                "iresnet50": replace(tiny, label="iresnet50 (tiny)", **gpu)}
    return {"quickstart": quickstart_setup(),
            "iresnet50": Setup("iresnet50", "iresnet50", 112, 128 if args.device == "cuda" else 16, **gpu)}


def make_step(norm: str, args, batch: int, precision: str = "off", channels_last: bool = False,
              activation_checkpointing: bool = False, setup: Setup | None = None,
              compile_mode: str | None = None):
    """A closure running one training step with ``norm`` on a fixed batch: of ``setup``, else of
    ``args.model`` at ``args.input_size`` with ``batch, precision, channels_last,
    activation_checkpointing``. ``compile_mode``: the backbone through ``torch.compile`` with that mode
    (None: eager)."""
    setup = setup or Setup("", args.model, args.input_size, batch, precision=precision,
                           channels_last=channels_last, activation_checkpointing=activation_checkpointing)
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = build_backbone(setup.model, norm=norm, input_size=setup.input_size, width=setup.width,
                              embedding_size=setup.embedding,
                              activation_checkpointing=setup.activation_checkpointing).to(device)
    head = build_head({"type": "arcface"}, embedding_size=setup.embedding, num_classes=NUM_CLASSES).to(device)
    if setup.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    optim_cfg = load_config(None)["optim"]
    optimizer = build_optimizer(param_groups(backbone, head, optim_cfg), optim_cfg)
    images = torch.randn(setup.batch, 3, setup.input_size, setup.input_size, device=device)
    if setup.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (setup.batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setup.precision)
    model = backbone
    if compile_mode is not None:
        model = torch.compile(backbone, mode=None if compile_mode == "default" else compile_mode)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            embeddings = model(images)
        loss = head(embeddings.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
        optimizer.step()

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_alternating(steps: dict, device: str, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step for each entry of ``steps``, alternating the entries every repeat."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def memory_of(norm: str, args, batch: int, precision: str, channels_last: bool,
              activation_checkpointing: bool = False) -> dict:
    """Peak memory of a few training steps with ``norm``, measured in a fresh subprocess."""
    command = [sys.executable, "-m", "benchmarks.bench_train", "--measure-memory", norm,
               "--model", args.model, "--device", args.device, "--input-size", str(args.input_size),
               "--batch", str(batch), "--precision", precision, "--threads", str(args.threads)]
    command += ["--channels-last"] if channels_last else []
    command += ["--activation-checkpointing"] if activation_checkpointing else []
    result = subprocess.run(command, capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])  # the repository root
    return json.loads(result.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so imports do not count as the step's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory(args) -> None:
    """Subprocess mode: run 3 steps, print peak memory (MiB) and the median time of the last 2 as JSON."""
    before_kib = _status_kib("VmRSS")
    if not (_reset_peak_rss() and before_kib):  # fallback: peak since start, imports included
        before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = make_step(args.measure_memory, args, args.batch, args.precision, args.channels_last,
                     args.activation_checkpointing)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - start)
    peak_kib = max(_status_kib("VmHWM") or 0, 0) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss_growth_mib": (peak_kib - before_kib) / 1024, "peak_rss_mib": peak_kib / 1024,
           "step_s": statistics.median(times[1:])}  # the first step warms up
    if args.device == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def compare(args, batch: int, precision: str, channels_last: bool, label: str) -> None:
    steps = {norm: make_step(norm, args, batch, precision, channels_last) for norm in ("bn", "sn")}
    times = timed_alternating(steps, args.device, args.warmup, args.repeats)
    med = {norm: statistics.median(t) for norm, t in times.items()}
    memory = {norm: memory_of(norm, args, batch, precision, channels_last) for norm in ("bn", "sn")}
    print(f"\n{label}: {args.model}, batch {batch}, {args.input_size}x{args.input_size}, "
          f"precision {precision}{', channels-last' if channels_last else ''}, "
          f"{args.repeats} alternating repeats (medians)")
    for norm in ("bn", "sn"):
        mem = memory[norm]
        mem_text = (f"cuda peak {mem['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in mem else
                    f"peak RSS growth {mem['rss_growth_mib']:.0f} MiB "
                    f"(peak RSS {mem['peak_rss_mib']:.0f} MiB)")
        print(f"  {norm.upper()}: {med[norm] * 1000:8.1f} ms/step  {batch / med[norm]:8.1f} images/s  "
              f"{mem_text}")
    ratio = med["sn"] / med["bn"]
    key = "cuda_peak_mib" if args.device == "cuda" else "rss_growth_mib"
    mem_ratio = memory["sn"][key] / max(memory["bn"][key], 1e-9)
    print(f"  SN/BN step time: {ratio:.3f} (target <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'}); "
          f"SN/BN peak memory: {mem_ratio:.3f}")


def compare_compiled(args, setup: Setup) -> None:
    """Eager and compiled steps of ``setup``, BN and SN, timed side by side (alternating)."""
    steps, first = {}, {}
    for norm in ("bn", "sn"):
        for mode in ("eager", "compiled"):
            step = make_step(norm, args, setup.batch, setup=setup,
                             compile_mode=None if mode == "eager" else args.compile_mode)
            start = time.perf_counter()
            step()  # compiles, for the compiled ones
            sync(args.device)
            first[norm, mode] = time.perf_counter() - start
            print(f"  {norm.upper()} {mode}: first step {first[norm, mode]:.1f} s", flush=True)
            steps[norm, mode] = step
    times = timed_alternating(steps, args.device, args.warmup, args.repeats)
    med = {key: statistics.median(t) for key, t in times.items()}
    print(f"\n{setup.describe()}; compile mode {args.compile_mode}; {args.repeats} alternating repeats "
          f"(medians); first step = compilation for compiled models, not in ms/step")
    print(f"  {'':13} {'ms/step':>9} {'images/s':>10} {'first step s':>13} {'vs eager':>9}")
    for norm, mode in steps:
        speedup = med[norm, "eager"] / med[norm, mode]
        print(f"  {norm.upper() + ' ' + mode:13} {med[norm, mode] * 1000:9.1f} "
              f"{setup.batch / med[norm, mode]:10.1f} {first[norm, mode]:13.1f} {speedup:8.2f}x")
    ratio = med["sn", "eager"] / med["sn", "compiled"]
    quickstart_cpu = setup.label == "quickstart" and args.device == "cpu"  # where the 1.3x target applies
    target = f" (target >= 1.3: {'met' if ratio >= 1.3 else 'NOT met'})" if quickstart_cpu else ""
    print(f"  SN compiled {setup.batch / med['sn', 'compiled']:.1f} images/s, {ratio:.2f}x eager SN{target}; "
          f"SN/BN compiled: {med['sn', 'compiled'] / med['bn', 'compiled']:.3f}, eager: "
          f"{med['sn', 'eager'] / med['bn', 'eager']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default=None, help="backbone (default iresnet50; --quick: iresnet18)")
    parser.add_argument("--batch", type=int, default=None, help="CPU batch (default 16; --quick: 4)")
    parser.add_argument("--input-size", type=int, default=None, help="default 112 (--quick: 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per norm (default 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--compile", action="store_true", help="eager vs torch.compile, BN and SN")
    parser.add_argument("--setups", default="quickstart,iresnet50",
                        help="--compile: comma-separated, of quickstart, iresnet50")
    parser.add_argument("--compile-mode", default="default", choices=MODES)
    parser.add_argument("--measure-memory", choices=("bn", "sn"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="off", help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--activation-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or ("iresnet18" if args.quick else "iresnet50")
    args.batch = args.batch or (4 if args.quick else 16)
    args.input_size = args.input_size or (64 if args.quick else 112)
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.warmup = 1 if args.quick else args.warmup
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.measure_memory:
        measure_memory(args)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}")
    if args.compile:
        missing = missing_compiler(torch.device(args.device))
        if missing:
            parser.error(f"--compile: {missing}")
        setups = compile_setups(args)
        for name in args.setups.split(","):
            if name not in setups:
                parser.error(f"--setups: unknown setup {name!r}; expected {', '.join(setups)}")
            compare_compiled(args, setups[name])
        return
    compare(args, args.batch, "off", False, "training step")
    if args.device == "cuda":
        compare(args, 32 if args.quick else 128, "bf16", True, "throughput")


if __name__ == "__main__":
    main()
