"""Load a trained backbone from a checkpoint file or a training run directory."""
from __future__ import annotations

from pathlib import Path

import torch

from backbones import build_backbone
from facerec.config import upgrade_model_section

from .checkpoint import CheckpointError, load_checkpoint

SHOWN_KEYS = 8  # how many differing keys an error message lists per kind


def find_checkpoint(path) -> Path:
    """``path`` if it is a file; for a run directory its ``checkpoints/best.pt``, else the newest ``*.pt``."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for folder in (path / "checkpoints", path):
        if (folder / "best.pt").is_file():
            return folder / "best.pt"
        found = [p for p in folder.glob("*.pt") if p.is_file()]
        if found:
            return max(found, key=lambda p: p.stat().st_mtime)
    raise FileNotFoundError(f"no checkpoint in {path}: looked for {path / 'checkpoints'}/best.pt, "
                            f"{path / 'checkpoints'}/*.pt and {path}/*.pt")


def model_kwargs(config: dict) -> dict:
    """``build_backbone`` keyword arguments from a config's ``model`` section (a checkpoint's included:
    older keys are mapped by ``upgrade_model_section``)."""
    model = upgrade_model_section(config["model"])
    return {**{k: v for k, v in model.items() if k != "norm_kwargs"}, **model["norm_kwargs"]}


def _state_differences(expected: dict, found: dict) -> list[str]:
    """Human-readable lines for keys missing from / unexpected in ``found`` and shape mismatches."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(found[k].shape)}, model {tuple(v.shape)}"
              for k, v in expected.items() if k in found and tuple(found[k].shape) != tuple(v.shape)]
    lines = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f" ... and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:SHOWN_KEYS]) + more)
    return lines


WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DistributedDataParallel's


def unwrapped_state(state: dict) -> dict:
    """``state`` with the key prefixes of wrapped modules removed (a ``torch.compile``'d or DDP model's
    state dict, saved by other code), when every key has them; else ``state`` itself."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            return unwrapped_state({key[len(prefix):]: value for key, value in state.items()})
    return state


def load_backbone_state(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> None:
    """Load ``state`` strictly into ``model`` (also the state dict of a compiled or DDP-wrapped one); a
    mismatch raises CheckpointError listing differing keys."""
    state = unwrapped_state(state)
    lines = _state_differences(model.state_dict(), state)
    if lines:
        raise CheckpointError(f"{source}: backbone weights do not fit the model built from its config\n"
                              + "\n".join(lines))
    model.load_state_dict(state)


def load_model_checkpoint(path) -> dict:
    """The checkpoint (file or run directory, see :func:`find_checkpoint`) of a model: its dict, with
    ``path`` (the file read) added, checked to hold the backbone and the config it was built from."""
    file = find_checkpoint(path)
    checkpoint = load_checkpoint(file)
    if "backbone" not in checkpoint:
        raise CheckpointError(f"{file}: not a training checkpoint (expected a dict with a 'backbone' entry)")
    config = checkpoint.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or "name" not in model:
        raise CheckpointError(f"{file}: checkpoint has no config['model'] section describing the backbone")
    checkpoint["path"] = str(file)
    return checkpoint


def build_model(checkpoint: dict, source="checkpoint", device="cpu") -> torch.nn.Module:
    """The backbone of ``checkpoint["config"]["model"]`` with its weights, in eval mode on ``device``."""
    try:
        model = build_backbone(**model_kwargs(checkpoint["config"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{source}: cannot build the backbone from config['model'] "
                              f"{checkpoint['config']['model']}: {exc}") from None
    load_backbone_state(model, checkpoint["backbone"], source=str(source))
    return model.to(device).eval()


def load_model(path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the backbone of a checkpoint (file or run directory) in eval mode on ``device``.

    Returns ``(model, checkpoint)``, the checkpoint dict with ``path`` (the file read) added;
    ``checkpoint["config"]["model"]["input_size"]`` is the image size.
    """
    checkpoint = load_model_checkpoint(path)
    return build_model(checkpoint, checkpoint["path"], device), checkpoint
