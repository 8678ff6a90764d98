"""Issue 14, defects 1-4 and the checkpoint fallback: a run folder never loses a run, whatever happens."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.chaos_train import descendants, still_alive_after
from data import pack_folder
from facerec import checkpoint as ckpt
from tests.test_resume import run as run_in_process

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


SHORT = ("train.max_steps=4", "train.checkpoint_every=1", "train.epochs=100")  # on conftest's config_path


def run(config_path: Path, *overrides: str) -> tuple[dict, str]:
    return run_in_process(config_path, *SHORT, *overrides)


def start(config_path: Path, run_dir: Path, *overrides: str, launcher=(sys.executable,)) -> subprocess.Popen:
    """``run.py train`` in a subprocess (a long run unless overridden); output to ``run_dir``.log."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{run_dir}.log", "w")  # noqa: SIM115 (the child holds it)
    command = [*launcher, "run.py", "train", "--config", str(config_path), f"train.output_dir={run_dir}",
               "train.max_steps=100000", "train.epochs=100000", "train.checkpoint_every=1000", *overrides]
    # A suite started in the background of a script (`.ci/run &`) inherits an ignored SIGINT, which Python
    # keeps ignoring until the trainer's stop handler is installed: the child gets SIGINT's default
    # instead, as under a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                                stderr=subprocess.STDOUT)
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_for(condition, proc: subprocess.Popen, run_dir: Path, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, Path(f"{run_dir}.log").read_text()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_starting_over_keeps_the_old_run_and_rotation_keeps_the_new_one(config_path, tmp_path):
    run_dir = tmp_path / "run"
    run(config_path, f"train.output_dir={run_dir}")
    old = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").glob("step_*.pt")}
    assert sorted(old) == ["step_3.pt", "step_4.pt"]
    summary, out = run(config_path, f"train.output_dir={run_dir}", "train.resume=none", "train.max_steps=2")
    assert [p.name for p in ckpt.step_checkpoints(run_dir / "checkpoints")] == ["step_1.pt", "step_2.pt"]
    (previous,) = run_dir.glob("previous-*")
    assert f"moved to {previous}" in out
    assert {p.name: p.read_bytes() for p in (previous / "checkpoints").glob("step_*.pt")} == old
    assert len((previous / "metrics.jsonl").read_text().splitlines()) == 4
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    again, out = run(config_path, f"train.output_dir={run_dir}", "train.max_steps=3")
    assert f"resumed from {run_dir / 'checkpoints' / 'step_2.pt'}" in out and again["trained_steps"] == 1


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (38, 39, 40):
        ckpt.save_checkpoint({"step": step}, tmp_path / f"step_{step}.pt")
    ckpt.save_checkpoint({"step": 1}, tmp_path / "step_1.pt")
    ckpt.prune_checkpoints(tmp_path, keep=3, current=tmp_path / "step_1.pt")
    assert (tmp_path / "step_1.pt").exists()


def test_a_second_run_in_the_folder_is_refused_and_a_dead_holders_lock_taken_over(config_path, tmp_path):
    run_dir = tmp_path / "busy"
    proc = start(config_path, run_dir)
    try:
        wait_for(lambda: logged_steps(run_dir) >= 1, proc, run_dir)
        config_before = (run_dir / "config.yaml").read_text()
        with pytest.raises(ValueError, match=rf"in use by PID {proc.pid} on {socket.gethostname()}"):
            run(config_path, f"train.output_dir={run_dir}")
        assert (run_dir / "config.yaml").read_text() == config_before
    finally:
        proc.kill()
        proc.wait()
    summary, out = run(config_path, f"train.output_dir={run_dir}", "train.max_steps=1")
    assert summary["steps"] >= 1


def test_a_run_refused_at_resume_leaves_config_yaml_alone(config_path, tmp_path):
    run_dir = tmp_path / "run"
    run(config_path, f"train.output_dir={run_dir}", "train.max_steps=1")
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ValueError, match="differs from"):
        run(config_path, f"train.output_dir={run_dir}", "model.norm=bn")
    assert (run_dir / "config.yaml").read_text() == before


def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_readable_one(config_path, tmp_path):
    run_dir = tmp_path / "run"
    run(config_path, f"train.output_dir={run_dir}", "train.max_steps=2")
    newest = run_dir / "checkpoints" / "step_2.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    summary, out = run(config_path, f"train.output_dir={run_dir}", "train.max_steps=3")
    assert f"{newest} is not readable" in out and "resumed from" in out and "step_1.pt" in out
    assert summary["trained_steps"] == 2


