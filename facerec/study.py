"""The SN paper's normalization study: one training run per (norm, setting), the runs planned, run,
resumed and recorded.

A setting ``"GxB"`` is G GPUs x B images per GPU. Each run is an ordinary training run in
``<output>/<norm>_<G>x<B>`` with ``train.virtual_devices = G`` (the G devices' batch statistics
simulated in one process), ``train.batch_size = G * B`` and ``optim.lr`` scaled linearly from the
config's ``study.reference_batch`` (the SN model zoo's rule: 0.1 at 256 -> 0.0125 at (8,4) -> 0.003125
at (8,1)). Every norm and setting gets the same recipe and epochs; SN at one image per device drops its BN
term (``model.norm_kwargs.using_bn: false``), as the paper's (8,1) column does.

A run is finished when its ``result.json`` exists and was made with the same run config (compared key by
key, the study section and run-folder bookkeeping left out). A run whose config changed is started over,
its previous files (``result.json`` too) moved to ``previous-<time>/`` in its folder; an interrupted run
with the same config resumes from its newest checkpoint. A diverging run is recorded (status
``diverged``, with the reason) and counts as finished. The report is the final step's verification.
One process only: the study refuses to run under torchrun.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

SN_NORMS = ("sn", "syncsn")  # norms with a BN term that one image per device cannot estimate
RESULT_FILE = "result.json"
SECONDS_FILE = "study_seconds.json"  # time of a run's earlier (stopped) sessions
_SETTING = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
# train keys that do not change what a run computes (left out when comparing configs)
_BOOKKEEPING = ("output_dir", "resume", "progress", "log_every", "checkpoint_every", "keep_checkpoints")


def parse_setting(text: str, where: str = "study.settings") -> tuple[int, int]:
    """``"8x32"`` -> ``(8, 32)`` (GPUs, images per GPU); ValueError naming ``where`` and the bad item."""
    match = _SETTING.match(text) if isinstance(text, str) else None
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"{where}: {text!r} is not a setting GPUSxIMAGES (two positive integers, "
                         "e.g. 8x32 for 8 GPUs x 32 images each)")
    return int(match[1]), int(match[2])


def check_study_section(study: dict) -> None:
    """Refuse bad ``study`` values (unknown norms, malformed or repeated settings) with a ConfigError."""
    from backbones import NORMS
    from facerec.config import ConfigError

    for key in ("norms", "settings", "quick_settings"):
        items = study[key]
        if not items:
            raise ConfigError(f"study.{key} must not be empty")
        repeated = sorted({item for item in items if items.count(item) > 1})
        if repeated:
            raise ConfigError(f"study.{key} lists {repeated[0]!r} more than once")
    for norm in study["norms"]:
        if norm not in NORMS:
            raise ConfigError(f"study.norms: unknown norm {norm!r}; valid names: {', '.join(NORMS)}")
    for key in ("settings", "quick_settings"):
        for item in study[key]:
            try:
                parse_setting(item, f"study.{key}")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class RunSpec:
    """One run of the study: norm, setting, the run folder and the config overrides that make it."""

    norm: str
    gpus: int
    per_device: int
    lr: float
    run_dir: Path
    overrides: dict  # dotted key -> value

    @property
    def batch(self) -> int:
        return self.gpus * self.per_device

    @property
    def setting(self) -> str:
        return f"{self.gpus}x{self.per_device}"

    @property
    def name(self) -> str:
        return f"{self.norm}_{self.setting}"


def plan_study(config: dict, output_dir, norms=None, settings=None, quick: bool = False) -> list[RunSpec]:
    """The runs of the study of ``config``: every norm x setting, settings in order (``settings``, else
    ``study.quick_settings`` with ``quick``, else ``study.settings``; ``norms``, else ``study.norms``)."""
    study = config["study"]
    if settings is not None and quick:
        raise ValueError("give --settings or --quick, not both")
    norms = list(norms if norms is not None else study["norms"])
    settings = list(settings if settings is not None else study["quick_settings" if quick else "settings"])
    check_study_section({**study, "norms": norms, "settings": settings})
    base_lr, reference = config["optim"]["lr"], study["reference_batch"]
    specs = []
    for setting in settings:
        gpus, per_device = parse_setting(setting)
        for norm in norms:
            run_dir = Path(output_dir) / f"{norm}_{gpus}x{per_device}"
            lr = base_lr * gpus * per_device / reference
            overrides = {"model.norm": norm, "train.virtual_devices": gpus,
                         "train.batch_size": gpus * per_device, "optim.lr": lr,
                         "train.output_dir": str(run_dir), "train.resume": "auto", "train.progress": False,
                         "train.verify_every": 0}
            if norm in SN_NORMS and per_device == 1:
                overrides["model.norm_kwargs.using_bn"] = False
            specs.append(RunSpec(norm, gpus, per_device, lr, run_dir, overrides))
    return specs


def run_config(config: dict, spec: RunSpec) -> dict:
    """``config`` with ``spec``'s overrides, validated (a new dict)."""
    from facerec.config import apply_overrides, validate

    return validate(apply_overrides(config, spec.overrides))


