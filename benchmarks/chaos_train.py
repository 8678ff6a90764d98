"""Chaos training: kill a small run at random moments, resume it each time, compare with an unkilled run.

A tiny IResNet-18 trains on a small synthetic set with one loader worker. The run is killed again and
again (SIGKILL, SIGTERM and SIGINT in turn; at random times, during training, and while a checkpoint is
being written) and restarted with the same command each time, until it has been killed ``--kills`` times;
then it runs to the end. It prints the kills, the resumes, the steps lost beyond the last checkpoint, whether
the final weights are bitwise those of the same run never interrupted, and the orphaned processes and
temporary files left behind. Training is deterministic here (one thread, no flips, no dropout,
sample rate 1), so equal weights mean the resumed runs saw the same data, in the same order, from the same
state.

    python -m benchmarks.chaos_train              # 30 kills, a few minutes on 2 cores
    python -m benchmarks.chaos_train --kills 6    # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
MODES = ("at a random time", "during training", "during a checkpoint save")


def _parents() -> dict[int, int]:
    """``{pid: parent pid}`` of every process visible in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (children, their children, ...)."""
    parents = _parents()
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return [p for p in found if alive(p)]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not reaped, does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def still_alive_after(pids: list[int], seconds: float) -> list[int]:
    """Those of ``pids`` still running after waiting up to ``seconds`` for all of them to exit."""
    deadline = time.time() + seconds
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


def write_config(root: Path, steps: int) -> Path:
    """The data set and the config of the chaos run (paths relative to the config)."""
    import yaml

    from data import generate_synthetic

    generate_synthetic(root / "data", identities=16, images_per_identity=16, size=32, seed=1,
                       verify_identities=20, verify_pairs=20, workers=1, progress=False)
    path = root / "chaos.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "iresnet18", "norm": "sn", "embedding_size": 16, "input_size": 32, "width": 8},
        "head": {"type": "arcface", "scale": 16.0, "margin": 0.2},
        "data": {"train": "data", "num_workers": 1, "flip": False},
        "schedule": {"name": "cosine", "warmup_steps": 5},
        "train": {"batch_size": 16, "epochs": 1000, "max_steps": steps, "checkpoint_every": 4,
                  "keep_checkpoints": 2, "log_every": 1, "progress": False, "device": "cpu"},
    }))
    return path


def start(config: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    """``python run.py train`` of ``config`` into ``run_dir`` (one thread), output appended to ``log``."""
    with open(log, "a") as out:
        return subprocess.Popen(
            [sys.executable, "run.py", "train", "--config", str(config), f"train.output_dir={run_dir}"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def logged_step(run_dir: Path) -> int:
    """The last step in ``metrics.jsonl`` (0 when there is none)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    steps = [json.loads(line).get("step", 0) for line in lines if line.endswith("}")]
    return max(steps, default=0)


def saved_step(run_dir: Path) -> int:
    """The step of the newest step checkpoint (0 when there is none)."""
    from facerec.checkpoint import step_checkpoints, step_of

    found = step_checkpoints(run_dir / "checkpoints")
    return step_of(found[-1]) if found else 0


def saving(run_dir: Path) -> bool:
    """Whether a checkpoint is being written (its temporary file exists)."""
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.startswith(".step_") for p in folder.iterdir())


def wait_for_moment(proc: subprocess.Popen, run_dir: Path, mode: str, rng: random.Random) -> bool:
    """Wait for the kill moment of ``mode``; False when the run ended first."""
    if mode == "at a random time":
        deadline = time.time() + rng.uniform(0.2, 12.0)
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        return proc.poll() is None
    start_step = logged_step(run_dir)
    while proc.poll() is None and logged_step(run_dir) <= start_step:
        time.sleep(0.01)
    if mode == "during training":
        time.sleep(rng.uniform(0.0, 1.5))
    else:
        while proc.poll() is None and not saving(run_dir):
            time.sleep(0.0005)
    return proc.poll() is None


def weights(path: Path) -> dict:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {f"{part}.{k}": v for part in ("backbone", "head") for k, v in state[part].items()}


def compare(reference: Path, chaos: Path) -> str:
    a, b = weights(reference), weights(chaos)
    if a.keys() != b.keys():
        return "no (different tensors)"
    if all(a[k].equal(b[k]) for k in a):
        return "yes (bitwise)"
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return f"no (max abs difference {worst:.3g})"


def temporary_files(run_dir: Path) -> list[Path]:
    from data.workers import TEMPORARY

    return [p for p in run_dir.rglob("*") if TEMPORARY.match(p.name)]


def chaos(args) -> None:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="chaos-"))
    config = write_config(root, args.steps)
    reference, run_dir, log = root / "reference", root / "chaos", root / "chaos.log"
    print(f"chaos run in {root}: {args.steps} steps, checkpoint every 4, 1 loader worker", flush=True)
    started = time.time()
    if start(config, reference, root / "reference.log").wait():
        raise SystemExit(f"the uninterrupted run failed: see {root / 'reference.log'}")
    print(f"uninterrupted run: {time.time() - started:.0f} s", flush=True)
    kills, lost, children, runs = [], {s.name: 0 for s in SIGNALS}, set(), 0
    while len(kills) < args.kills:
        sig, mode = SIGNALS[len(kills) % 3], MODES[(len(kills) // 3) % 3]
        proc = start(config, run_dir, log)
        runs += 1
        if not wait_for_moment(proc, run_dir, mode, rng):
            break  # the run finished before this kill
        children.update(descendants(proc.pid))
        during_save = saving(run_dir)
        proc.send_signal(sig)
        code = proc.wait()
        lost[sig.name] += max(0, logged_step(run_dir) - saved_step(run_dir))
        kills.append((sig.name, mode, during_save, code))
        print(f"kill {len(kills):2d}: {sig.name:7s} {mode:25s} step {logged_step(run_dir):4d}, "
              f"checkpoint {saved_step(run_dir):4d}{' (saving)' if during_save else ''}, exit {code}",
              flush=True)
    proc = start(config, run_dir, log)
    runs += 1
    proc.wait()
    orphans = still_alive_after(children, 2)  # children of the last kills: the moment they need to notice
    text = log.read_text()
    final = run_dir / "checkpoints" / f"step_{args.steps}.pt"
    print()
    per_signal = ", ".join(f"{s.name} {sum(k[0] == s.name for k in kills)}" for s in SIGNALS)
    print(f"kills: {len(kills)} ({per_signal}; {sum(k[2] for k in kills)} during a checkpoint save; "
          "loader workers on)")
    print(f"resumes: {text.count('resumed from')} (of {runs} starts)")
    print(f"steps lost beyond the last checkpoint: {sum(lost.values())} "
          f"({', '.join(f'{k} {v}' for k, v in lost.items())})")
    same = compare(reference / "checkpoints" / final.name, final) if final.exists() else "no (no run end)"
    print(f"final weights equal to an uninterrupted run's: {same}")
    print(f"orphaned processes left: {len(orphans)}")
    print(f"temporary files left: {len(temporary_files(run_dir))}")
    print(f"tracebacks in the chaos log: {text.count('Traceback')}; total {time.time() - started:.0f} s")
    for pid in orphans:  # leave the machine clean
        os.kill(pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--steps", type=int, default=240, help="length of the run (default 240)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    chaos(parser.parse_args())


if __name__ == "__main__":
    main()
