"""The training loop: backbone (DDP) + Partial FC head (model parallel) + data, checkpoints and verification.

One process per device; launched directly (one CPU or GPU) or by torchrun (RANK / WORLD_SIZE /
LOCAL_RANK), NCCL on GPUs and gloo on CPUs. Design points:

- Partial FC's loss is the mean over the global batch; DDP *sums* the backbone's gradient shares (a comm
  hook) so W processes of B images step exactly like one process of W*B images.
- The backbone is wrapped in DistributedDataParallel with ``broadcast_buffers=False``: BN/SN running
  statistics stay per process (as with plain BN); with ``model.norm`` syncsn/syncbn (or one image per
  device) the embedding BatchNorm1d is made synchronous too, so the whole net sees global-batch
  statistics. The Partial FC head is not wrapped: it is sharded and all-gathers embeddings itself.
- ``train.virtual_devices`` V splits each process's batch into V devices for every batch statistic
  (``backbones.split_batch_statistics``: sample k on device k % V, the sampler's own dealing order), so
  W processes of B images equal W * V processes of B / V images; checkpoints keep device 0's running
  statistics (rank 0's). Gradients stay the mean over the global batch.
- Gradient clipping (``train.grad_clip``) applies to the backbone's gradient norm, which is the same on
  every process after DDP's all-reduce; the head's shards are not clipped.
- Progress is ``step`` (optimizer steps), ``epoch`` and ``batch`` (batches done in this epoch). A
  resumed run re-creates the epoch's sampler order (same seed and epoch) and skips the batches already
  seen, so step count, data order and lr schedule continue exactly. If the global batch changed
  (another number of processes), the position in the epoch is converted by samples seen.
- A non-finite loss stops the run before the optimizer step, so the last checkpoint stays good; a
  checkpoint is never written from non-finite weights.
- Nothing is lost: rank 0 holds a lock on the run folder for the run's life; starting over in a used
  folder moves the old run aside (``previous-<time>/``); ``config.yaml`` is written after every check;
  SIGINT/SIGTERM stop every rank at the same step with a checkpoint; temporary files of dead processes
  are removed at the start; an unreadable newest checkpoint falls back to the newest readable one.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from eval.report import duration
from facerec import checkpoint as ckpt
from facerec.config import TRAINING_SWITCHES, save_config, upgrade_model_section
from facerec.distributed import (
    DistInfo,
    all_gather_objects,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    sync_batchnorm1d,
)
from facerec.metrics_log import MetricsLog
from facerec.model_io import load_backbone_state, model_kwargs
from facerec.optim import build_optimizer, build_schedule, param_groups
from facerec.run_folder import RunLock, move_previous_run
from facerec.stop import StopRequest
from facerec.verify_sets import NonFiniteEmbeddings, VerificationSet, verify

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(ValueError):
    """The loss (or the weights) became NaN/inf; the message says where and what to try."""


def train(config: dict, on_step=None) -> dict:
    """Run (or resume) the training described by ``config`` (see :mod:`facerec.config`).

    Returns a summary dict (``steps, seconds, run_dir, final, best``, and ``stopped``: the signal's name
    when SIGINT/SIGTERM stopped the run early, else None) on every rank. ``on_step(step, total_steps)``,
    if given, is called after each optimizer step (e.g. to drive a progress display of several runs).
    """
    info = init_distributed(config["train"]["device"])
    lock = RunLock(config["train"]["output_dir"])
    try:
        refusal = None
        if info.is_main:
            try:
                lock.acquire()
            except ValueError as exc:
                refusal = str(exc)
        refusal = broadcast_object(refusal)  # every rank stops, none waits for rank 0
        if refusal:
            raise ValueError(refusal)
        return Trainer(build_run(config, info), on_step=on_step).fit()
    finally:
        lock.release()
        cleanup()


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_train_data(data_cfg: dict, info: DistInfo) -> Path:
    """The training set path; generates the synthetic set there first when ``data.synth`` asks for it."""
    if data_cfg["train"] is None:
        raise ValueError("data.train is not set: give a dataset directory (train.rec/idx) or an image folder")
    path = Path(data_cfg["train"])
    if data_cfg["synth"] is not None:
        from data import synthetic_set_differences

        # rank 0 alone decides and generates; every rank waits, whatever it saw of a half-written set
        if info.is_main:
            _generate_synthetic_set(path, data_cfg["synth"])
        barrier()
        differences = synthetic_set_differences(path, **data_cfg["synth"])
        if differences:
            listed = "; ".join(f"{key}: {found} there, {asked} asked" for key, (found, asked)
                               in differences.items())
            raise ValueError(
                f"data.train: {path} holds a synthetic set made with other data.synth settings ({listed}). "
                "Delete that directory to generate the configured one, or point data.train elsewhere."
            )
    if not path.exists():
        raise FileNotFoundError(f"data.train: no such file or directory: {path}")
    return path


def _generate_synthetic_set(path: Path, synth: dict) -> None:
    """Generate the ``data.synth`` set at ``path`` unless it is there: into a temporary folder renamed into
    place when complete, so an interrupted generation leaves no partial set behind. A partial set left by
    an older version (synthetic-set files but no manifest, which is written last) is moved aside first."""
    from data.synth import MANIFEST, OUTPUT_FILES
    from data.workers import TEMPORARY, remove_dead_temporaries

    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    remove_dead_temporaries(path.parent, prefixes=f".{path.name}.partial-")
    if path.is_dir() and not (path / MANIFEST).exists():
        names = {p.name for p in path.iterdir()}
        if all(name in OUTPUT_FILES or TEMPORARY.match(name) for name in names):
            print(f"data.train: {path} holds an incomplete synthetic set (an interrupted generation); "
                  "generating it again", flush=True)
            if names & set(OUTPUT_FILES):  # files of an older version's generation: kept aside
                stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
                os.replace(path, path.with_name(f"{path.name}.incomplete-{stamp}"))
            else:
                shutil.rmtree(path)
    if path.exists():
        return
    from data import generate_synthetic

    print(f"generating synthetic training data in {path} ...", flush=True)
    generate_synthetic(partial, **synth)
    os.replace(partial, path)


def build_dataset(path: Path, input_size: int, flip: bool, augment: dict | None = None,
                  skip_bad: bool = False):
    """RecordIO set (``.rec`` file or directory with ``train.rec``), else an ``<identity>/<image>`` folder;
    ``augment`` is the ``data.augment`` section (None or every ``p`` 0: no augmentation); ``skip_bad``:
    leave the folder's unreadable images out instead of stopping."""
    from data import FaceFolderDataset, FaceRecordDataset
    from data.augment import Augment

    augment = Augment(**(augment or {}))
    if path.suffix == ".rec" or (path / "train.rec").exists():
        return FaceRecordDataset(path, input_size=input_size, train=flip, augment=augment)
    return FaceFolderDataset(path, input_size=input_size, train=flip, augment=augment, skip_bad=skip_bad)


