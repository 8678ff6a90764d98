"""Training configuration: schema with defaults, YAML loading with ``base:`` inheritance, dotted overrides.

A config is a plain nested dict with the sections ``model, head, data, optim, schedule, train, study``
(``study`` is read by ``run.py study`` only; training ignores it). Every key
has a default (``SCHEMA``); files and ``section.key=value`` overrides only change what they name. Unknown
keys, wrong types and bad choices are refused with a :class:`ConfigError` naming the dotted key.

Paths written in a config file resolve relative to that file's directory (also through ``base:``);
paths given as command-line overrides resolve relative to the current directory. The default
``train.output_dir`` is ``runs/<config file stem>`` under the current directory.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or key the schema does not accept."""


def _backbones() -> tuple[str, ...]:
    from backbones import BACKBONES

    return tuple(BACKBONES)


def _norms() -> tuple[str, ...]:
    from backbones import NORMS

    return tuple(NORMS)


def _heads() -> tuple[str, ...]:
    from losses import HEADS

    return tuple(HEADS)


def _compile_modes() -> tuple[str, ...]:
    from facerec.compiled import MODES

    return MODES


@dataclass(frozen=True)
class Opt:
    """One config key: default, kind (``int float bool str path paths ints floats dict`` or a nested
    schema), choices (tuple or function returning one) and whether null is allowed."""

    default: Any
    kind: str
    choices: tuple | Any = None  # a tuple, or a function returning one (imported lazily)
    nullable: bool = False


SYNTH = {  # data.synth: generate a synthetic RecordIO set at data.train when it is missing
    "identities": Opt(200, "int"),
    "images_per_identity": Opt(20, "int"),
    "size": Opt(112, "int"),
    "seed": Opt(0, "int"),
    "verify_identities": Opt(None, "int", nullable=True),  # null: max(20, identities // 4)
    "verify_pairs": Opt(3000, "int"),  # a multiple of 20
}

AUGMENT = {  # data.augment: jitter of training crops in the loader workers; p = probability, 0: off
    "scale": Opt({}, {"p": Opt(0.0, "float"), "max": Opt(0.1, "float")}),  # zoom in [1 - max, 1 + max]
    "rotate": Opt({}, {"p": Opt(0.0, "float"), "max": Opt(10.0, "float")}),  # degrees, either way
    "shift": Opt({}, {"p": Opt(0.0, "float"), "max": Opt(0.05, "float")}),  # fraction of the side, per axis
    "colour": Opt({}, {"p": Opt(0.0, "float"), "brightness": Opt(0.2, "float"),  # factors in [1 - x, 1 + x]
                       "contrast": Opt(0.2, "float"), "saturation": Opt(0.2, "float")}),
    "grayscale": Opt({}, {"p": Opt(0.0, "float")}),
    "blur": Opt({}, {"p": Opt(0.0, "float"), "sigma": Opt([0.5, 1.5], "floats")}),  # Gaussian, pixels
    "jpeg": Opt({}, {"p": Opt(0.0, "float"), "quality": Opt([30, 90], "ints")}),  # re-encoding quality
    "erase": Opt({}, {"p": Opt(0.0, "float"), "area": Opt([0.02, 0.2], "floats")}),  # fraction of the crop
}

