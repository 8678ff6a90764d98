"""Load checkpoints written in the published Switchable Normalization layout into our SN layers."""

from collections import OrderedDict

import torch

_DATA_PARALLEL_PREFIX = "module."
_PUBLISHED_1D_BUFFERS = {"running_mean_bn": "running_mean", "running_var_bn": "running_var"}


def _strip_wrapper(key: str) -> str:
    return key[len(_DATA_PARALLEL_PREFIX) :] if key.startswith(_DATA_PARALLEL_PREFIX) else key


def convert_published_sn(state_dict: dict, momentum: float | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Return a new state dict with every published-layout SN layer reshaped to our layout.

    An SN layer is any key prefix holding both ``mean_weight`` and ``var_weight``. Its ``weight``/``bias``
    (published (1, C, 1, 1) or (1, C)) and ``running_mean``/``running_var`` ((1, C, 1) or (1, C); the
    1-D ``running_mean_bn``/``running_var_bn`` names are renamed) become (C,); a missing
    ``num_batches_tracked`` is added as 0. Published running buffers are kept as they are (they start at
    0 there, at 1 here; trained values are what matter). A leading ``module.`` (DataParallel wrapper) is
    dropped from every key; all other keys and values are left unchanged. The input is not modified.

    ``momentum`` is the *published* momentum of the checkpoint's training (0.9, or 0.997 for the 2018
    ImageNet models), where ``running = m * running + (1 - m) * batch``. Our layers use PyTorch's
    convention, so the equivalent is ``1 - m``: either build the model with ``momentum=1 - m``, or pass
    ``momentum=m`` here, which records ``1 - m`` in the state dict metadata so that each SN layer
    loading it (under the same key prefix) adopts that momentum.
    """
    if momentum is not None and not 0.0 < momentum < 1.0:
        raise ValueError(f"momentum must be the published momentum in (0, 1), e.g. 0.9, got {momentum!r}")
    out = OrderedDict((_strip_wrapper(key), value) for key, value in state_dict.items())
    prefixes = [key[: -len("mean_weight")] for key in out if key.endswith("mean_weight")]
    prefixes = [p for p in prefixes if p + "var_weight" in out]
    metadata = OrderedDict(
        (_strip_wrapper(key + ".")[:-1], dict(value))
        for key, value in (getattr(state_dict, "_metadata", None) or {}).items()
    )
    for prefix in prefixes:
        logits = out[prefix + "mean_weight"]
        var_logits = out[prefix + "var_weight"]
        if logits.dim() != 1 or logits.numel() not in (1, 2, 3) or var_logits.shape != logits.shape:
            raise ValueError(
                f"{prefix}mean_weight/var_weight: expected two vectors of 1-3 mixture logits, "
                f"got {tuple(logits.shape)} and {tuple(var_logits.shape)}"
            )
        for old, new in _PUBLISHED_1D_BUFFERS.items():
            if prefix + old in out:
                out[prefix + new] = out.pop(prefix + old)
        channels = None
        for name in ("weight", "bias", "running_mean", "running_var"):
            if prefix + name not in out:
                continue
            flat = out[prefix + name].reshape(-1)
            if channels is not None and flat.numel() != channels:
                shape = tuple(out[prefix + name].shape)
                raise ValueError(f"{prefix}{name}: expected {channels} values, got shape {shape}")
            channels = flat.numel()
            out[prefix + name] = flat
        if prefix + "running_mean" in out and prefix + "num_batches_tracked" not in out:
            out[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        if momentum is not None:
            layer_meta = dict(metadata.get(prefix[:-1], {}))
            layer_meta["sn_momentum"] = 1.0 - momentum
            metadata[prefix[:-1]] = layer_meta
    out._metadata = metadata
    return out