class EpochSampler(DistributedSampler):
    """The engine's data order, for one process or many: epoch ``e`` is the permutation of
    ``seed + e`` (DistributedSampler's), process ``r`` of ``W`` takes positions ``r, r+W, ...``, so the
    W processes' batches ``i`` together are exactly one process's batch ``i`` at W times the batch size.
    ``skip`` drops that many of this process's first samples (resuming mid-epoch without loading them).
    """

    def __init__(self, dataset, world_size: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def build_train_loader(dataset, batch_size: int, num_workers: int, info: DistInfo, seed: int) -> DataLoader:
    """``data.build_loader``'s loader (workers, seeding, pinning) with :class:`EpochSampler` as sampler."""
    from data import build_loader

    return build_loader(dataset, batch_size, num_workers=num_workers, drop_last=True, seed=seed,
                        sampler=EpochSampler(dataset, info.world_size, info.rank, seed))


@dataclass
class RunParts:
    """What a training run is made of (see :func:`build_run`); :class:`Trainer` runs it."""

    config: dict
    info: DistInfo
    dataset: Dataset
    loader: DataLoader
    verify_sets: list[VerificationSet]  # rank 0's data.verify sets; empty on other ranks
    backbone: nn.Module
    model: nn.Module  # the backbone, wrapped in DDP when distributed, compiled with train.compile
    head: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    channels_last: bool
    steps_per_epoch: int
    global_batch: int
    total_steps: int
    compiled: bool = False  # model is torch.compile'd: its first step compiles


def build_run(config: dict, info: DistInfo) -> RunParts:
    """Data, model, head, optimizer and schedule of ``config`` on this process (writes nothing to the run
    folder; generates the ``data.synth`` set when it is missing)."""
    from backbones import build_backbone, split_batch_statistics
    from data import load_bin
    from losses import build_head

    tcfg, mcfg, data_cfg = config["train"], config["model"], config["data"]
    device = info.device
    _seed_everything(tcfg["seed"])  # same on every rank: identical initial weights
    train_path = prepare_train_data(data_cfg, info)
    dataset = build_dataset(train_path, mcfg["input_size"], data_cfg["flip"], data_cfg["augment"],
                            skip_bad=data_cfg["bad_images"] == "skip")
    for path in data_cfg["verify"]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.verify: no such file: {path}")
    verify_sets = [VerificationSet(Path(p).stem, *load_bin(p), str(p))
                   for p in (data_cfg["verify"] if info.is_main else [])]

    backbone = build_backbone(**model_kwargs(config))
    if tcfg["init_backbone"]:
        load_backbone_state(backbone, ckpt.backbone_state(tcfg["init_backbone"]),
                            f"train.init_backbone {tcfg['init_backbone']}")
    # the embedding BatchNorm1d takes the whole global batch with synchronised norms or one image per device
    one_image = tcfg["batch_size"] == tcfg["virtual_devices"]
    whole_batch_embedding = mcfg["norm"] in ("syncsn", "syncbn") or one_image
    if info.world_size > 1 and whole_batch_embedding:
        sync_batchnorm1d(backbone)
    split_batch_statistics(backbone, tcfg["virtual_devices"], embedding=not whole_batch_embedding)
    channels_last = tcfg["channels_last"] and device.type == "cuda"
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes
    backbone.to(device, memory_format=torch.channels_last if channels_last else None)
    head = build_head(dict(config["head"]), embedding_size=mcfg["embedding_size"],
                      num_classes=dataset.num_classes).to(device)
    model = backbone
    if info.world_size > 1:
        model = DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            bucket_cap_mb=tcfg["ddp_bucket_mb"])
        model.register_comm_hook(None, _allreduce_sum_hook)
    compiled = False
    if tcfg["compile"]:
        from facerec.compiled import compile_model

        compiled_model, message = compile_model(model, tcfg["compile_mode"], device)
        compiled, model = compiled_model is not model, compiled_model
        if info.is_main:
            print(message, flush=True)

    optimizer = build_optimizer(param_groups(backbone, head, config["optim"]), config["optim"])
    head.attach_optimizer(optimizer)  # Partial FC sampling: step only the sampled rows
    loader = build_train_loader(dataset, tcfg["batch_size"], data_cfg["num_workers"], info, tcfg["seed"])
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"data.train has {len(dataset)} images, fewer than one global batch "
                         f"({tcfg['batch_size']} x {info.world_size} processes)")
    run_steps = total_steps(tcfg, steps_per_epoch)
    return RunParts(
        config, info, dataset, loader, verify_sets, backbone, model, head, optimizer,
        schedule=build_schedule(optimizer, config["schedule"], run_steps, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=tcfg["precision"] == "fp16"),
        amp_dtype=AMP_DTYPES.get(tcfg["precision"]), channels_last=channels_last,
        steps_per_epoch=steps_per_epoch, global_batch=tcfg["batch_size"] * info.world_size,
        total_steps=run_steps, compiled=compiled,
    )


