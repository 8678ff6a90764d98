"""Training checkpoints: atomic writes, ``step_<N>.pt`` rotation, RNG state as plain data, safe loading.

A checkpoint is a dict loadable with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists,
dicts only, so loading a file from elsewhere cannot run code):
``backbone, head, optimizer, head_optimizer, schedule, scaler, rng, step, epoch, world_size, config, best``.

The Partial FC head is sharded over processes, so its optimizer state is kept in full (world-size
independent) form: :func:`head_optimizer_state` assembles it through the head's own world-size independent
``state_dict`` and :func:`load_head_optimizer_state` shards it back, so a checkpoint from N processes
resumes on M with the exact momentum / Adam moments of every class centre.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
REQUIRED = ("backbone", "head", "step", "epoch", "config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not hold (or fit) what it is loaded for."""


def rng_state() -> dict:
    """This process's torch / CUDA / numpy / python RNG states as tensors and plain types."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _per_element_keys(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[str]:
    keys = set()
    for p in params:
        keys.update(k for k, v in optimizer.state.get(p, {}).items()
                    if torch.is_tensor(v) and v.shape == p.shape)
    return sorted(keys)


def head_optimizer_state(optimizer: torch.optim.Optimizer, head: nn.Module) -> dict:
    """World-size independent optimizer state of ``head``: ``{state key: full head state_dict}`` + scalars.

    Collective when distributed (the head's ``state_dict`` gathers shards): call on every rank.
    Each per-element state tensor (momentum buffer, Adam moments) is written into the head's parameters,
    read back through ``head.state_dict()`` in full form, and the parameters are restored.
    """
    params = [p for p in head.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    out: dict = {"full": {}, "scalars": {}}
    with torch.no_grad():
        for key in _per_element_keys(optimizer, params):
            for p in params:
                p.copy_(optimizer.state[p][key])
            out["full"][key] = {k: v.detach().to("cpu", copy=True) for k, v in head.state_dict().items()}
        for p, original in zip(params, saved):
            p.copy_(original)
    for p in params:  # scalar entries such as Adam's step count are the same for every shard
        for k, v in optimizer.state.get(p, {}).items():
            if not (torch.is_tensor(v) and v.shape == p.shape):
                out["scalars"][k] = v.cpu() if torch.is_tensor(v) else v
    return out


def load_head_optimizer_state(optimizer: torch.optim.Optimizer, head: nn.Module, state: dict) -> None:
    """Shard a :func:`head_optimizer_state` dict into ``optimizer`` for this process's part of ``head``.

    Loads the full tensors through ``head.load_state_dict`` (which keeps this rank's shard), then restores
    the head's parameters; load the head's checkpoint weights afterwards (its buffers are overwritten).
    """
    params = [p for p in head.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for key, full in state["full"].items():
            head.load_state_dict(full)
            for p in params:
                optimizer.state[p][key] = p.detach().clone()
        for p, original in zip(params, saved):
            p.copy_(original)
    for p in params:
        for k, v in state["scalars"].items():
            optimizer.state[p][k] = v.clone() if torch.is_tensor(v) else v


def split_optimizer_state(optimizer: torch.optim.Optimizer, head: nn.Module) -> dict:
    """``optimizer.state_dict()`` without the head parameters' state (saved in full form separately)."""
    head_ids = {id(p) for p in head.parameters()}
    sd = optimizer.state_dict()
    index = 0
    drop = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in head_ids:
                drop.add(index)
            index += 1
    sd["state"] = {k: v for k, v in sd["state"].items() if k not in drop}
    return sd


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``: a pickle that needs code is refused).

    FileNotFoundError when absent; :class:`CheckpointError` naming the file and what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    return state


def step_of(path: str | os.PathLike) -> int:
    """N of a ``step_<N>.pt`` file name."""
    return int(STEP_FILE.match(Path(path).name).group(1))


def step_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """``step_<N>.pt`` files in ``directory``, oldest (smallest N) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(step_of(p), p) for p in directory.iterdir() if STEP_FILE.match(p.name)]
    return [p for _, p in sorted(found)]


def prune_checkpoints(directory: str | os.PathLike, keep: int, current: str | os.PathLike) -> None:
    """Delete all but the newest ``keep`` step checkpoints up to ``current`` (the one just written): files
    of later steps, which this run did not write, and ``best.pt`` are never touched."""
    written = [p for p in step_checkpoints(directory) if step_of(p) <= step_of(current)]
    for old in written[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


def backbone_state(path: str | os.PathLike) -> dict:
    """The backbone state dict of a checkpoint file (a training checkpoint or a bare state dict)."""
    state = load_checkpoint(path)
    backbone = state.get("backbone", state)
    if not all(torch.is_tensor(v) for v in backbone.values()):
        raise CheckpointError(f"{path}: no 'backbone' state dict found (keys: {', '.join(list(state)[:8])})")
    return backbone