def comparable(config: dict) -> dict:
    """The part of a run config that decides its result: no ``study`` section, no run-folder bookkeeping.
    A config saved before a key existed gets that key's default (what its run used), so adding a key to
    the schema does not make finished runs look changed; one the schema no longer accepts is left as is."""
    from facerec.config import ConfigError, validate

    with contextlib.suppress(ConfigError):
        config = validate({k: v for k, v in config.items() if k != "study"})
    out = {k: copy.deepcopy(v) for k, v in config.items() if k != "study"}
    out["train"] = {k: v for k, v in out.get("train", {}).items() if k not in _BOOKKEEPING}
    return out


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (a torn write)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=1, default=float) + "\n")
    os.replace(temporary, path)


def run_state(spec: RunSpec, config: dict) -> tuple[str, list[str]]:
    """``("done" | "resume" | "new" | "redo", changed keys)`` of a planned run, from its folder: done (a
    result of this config), resume (an interrupted run of this config), redo (files of another config)."""
    wanted = comparable(config)
    result = read_json(spec.run_dir / RESULT_FILE)
    recorded = comparable(result.get("config") or {}) if result is not None else None
    if recorded == wanted:
        return "done", []
    saved = spec.run_dir / "config.yaml"
    if saved.is_file():
        previous = comparable(yaml.safe_load(saved.read_text()) or {})
        changed = differences(previous, wanted)
        return ("resume", []) if not changed else ("redo", changed)
    if result is not None:
        return "redo", differences(recorded, wanted)
    return "new", []


def set_aside(run_dir: Path) -> Path | None:
    """Move a previous run's files, its ``result.json`` included, into ``run_dir/previous-<time>/``."""
    from facerec.run_folder import move_previous_run

    result = run_dir / RESULT_FILE
    moved = move_previous_run(run_dir)
    if result.exists():
        if moved is None:
            moved = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
            moved.mkdir()
        os.replace(result, moved / RESULT_FILE)
    (run_dir / SECONDS_FILE).unlink(missing_ok=True)
    return moved