SCHEMA: dict[str, dict[str, Any]] = {
    "model": {
        "name": Opt("iresnet50", "str", _backbones),
        "norm": Opt("sn", "str", _norms),
        "embedding_size": Opt(512, "int"),
        "input_size": Opt(112, "int"),
        "width": Opt(64, "int"),
        "dropout": Opt(0.0, "float"),
        "zero_init_residual": Opt(False, "bool"),  # scale of each residual block's last norm starts at 0
        "norm_kwargs": Opt({}, "dict"),  # passed to every 2-D norm, e.g. {using_bn: false}
        "activation_checkpointing": Opt(False, "bool"),  # training: recompute each stage in backward
    },
    "head": {
        "type": Opt("arcface", "str", _heads),
        "scale": Opt(64.0, "float"),
        "margin": Opt(0.5, "float"),  # arcface / cosface margin
        "m1": Opt(1.0, "float"),  # combined margin cos(m1*theta + m2) - m3
        "m2": Opt(0.5, "float"),
        "m3": Opt(0.0, "float"),
        "sample_rate": Opt(1.0, "float"),  # Partial FC: fraction of class centres sampled per step
    },
    "data": {
        "train": Opt(None, "path", nullable=True),  # dir with train.rec/idx/property, or an image folder
        "verify": Opt([], "paths"),  # .bin verification sets
        "num_workers": Opt(2, "int"),
        "flip": Opt(True, "bool"),  # random horizontal flip of training images
        "bad_images": Opt("error", "str", ("error", "skip")),  # image folders: unreadable files stop the run
        "augment": Opt({}, AUGMENT),
        "synth": Opt(None, SYNTH, nullable=True),
    },
    "optim": {
        "name": Opt("sgd", "str", ("sgd", "adamw")),
        "lr": Opt(0.1, "float"),
        "momentum": Opt(0.9, "float"),
        "nesterov": Opt(False, "bool"),
        "betas": Opt([0.9, 0.999], "floats"),
        "eps": Opt(1e-8, "float"),
        "weight_decay": Opt(5e-4, "float"),
        "sn_lr_scale": Opt(1.0, "float"),  # SN mixing logits (mean_weight / var_weight)
        "sn_weight_decay": Opt(0.0, "float"),
        "head_lr_scale": Opt(1.0, "float"),  # Partial FC class centres
        "head_weight_decay": Opt(None, "float", nullable=True),  # null: optim.weight_decay
    },
    "schedule": {
        "name": Opt("cosine", "str", ("cosine", "step", "poly", "constant")),
        "warmup_steps": Opt(0, "int"),
        "warmup_epochs": Opt(0.0, "float"),  # added to warmup_steps
        "min_lr_ratio": Opt(0.0, "float"),  # cosine / poly end at lr * min_lr_ratio
        "milestones": Opt([], "floats"),  # step: epochs at which lr *= gamma
        "gamma": Opt(0.1, "float"),
        "power": Opt(2.0, "float"),  # poly
    },
    "train": {
        "batch_size": Opt(128, "int"),  # per process
        "virtual_devices": Opt(1, "int"),  # V: batch statistics per 1/V of the batch (see train.py)
        "epochs": Opt(20, "int"),
        "max_steps": Opt(None, "int", nullable=True),  # caps the run (and the schedule length)
        "output_dir": Opt(None, "path", nullable=True),
        "precision": Opt("off", "str", ("off", "bf16", "fp16")),
        "device": Opt("auto", "str", ("auto", "cpu", "cuda")),
        "channels_last": Opt(True, "bool"),  # used on cuda only
        "compile": Opt(False, "bool"),  # torch.compile the backbone (eager, with a message, if no compiler)
        "compile_mode": Opt("default", "str", _compile_modes),
        "grad_clip": Opt(5.0, "float", nullable=True),  # max global grad norm; null/0: off
        "checkpoint_every": Opt(1000, "int"),  # steps; also at each epoch end
        "keep_checkpoints": Opt(3, "int"),
        "verify_every": Opt(2000, "int"),  # steps; also at the end; 0: only at the end
        "verify_batch_size": Opt(64, "int"),
        "baselines": Opt(False, "bool"),  # before training: untrained-model and raw-pixel accuracy
        "log_every": Opt(50, "int"),
        "resume": Opt("auto", "str"),  # auto | none | PATH of a checkpoint
        "init_backbone": Opt(None, "path", nullable=True),  # backbone weights to fine-tune from
        "seed": Opt(0, "int"),
        "progress": Opt(True, "bool"),  # tqdm bar on rank 0
        "ddp_bucket_mb": Opt(25.0, "float"),  # DistributedDataParallel gradient bucket size (torch's default)
    },
    "study": {  # run.py study (facerec/study.py): one training run per (norm, setting); train ignores it
        "norms": Opt(["bn", "gn", "sn"], "strs"),
        # "GxB": G GPUs (train.virtual_devices) x B images each; the SN paper's columns
        "settings": Opt(["8x32", "8x16", "8x8", "8x4", "8x2", "1x16", "1x32", "8x1", "1x8"], "strs"),
        "quick_settings": Opt(["8x32", "8x4", "8x2", "8x1"], "strs"),  # run.py study --quick
        "reference_batch": Opt(256, "int"),  # the total batch at which optim.lr applies; scaled linearly
    },
}