class Trainer:
    """Progress, checkpoints, verification and the loop of one training run over its :class:`RunParts`.

    Creating it resumes (``train.resume``), prepares the run folder (rank 0: a previous run moved aside
    when starting over, temporary files of dead processes removed, ``config.yaml``) and opens the log, so
    :meth:`verify` works before :meth:`fit`."""

    def __init__(self, parts: RunParts, on_step=None):
        self.parts = parts
        self.on_step = on_step  # called as on_step(step, total_steps) after each optimizer step
        self.config, self.info = parts.config, parts.info
        self.tcfg = self.config["train"]
        self.device = self.info.device
        self.run_dir = Path(self.tcfg["output_dir"])
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = self.epoch = self.batch = 0
        self.best: dict = {}
        self.last_verification: dict = {}
        self.baselines: dict = {}
        self.last_checkpoint: Path | None = None  # the same on every rank (only rank 0 writes it)
        self.log: MetricsLog | None = None
        start_over = self._resume()
        _seed_everything(self.tcfg["seed"] + 1000 * self.info.rank + self.step)  # data order: the sampler
        if self.info.is_main:
            self._prepare_run_folder(start_over)
        barrier()
        self.log = MetricsLog(self.run_dir, enabled=self.info.is_main, resume_step=self.step,
                              total_steps=parts.total_steps, progress=self.tcfg["progress"])

    # ---------------------------------------------------------------- run folder and checkpoints
    def _prepare_run_folder(self, start_over: bool) -> None:
        """Rank 0, once every check has passed: the previous run moved aside when this one starts over,
        dead processes' temporary files removed, ``config.yaml`` written."""
        from data.workers import remove_dead_temporaries

        if start_over:
            moved = move_previous_run(self.run_dir)
            if moved is not None:
                self._say(f"train.resume={self.tcfg['resume']}: starting over; the previous run in "
                          f"{self.run_dir} was moved to {moved}")
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_dead_temporaries(self.ckpt_dir, (".step_", ".best.pt.")):
            self._say(f"removed {path}, left by a process that died while writing it")
        save_config(self.config, self.run_dir / "config.yaml")

    def _resume(self) -> bool:
        """Load the ``train.resume`` checkpoint; returns whether the run folder's previous run is to be
        moved aside (``none``, or a given checkpoint older than checkpoints in the folder)."""
        choice = self.tcfg["resume"]
        found = ckpt.step_checkpoints(self.ckpt_dir)
        if choice == "none":
            return True
        if choice == "auto":
            if not found:
                return False
            path, state = self._newest_readable(found)
        else:
            path = Path(choice)
            state = ckpt.load_checkpoint(path)
        missing = [k for k in ckpt.REQUIRED if k not in state]
        if missing:
            raise ValueError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")
        saved_model = state["config"].get("model")
        if not isinstance(saved_model, dict) or not same_model(upgrade_model_section(saved_model),
                                                               self.config["model"]):
            raise ValueError(f"{path}: checkpoint model {state['config'].get('model')} differs from "
                             f"{self.config['model']}; use train.init_backbone to start from its weights")
        self._load_state(state)
        self.last_checkpoint = path
        self._say(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch})")
        return choice != "auto" and any(ckpt.step_of(p) > self.step for p in found)

    def _newest_readable(self, found: list[Path]) -> tuple[Path, dict]:
        """The newest of ``found`` that loads, saying which ones did not."""
        for path in reversed(found):
            try:
                return path, ckpt.load_checkpoint(path)
            except ckpt.CheckpointError as exc:
                self._say(f"warning: {path} is not readable ({str(exc).split(': ', 1)[-1][:120]}); "
                          "trying the checkpoint before it")
        raise ckpt.CheckpointError(f"{self.ckpt_dir}: none of the step checkpoints is readable; "
                                   "set train.resume=none to start over (they are moved aside)")

    def _load_state(self, state: dict) -> None:
        parts = self.parts
        parts.backbone.load_state_dict(state["backbone"])
        parts.optimizer.load_state_dict(state["optimizer"])
        ckpt.load_head_optimizer_state(parts.optimizer, parts.head, state["head_optimizer"])
        parts.head.load_state_dict(state["head"])
        parts.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        if state["global_batch"] != parts.global_batch:
            self.batch = self.batch * state["global_batch"] // parts.global_batch
            self._say(f"warning: global batch changed from {state['global_batch']} to {parts.global_batch} "
                      f"({state['world_size']} -> {self.info.world_size} processes); continuing at batch "
                      f"{self.batch} of epoch {self.epoch}; the learning rate is not rescaled")
        parts.schedule.load_state_dict(state["schedule"])
        factor = parts.schedule.lr_lambdas[0](self.step)  # this step's lr, also if the total steps changed
        for group, base in zip(parts.optimizer.param_groups, parts.schedule.base_lrs):
            group["lr"] = base * factor
        self.best = state.get("best", {})
        if state["world_size"] == self.info.world_size:
            ckpt.set_rng_state(state["rng"][self.info.rank])

    def _check_finite_weights(self) -> None:
        bad = any(not torch.isfinite(p).all() for p in list(self.parts.backbone.parameters())
                  + list(self.parts.head.parameters()))
        flag = torch.tensor([float(bad)], device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag)
        if flag.item():
            raise TrainingDiverged(self._diverged_message("weights are not finite", float("nan")))

    def save_checkpoint(self) -> None:
        """Write ``step_<N>.pt`` (rank 0; every rank takes part in gathering the head)."""
        parts = self.parts
        self._check_finite_weights()
        state = {
            "backbone": parts.backbone.state_dict(),
            "head": parts.head.state_dict(),
            "optimizer": ckpt.split_optimizer_state(parts.optimizer, parts.head),
            "head_optimizer": ckpt.head_optimizer_state(parts.optimizer, parts.head),
            "schedule": parts.schedule.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "rng": all_gather_objects(ckpt.rng_state()),
            "step": self.step, "epoch": self.epoch, "batch": self.batch,
            "global_batch": parts.global_batch, "world_size": self.info.world_size,
            "config": self.config, "best": self.best,
        }
        path = self.ckpt_dir / f"step_{self.step}.pt"
        if self.info.is_main:
            ckpt.save_checkpoint(state, path)
            ckpt.prune_checkpoints(self.ckpt_dir, self.tcfg["keep_checkpoints"], current=path)
        self.last_checkpoint = path
        barrier()

    # ---------------------------------------------------------------- verification
    def _accuracies(self, model, flip: bool = True) -> dict:
        """Verification results of ``model`` (any images -> embeddings module) on each ``data.verify`` set."""
        results = {}
        for vset in self.parts.verify_sets:
            metrics, _ = verify(model, vset, self.config["model"]["input_size"],
                                batch_size=self.tcfg["verify_batch_size"], flip=flip, device=self.device)
            results[vset.name] = {k: float(metrics[k]) for k in ("accuracy", "accuracy_std", "threshold")}
        return results

    def report_baselines(self) -> None:
        """Accuracy of the untrained model and of raw pixels (cosine of the normalised pixel vectors) on
        each verification set, before training: what the trained accuracy is to be read against."""
        if self.info.is_main and self.parts.verify_sets:
            untrained = self._accuracies(self.parts.backbone)
            pixels = self._accuracies(torch.nn.Flatten(), flip=False)
            self.baselines = {name: {"untrained": untrained[name]["accuracy"],
                                     "raw_pixels": pixels[name]["accuracy"]} for name in untrained}
            text = ", ".join(f"{k} untrained model {v['untrained']:.4f}, raw pixels {v['raw_pixels']:.4f}"
                             for k, v in self.baselines.items())
            self._say(f"baselines before training: {text}")
            self.log.log(self.step, epoch=self.epoch, baselines=self.baselines)
        barrier()

    def verify(self) -> dict:
        """Accuracy on each ``data.verify`` set (rank 0; others wait); updates ``best`` and ``best.pt``."""
        results, failure = {}, None
        if self.info.is_main and self.parts.verify_sets:
            try:
                results = self._accuracies(self.parts.backbone)
            except NonFiniteEmbeddings as exc:  # finite weights, yet eval mode overflows: diverged too
                failure = f"training diverged by step {self.step}: {exc}; lower optim.lr or raise the warmup"
        failure = broadcast_object(failure)  # every rank stops
        if failure:
            raise TrainingDiverged(failure)
        if results:
            mean_acc = sum(r["accuracy"] for r in results.values()) / len(results)
            improved = mean_acc > self.best.get("accuracy", -1.0)
            if improved:
                self.best = {"accuracy": mean_acc, "step": self.step,
                             "sets": {k: v["accuracy"] for k, v in results.items()}}
            text = ", ".join(f"{k} {v['accuracy']:.4f}±{v['accuracy_std']:.4f}" for k, v in results.items())
            self._say(f"step {self.step} verification: {text} (best mean {self.best['accuracy']:.4f} "
                      f"at step {self.best['step']})")
            self.log.log(self.step, epoch=self.epoch, verify=results, verify_mean=mean_acc,
                         best_accuracy=self.best["accuracy"])
        self.best = broadcast_object(self.best)
        results = broadcast_object(results)
        if results and self.best.get("step") == self.step:
            self._save_best()
        self.last_verification = results
        barrier()
        return results

    def _save_best(self) -> None:
        head = self.parts.head.state_dict()  # collective
        if self.info.is_main:
            ckpt.save_checkpoint({"backbone": self.parts.backbone.state_dict(), "head": head,
                                  "config": self.config, "step": self.step, "epoch": self.epoch,
                                  "best": self.best}, self.ckpt_dir / "best.pt")

    # ---------------------------------------------------------------- loop
    def _say(self, text: str) -> None:
        if self.info.is_main:
            self.log.message(text) if self.log is not None else print(text, flush=True)

    def _describe(self, name: str, accuracy: float) -> str:
        """``name accuracy``, followed by the set's baselines when they were measured."""
        text = f"{name} {accuracy:.4f}"
        if name in self.baselines:
            base = self.baselines[name]
            text += f" (untrained model {base['untrained']:.4f}, raw pixels {base['raw_pixels']:.4f})"
        return text

    def _diverged_message(self, what: str, loss: float) -> str:
        kept = self.last_checkpoint or "none written yet"
        hint = ("lower optim.lr, use train.precision=bf16 instead of fp16, set train.grad_clip, or warm up "
                "longer (schedule.warmup_steps)")
        return (f"training diverged at step {self.step + 1}: {what} (loss {loss}); stopped without saving. "
                f"Last good checkpoint: {kept}. Try: {hint}")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Forward, backward and optimizer step on one batch; returns the (global mean) loss."""
        parts = self.parts
        images = images.to(self.device, non_blocking=True)
        if parts.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        autocast = (torch.autocast(self.device.type, dtype=parts.amp_dtype) if parts.amp_dtype
                    else contextlib.nullcontext())
        with autocast:
            embeddings = parts.model(images)
        loss = parts.head(embeddings.float(), labels)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(self._diverged_message("the loss is not finite", value))
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        if self.tcfg["grad_clip"]:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.backbone.parameters(), self.tcfg["grad_clip"])
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        with warnings.catch_warnings():
            # fp16: the scaler skips the optimizer step of a batch with inf/nan gradients (as it should),
            # and the schedule still advances one iteration; torch would warn about the call order.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
            parts.schedule.step()
        return value

    def fit(self) -> dict:
        """Train to ``total_steps`` (or until SIGINT/SIGTERM), checkpointing and verifying on the way."""
        tcfg, parts = self.tcfg, self.parts
        self._say(f"training {self.config['model']['name']} ({self.config['model']['norm']}) on "
                  f"{len(parts.dataset)} images / {parts.dataset.num_classes} classes: {parts.total_steps} "
                  f"steps of {parts.global_batch} images ({self.info.world_size} x {tcfg['batch_size']}) on "
                  f"{self.device}; run dir {self.run_dir}")
        if tcfg["baselines"] and self.step == 0 and self.config["data"]["verify"]:
            self.report_baselines()
        start, start_step = time.time(), self.step
        try:
            with StopRequest(self.device) as stop:
                self._loop(stop)
            if self.last_checkpoint != self.ckpt_dir / f"step_{self.step}.pt":
                self.save_checkpoint()
            if self.config["data"]["verify"] and not stop.received:
                self.verify()
        finally:
            self.log.close()
        seconds = time.time() - start
        summary = {"steps": self.step, "trained_steps": self.step - start_step, "seconds": seconds,
                   "run_dir": str(self.run_dir), "final": self.last_verification, "best": self.best,
                   "baselines": self.baselines, "stopped": stop.received,
                   "checkpoint": str(self.last_checkpoint)}
        if self.info.is_main and not stop.received:
            final = ", ".join(self._describe(k, v["accuracy"]) for k, v in self.last_verification.items())
            best = (f"; best {self.best['accuracy']:.4f} at step {self.best['step']}" if self.best else "")
            print(f"done: {self.step} steps ({self.step - start_step} this run) in {duration(seconds)}; "
                  f"verification: {final or 'none configured'}{best}; run dir: {self.run_dir}", flush=True)
        return summary

    def _loop(self, stop: StopRequest) -> None:
        """Steps from the current one to ``total_steps``, or to the step at which a stop was requested."""
        tcfg, parts = self.tcfg, self.parts
        window_loss, window_n, window_t = 0.0, 0, time.time()
        timed_n, compiling, compiled = 0, parts.compiled, {}  # images/s leaves out the compiling first step
        while self.step < parts.total_steps:
            parts.loader.sampler.set_epoch(self.epoch)
            parts.loader.sampler.skip = self.batch * tcfg["batch_size"]
            for images, labels in parts.loader:
                step_start = time.time()
                loss = self.train_step(images, labels)
                self.step += 1
                self.batch += 1
                window_loss, window_n = window_loss + loss, window_n + 1
                if compiling:
                    seconds = time.time() - step_start
                    self._say(f"train.compile: the first step took {seconds:.1f} s (compilation); "
                              "images/s leaves it out")
                    window_t, compiling, compiled = window_t + seconds, False, {"compile_seconds": seconds}
                else:
                    timed_n += 1
                lr = parts.optimizer.param_groups[0]["lr"]
                self.log.progress(self.step, loss=loss, lr=lr, epoch=self.epoch)
                if self.on_step is not None:
                    self.on_step(self.step, parts.total_steps)
                if self.step % tcfg["log_every"] == 0 or self.step == parts.total_steps:
                    now = time.time()
                    ips = timed_n * parts.global_batch / max(now - window_t, 1e-9) if timed_n else math.nan
                    self.log.log(self.step, epoch=self.epoch, loss=window_loss / window_n, lr=lr,
                                 images_per_sec=ips, **compiled)
                    self.log.progress(self.step, loss=window_loss / window_n, lr=lr,
                                      img_s=round(ips, 1), epoch=self.epoch)
                    window_loss, window_n, window_t, timed_n, compiled = 0.0, 0, now, 0, {}
                if self.batch == parts.steps_per_epoch:
                    self.epoch, self.batch = self.epoch + 1, 0
                if self.batch == 0 or self.step % tcfg["checkpoint_every"] == 0:
                    self.save_checkpoint()
                if self.config["data"]["verify"] and tcfg["verify_every"] \
                        and self.step % tcfg["verify_every"] == 0 and self.step < parts.total_steps:
                    self.verify()
                if self.step >= parts.total_steps or stop.requested():
                    return


def total_steps(tcfg: dict, steps_per_epoch: int) -> int:
    """Optimizer steps of a run: ``train.epochs`` epochs of ``steps_per_epoch``, capped by
    ``train.max_steps``."""
    total = tcfg["epochs"] * steps_per_epoch
    return min(total, tcfg["max_steps"]) if tcfg["max_steps"] is not None else total


def same_model(saved: dict, current: dict) -> bool:
    """Whether two ``model`` sections describe the same network; switches of how it trains
    (``TRAINING_SWITCHES``, e.g. activation checkpointing) may differ on resume."""
    strip = lambda model: {k: v for k, v in model.items() if k not in TRAINING_SWITCHES}  # noqa: E731
    return strip(saved) == strip(current)


def _allreduce_sum_hook(process_group, bucket):
    """DDP communication hook that sums gradients over processes instead of averaging them.

    Partial FC's loss is already the mean over the global batch, and each process's backward yields its
    own images' share of that loss's gradient; the sum of the shares is the gradient of the global mean
    (the same as one process with the whole batch), the DDP default mean would be 1/W of it.
    """
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    work = torch.distributed.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


__all__ = ["RunParts", "Trainer", "TrainingDiverged", "build_dataset", "build_run", "prepare_train_data",
           "train"]
