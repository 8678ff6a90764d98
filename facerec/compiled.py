"""``train.compile``: the training model through ``torch.compile`` (inductor), or eager with a one-line
reason when this machine has no compiler for it.

Inductor generates C++ (OpenMP) kernels on CPU, built with the C++ compiler named by ``$CXX`` when
torch was imported, else ``g++``, and Triton kernels on CUDA. Both are checked before compiling, so a
missing one falls back to eager at once instead of failing at the first step. The compiled module wraps
the original one (its state dict keys gain an ``_orig_mod.`` prefix): the engine keeps the original for
checkpoints.
"""
from __future__ import annotations

import shlex
import shutil

import torch
from torch import nn

MODES = ("default", "reduce-overhead", "max-autotune")


def missing_compiler(device: torch.device) -> str | None:
    """What ``torch.compile`` lacks to compile for ``device`` on this machine, in words; None: nothing."""
    from torch._dynamo.eval_frame import is_dynamo_supported

    if not is_dynamo_supported():
        return "torch.compile does not support this Python version"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "no triton (inductor's GPU kernel compiler) for this GPU"
    from torch._inductor import config as inductor_config

    wanted = inductor_config.cpp.cxx  # inductor tries these in turn: (None, $CXX or "g++")
    names = [name for name in (wanted if isinstance(wanted, (list, tuple)) else (wanted,)) if name]
    if any(shutil.which(shlex.split(name)[0]) for name in names):
        return None
    listed = " or ".join(repr(name) for name in names)
    return f"no C++ compiler for inductor's CPU kernels ({listed} not found on PATH; install g++ or set CXX)"


def compile_model(model: nn.Module, mode: str, device: torch.device) -> tuple[nn.Module, str]:
    """``(module, message)``: ``torch.compile(model, mode=mode)``, or ``model`` itself when
    :func:`missing_compiler` names something missing; ``message`` says which of the two happened."""
    if mode not in MODES:
        raise ValueError(f"train.compile_mode must be one of {', '.join(MODES)}, got {mode!r}")
    reason = missing_compiler(device)
    if reason:
        return model, f"train.compile: {reason}; training eager instead"
    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    return compiled, f"train.compile: model compiled with inductor (mode {mode}) at its first step"