# model keys that change how a network trains, not what it computes: a run may resume with them changed
TRAINING_SWITCHES = ("activation_checkpointing",)

_POSITIVE = {"model.embedding_size", "model.input_size", "model.width", "train.batch_size", "train.epochs",
             "train.virtual_devices", "train.ddp_bucket_mb",
             "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.verify_batch_size",
             "study.reference_batch",
             "data.synth.identities", "data.synth.images_per_identity", "data.synth.size"}


def defaults() -> dict:
    """The full default config (a fresh nested dict)."""
    return {section: _fill({}, schema, section) for section, schema in SCHEMA.items()}


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Load ``path`` (YAML, optional ``base:`` chain), apply ``section.key=value`` overrides, validate.

    Returns the complete resolved config (plain dict). Raises FileNotFoundError for a missing config file
    and :class:`ConfigError` for bad keys or values.
    """
    raw: dict = {}
    if path is not None:
        raw = _load_file(Path(path), seen=())
    for item in overrides:
        raw = _merge(raw, _parse_override(item))
    config = validate(raw)
    if config["train"]["output_dir"] is None:
        stem = Path(path).stem if path is not None else "default"
        config["train"]["output_dir"] = str(Path("runs", stem).absolute())
    return config


def validate(raw: dict) -> dict:
    """Check ``raw`` against the schema and fill in defaults; returns a new complete config dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    unknown = set(raw) - set(SCHEMA)
    if unknown:
        raise ConfigError(f"unknown section '{sorted(unknown)[0]}'; allowed: {', '.join(SCHEMA)}")
    config = {}
    for section, schema in SCHEMA.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"section '{section}' must be a mapping, got {type(given).__name__}")
        config[section] = _fill(given, schema, section)
    _check_consistency(config)
    return config


def save_config(config: dict, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))


def _fill(given: dict, schema: dict, prefix: str) -> dict:
    unknown = [k for k in given if k not in schema]
    if unknown:
        raise ConfigError(f"unknown key '{prefix}.{unknown[0]}'; allowed: {', '.join(schema)}")
    out = {}
    for key, opt in schema.items():
        name = f"{prefix}.{key}"
        value = given[key] if key in given else copy.deepcopy(opt.default)
        out[key] = _check(name, value, opt)
    return out


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "path": "a path string", "paths": "a list of paths", "strs": "a list of strings",
          "ints": "a list of integers",
          "floats": "a list of numbers", "dict": "a mapping"}