def train_steps(config: dict, num_images: int) -> int:
    """Optimizer steps of a one-process run of ``config`` on ``num_images`` images (as build_run counts)."""
    from facerec.train import total_steps

    return total_steps(config["train"], num_images // config["train"]["batch_size"])


def resume_step(run_dir: Path) -> int:
    """The step of the newest step checkpoint in ``run_dir`` (0 when there is none)."""
    from facerec import checkpoint as ckpt

    found = ckpt.step_checkpoints(run_dir / "checkpoints")
    return ckpt.step_of(found[-1]) if found else 0


def _sn_weights(checkpoint: str) -> list[dict] | None:
    """The learned IN/LN/BN weights of each SN layer of the model in ``checkpoint`` (None: no SN layer)."""
    from backbones import sn_mixture_weights
    from facerec.model_io import load_model

    model, _ = load_model(checkpoint)
    return sn_mixture_weights(model) or None


def train_run(spec: RunSpec, config: dict, on_step) -> dict:
    """Train one planned run in this process (its output in ``<run_dir>/train.log``) and return its
    result: status ``done``, ``diverged`` (with ``reason``) or ``stopped`` (SIGINT/SIGTERM)."""
    from facerec.train import TrainingDiverged, train

    spec.run_dir.mkdir(parents=True, exist_ok=True)
    earlier = (read_json(spec.run_dir / SECONDS_FILE) or {}).get("seconds", 0.0)
    reached = [0]

    def step_done(step: int, total: int) -> None:
        reached[0] = step
        on_step(step, total)

    result = {"norm": spec.norm, "setting": spec.setting, "gpus": spec.gpus, "per_device": spec.per_device,
              "batch": spec.batch, "lr": spec.lr, "status": "done", "reason": None, "steps": 0,
              "verification": {}, "sn_weights": None}
    start = time.time()
    with open(spec.run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log):
        try:
            summary = train(config, on_step=step_done)
        except TrainingDiverged as exc:
            result.update(status="diverged", reason=str(exc), steps=reached[0])  # steps completed
        else:
            result.update(steps=summary["steps"], verification=summary["final"])
            if summary["stopped"]:
                result.update(status="stopped", reason=f"stopped by {summary['stopped']}")
            else:
                result["sn_weights"] = _sn_weights(summary["checkpoint"])
    result["seconds"] = earlier + time.time() - start
    result["config"] = comparable(config)
    if result["status"] == "stopped":
        _write_json(spec.run_dir / SECONDS_FILE, {"seconds": result["seconds"]})
    else:
        _write_json(spec.run_dir / RESULT_FILE, result)
        (spec.run_dir / SECONDS_FILE).unlink(missing_ok=True)
    return result


def short_reason(reason: str | None) -> str:
    """The first clause of a divergence message (``training diverged at step 7: the loss is not finite
    (loss nan)``, without the advice after it), for tables."""
    return (reason or "").split("; ")[0]


def _count_images(config: dict) -> int:
    import torch

    from facerec.distributed import DistInfo
    from facerec.train import build_dataset, prepare_train_data

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    data = config["data"]
    path = prepare_train_data(data, info)
    return len(build_dataset(path, config["model"]["input_size"], flip=False,
                             skip_bad=data["bad_images"] == "skip"))


def run_study(config: dict, specs: list[RunSpec], output_dir, write_report=None, say=print) -> list[dict]:
    """Run every planned run not finished yet, one after another in this process, with one progress
    bar over the whole study (images trained; runs done and to go; time left). ``write_report(results)``
    is called after each run with the results so far (one per spec, None where not run yet). Returns the
    results; stops early (last result status ``stopped``) when SIGINT/SIGTERM stopped a run."""
    from tqdm import tqdm

    from facerec.run_folder import RunLock

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("run.py study runs in one process (the GPUs of a setting are virtual devices, "
                         "train.virtual_devices): start it with python, not torchrun")
    output_dir = Path(output_dir)
    lock = RunLock(output_dir, option="study output")
    lock.acquire()
    try:
        configs = [run_config(config, spec) for spec in specs]
        states = [run_state(spec, cfg) for spec, cfg in zip(specs, configs)]
        results = [read_json(s.run_dir / RESULT_FILE) if state == "done" else None
                   for s, (state, _) in zip(specs, states)]
        todo = [i for i, (state, _) in enumerate(states) if state != "done"]
        if len(todo) < len(specs):
            say(f"{len(specs) - len(todo)} of {len(specs)} runs already finished (result.json of the same "
                "config): skipped")
        num_images = _count_images(config) if todo else 0
        images = {i: (train_steps(configs[i], num_images)
                      - (resume_step(specs[i].run_dir) if states[i][0] == "resume" else 0)) * specs[i].batch
                  for i in todo}
        if not todo:
            return results
        bar = tqdm(total=sum(images.values()), unit="img", desc="study", dynamic_ncols=True, smoothing=0.1)
        try:
            for number, i in enumerate(todo):
                spec, (state, changed) = specs[i], states[i]
                if state == "redo":
                    moved = set_aside(spec.run_dir)
                    say(f"{spec.name}: the config changed since its run ({', '.join(changed[:6])}): starting "
                        f"it over; the previous run was moved to {moved}")
                bar.set_postfix_str(f"run {number + 1}/{len(todo)}: {spec.name}, "
                                    f"{len(todo) - number - 1} to go", refresh=True)
                result = train_run(spec, configs[i], lambda step, total, b=spec.batch: bar.update(b))
                results[i] = result
                say(describe(result))
                if write_report is not None:
                    write_report(results)
                if result["status"] == "stopped":
                    break
        finally:
            bar.close()
        return results
    finally:
        lock.release()


def describe(result: dict) -> str:
    """One line on a run's result, for the console."""
    head = f"{result['norm']} {result['setting']} (batch {result['batch']}, lr {result['lr']:.6g})"
    if result["status"] != "done":
        return f"{head}: {result['status']}: {short_reason(result['reason'])}"
    sets = ", ".join(f"{name} {100 * v['accuracy']:.2f}±{100 * v['accuracy_std']:.2f}"
                     for name, v in result["verification"].items())
    return f"{head}: {sets or 'no verification set'} after {result['steps']} steps in " \
           f"{result['seconds'] / 60:.1f} min"