def test_stale_temporary_files_are_removed_at_the_next_start(config_path, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = run_dir / "checkpoints" / f".step_7.pt.tmp{dead}"
    stale.write_bytes(b"half a checkpoint")
    run(config_path, f"train.output_dir={run_dir}", "train.max_steps=1")
    assert not stale.exists()
    faces = tmp_path / "faces" / "ann"
    faces.mkdir(parents=True)
    (faces / "0.png").write_bytes(_png())
    out = tmp_path / "packed"
    out.mkdir()
    leftover = out / f".train.rec.tmp{dead}"
    leftover.write_bytes(b"half a pack")
    pack_folder(tmp_path / "faces", out, size=32, workers=1)
    assert not leftover.exists()


def _png() -> bytes:
    import cv2
    import numpy as np

    return cv2.imencode(".png", np.full((40, 40, 3), 128, np.uint8))[1].tobytes()


def test_an_interrupted_synthetic_generation_is_regenerated(config_path, tmp_path):
    synth = ["data.synth.identities=100", "data.synth.images_per_identity=30", "data.synth.size=32",
             "data.synth.verify_identities=20", "data.synth.verify_pairs=20"]
    data = tmp_path / "data"
    run_dir = tmp_path / "run"
    proc = start(config_path, run_dir, f"data.train={data}", *synth)
    wait_for(lambda: "generating synthetic" in Path(f"{run_dir}.log").read_text(), proc, run_dir)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:  # a SIGINT that does not stop the run fails this test instead of hanging the suite
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("SIGINT during the synthetic generation did not stop the run within 120 s:\n"
                    + Path(f"{run_dir}.log").read_text()[-2000:])
    summary, out = run(config_path, f"train.output_dir={run_dir}", "train.max_steps=1", f"data.train={data}",
                       *synth)
    assert summary["steps"] == 1 and "generating synthetic" in out
    # a set left half-written by an older version (files in place, no manifest) is regenerated too
    (data / "synth.json").unlink()
    summary, out = run(config_path, f"train.output_dir={tmp_path / 'again'}", "train.max_steps=1",
                       f"data.train={data}", *synth)
    assert "incomplete synthetic set" in out and (data / "synth.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_a_checkpoint_and_say_how_to_resume(config_path, tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = start(config_path, run_dir, "data.num_workers=1")
    wait_for(lambda: logged_steps(run_dir) >= 3, proc, run_dir)
    children = descendants(proc.pid)
    assert children, "no loader worker started"
    proc.send_signal(sig)
    assert proc.wait(timeout=120) != 0
    text = Path(f"{run_dir}.log").read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    (line,) = [x for x in text.splitlines() if x.startswith("stopped at step")]
    step = int(line.split()[3].rstrip(":;,"))
    assert step >= 3 and (run_dir / "checkpoints" / f"step_{step}.pt").exists()
    assert f"python run.py train --config {config_path}" in line and f"train.output_dir={run_dir}" in line
    assert not still_alive_after(children, 30)


def test_children_exit_when_the_trainer_is_sigkilled(config_path, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(config_path, run_dir, "data.num_workers=1")
    wait_for(lambda: logged_steps(run_dir) >= 2, proc, run_dir)
    children = descendants(proc.pid)
    assert len(children) >= 2, children  # the fork server (and resource tracker) and the loader worker
    proc.kill()
    proc.wait()
    left = still_alive_after(children, 30)
    for pid in left:  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(config_path, tmp_path):
    """Under torchrun, SIGTERM to rank 1 alone: both ranks stop at the same step and the checkpoint of that
    step is written (a rank that stopped alone would leave the other waiting in a collective)."""
    run_dir = tmp_path / "run"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    proc = start(config_path, run_dir, launcher=torchrun)
    try:
        wait_for(lambda: logged_steps(run_dir) >= 2, proc, run_dir)
        (rank1,) = [pid for pid in descendants(proc.pid)
                    if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()]
        os.kill(rank1, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    text = Path(f"{run_dir}.log").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("stopped at step")]
    step = int(line.split()[3])
    assert (run_dir / "checkpoints" / f"step_{step}.pt").exists(), text[-3000:]
    assert logged_steps(run_dir) == step and "the same torchrun command" in line
    # no traceback through our code (torchrun reports the exit codes with its own, from the venv, which the
    # README's install puts inside the repository)
    ours = [f'File "{ROOT / name}' for name in ("run.py", "facerec", "backbones", "losses", "data", "eval")]
    assert not any(frame in text for frame in ours) and "KeyboardInterrupt" not in text