def _check(name: str, value: Any, opt: Opt) -> Any:
    if value is None:
        if opt.nullable:
            return None
        raise ConfigError(f"{name} must not be null")
    if isinstance(opt.kind, dict):  # nested section
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping with keys {', '.join(opt.kind)} (or null)")
        return _fill(value, opt.kind, name)
    kind = opt.kind
    bad = ConfigError(f"{name} must be {_KINDS[kind]}, got {type(value).__name__} {value!r}")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind == "float":
        value = _yaml11_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif kind in ("str", "path"):
        if not isinstance(value, str) or not value:
            raise bad
    elif kind in ("paths", "strs", "ints", "floats"):
        item_type = {"paths": str, "strs": str, "ints": int, "floats": (int, float)}[kind]
        if kind == "floats" and isinstance(value, list):
            value = [_yaml11_float(v) for v in value]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single path / number for a list key
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, item_type)
                                              for v in value):
            raise bad
        value = [float(v) for v in value] if kind == "floats" else list(value)
        if kind == "floats" and not all(map(math.isfinite, value)):
            raise ConfigError(f"{name} must be finite numbers, got {value}")
    elif kind == "dict" and not isinstance(value, dict):
        raise bad
    choices = opt.choices() if callable(opt.choices) else opt.choices
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    if name in _POSITIVE and value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def _yaml11_float(value: Any) -> Any:
    """``1e-3`` is a string to YAML 1.1 (PyYAML wants ``1.0e-3``); accept it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_consistency(config: dict) -> None:
    if "last_gamma" in config["model"]["norm_kwargs"]:
        raise ConfigError("model.norm_kwargs.last_gamma is no longer a model option (it zero-initialised "
                          "each residual block's last norm): write model.zero_init_residual: true instead")
    if config["model"]["input_size"] % 16:
        raise ConfigError(f"model.input_size must be a multiple of 16, got {config['model']['input_size']}")
    if not 0.0 < config["head"]["sample_rate"] <= 1.0:
        raise ConfigError(f"head.sample_rate must be in (0, 1], got {config['head']['sample_rate']}")
    if not 0.0 <= config["model"]["dropout"] < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {config['model']['dropout']}")
    if config["optim"]["lr"] <= 0:
        raise ConfigError(f"optim.lr must be positive, got {config['optim']['lr']}")
    batch, devices = config["train"]["batch_size"], config["train"]["virtual_devices"]
    if batch % devices:
        raise ConfigError(f"train.batch_size={batch} is not divisible by train.virtual_devices={devices}: "
                          "each virtual device takes an equal share of the batch")
    from facerec.study import check_study_section

    check_study_section(config["study"])
    if config["train"]["max_steps"] is not None and config["train"]["max_steps"] < 0:
        raise ConfigError(f"train.max_steps must be >= 0 or null, got {config['train']['max_steps']}")
    from data.augment import Augment

    try:
        Augment(**config["data"]["augment"])
    except ValueError as error:
        raise ConfigError(f"data.augment.{error}") from None


def upgrade_model_section(model: dict) -> dict:
    """A checkpoint's ``model`` section in today's keys (checkpoints keep the config they were saved with).

    Before ``zero_init_residual`` existed, ``norm_kwargs.last_gamma: true`` meant it; it is mapped over.
    Keys added since take their defaults, so an old checkpoint compares equal to today's same model.
    """
    model = copy.deepcopy(dict(model))
    norm_kwargs = dict(model.get("norm_kwargs") or {})
    if "last_gamma" in norm_kwargs:
        model.setdefault("zero_init_residual", bool(norm_kwargs.pop("last_gamma")))
    model["norm_kwargs"] = norm_kwargs
    for key, opt in SCHEMA["model"].items():
        model.setdefault(key, copy.deepcopy(opt.default))
    return model


def _load_file(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    _resolve_paths(raw, path.parent)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a config file path, got {base!r}")
    return _merge(_load_file(path.parent / base, seen + (path,)), raw)


def _resolve_paths(raw: dict, root: Path) -> None:
    """Make relative path values in ``raw`` absolute against ``root`` (in place; unknown keys untouched)."""
    for section, values in raw.items():
        schema = SCHEMA.get(section)
        if not isinstance(values, dict) or schema is None:
            continue
        for key, value in values.items():
            opt = schema.get(key)
            if opt is None or opt.kind not in ("path", "paths"):
                continue
            if isinstance(value, str):
                values[key] = _absolute(value, root)
            elif isinstance(value, list):
                values[key] = [_absolute(v, root) if isinstance(v, str) else v for v in value]


def _absolute(value: str, root: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def _parse_override(item: str) -> dict:
    """``section.key[.sub]=value`` -> nested dict; value parsed as a YAML scalar/list, paths vs CWD."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{item}' must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    nested = _nested(parts, value)
    _resolve_paths(nested, Path.cwd())
    return nested


def _nested(parts: list[str], value: Any) -> dict:
    """``["a", "b", "c"], v`` -> ``{"a": {"b": {"c": v}}}``."""
    for part in reversed(parts):
        value = {part: value}
    return value


def apply_overrides(config: dict, overrides: dict) -> dict:
    """``config`` with ``{"section.key[.sub]": value}`` overrides merged in (a new dict, not validated)."""
    for key, value in overrides.items():
        config = _merge(config, _nested(key.split("."), value))
    return config


def _merge(base: dict, update: dict) -> dict:
    """Recursive dict merge: ``update`` wins; mappings merge key by key (``norm_kwargs`` included)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
