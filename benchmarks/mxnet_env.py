"""An isolated virtual environment with the retired mxnet 1.9.1, to check our RecordIO against the original.

mxnet 1.9.1 needs numpy < 1.24, so it cannot live in the project's environment. The venv is built once
with ``python -m venv`` + pip and cached in ``$FACEREC_CACHE`` (default ``~/.cache/facerec``) under a name
keyed by the pinned versions; a file lock serialises concurrent builders. Used by
tests/test_mxnet_interop.py and benchmarks/bench_data.py (which run scripts in it with :func:`run_script`);
not part of the library, which never downloads anything.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REQUIREMENTS = ("mxnet==1.9.1", "numpy==1.23.5", "opencv-python-headless==4.10.0.84")


class MXNetUnavailable(RuntimeError):
    """mxnet could not be installed or imported here (the reason is the message)."""


def _last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def mxnet_python(timeout=1200) -> Path:
    """Path of the python of the cached mxnet venv, building it when needed; MXNetUnavailable on failure."""
    cache = Path(os.environ.get("FACEREC_CACHE", Path.home() / ".cache" / "facerec"))
    tag = hashlib.sha1(" ".join(REQUIREMENTS + (sys.version.split()[0],)).encode()).hexdigest()[:10]
    venv = cache / f"mxnet-venv-{tag}"
    python, done = venv / "bin" / "python", venv / ".complete"
    if done.exists():
        return python
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            ("python -m venv", [sys.executable, "-m", "venv", str(venv)]),
            ("pip install", [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                             "--retries", "2", "--timeout", "60", *REQUIREMENTS]),
            ("import mxnet", [str(python), "-c", "import mxnet, cv2, numpy; print(mxnet.__version__)"]),
        ]
        for name, command in steps:
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            except (OSError, subprocess.TimeoutExpired) as error:
                raise MXNetUnavailable(f"{name} failed: {error}") from None
            if result.returncode:
                raise MXNetUnavailable(f"{name} failed: {_last_line(result.stderr + result.stdout)}")
        done.write_text(" ".join(REQUIREMENTS) + "\n")
    return python


def run_script(source: str, *args, timeout=900) -> str:
    """Run a Python script (source text) in the mxnet venv with ``args``; return its stdout."""
    python = mxnet_python()
    env = dict(os.environ, OMP_NUM_THREADS="1", MXNET_ENGINE_TYPE="NaiveEngine", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "mxnet_side.py"
        script.write_text(source)
        result = subprocess.run([str(python), str(script), *map(str, args)], capture_output=True, text=True,
                                timeout=timeout, env=env, cwd=tmp)
    if result.returncode:
        raise RuntimeError(f"mxnet script failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


if __name__ == "__main__":
    print(mxnet_python())
