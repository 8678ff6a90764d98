"""The training loop: backbone (DDP) + Partial FC head (model parallel) + data, checkpoints and verification.

One process per device; launched directly (one CPU or GPU) or by torchrun (RANK / WORLD_SIZE /
LOCAL_RANK), NCCL on GPUs and gloo on CPUs. Design points:

- Partial FC's loss is the mean over the global batch; DDP *sums* the backbone's gradient shares (a comm
  hook) so W processes of B images step exactly like one process of W*B images.
- The backbone is wrapped in DistributedDataParallel with ``broadcast_buffers=False``: BN/SN running
  statistics stay per process (as with plain BN); with ``model.norm`` syncsn/syncbn (or one image per
  process) the embedding BatchNorm1d is made synchronous too, so the whole net sees global-batch
  statistics. The Partial FC head is not wrapped: it is sharded and all-gathers embeddings itself.
- Gradient clipping (``train.grad_clip``) applies to the backbone's gradient norm, which is the same on
  every process after DDP's all-reduce; the head's shards are not clipped.
- Progress is ``step`` (optimizer steps), ``epoch`` and ``batch`` (batches done in this epoch). A
  resumed run re-creates the epoch's sampler order (same seed and epoch) and skips the batches already
  seen, so step count, data order and lr schedule continue exactly. If the global batch changed
  (another number of processes), the position in the epoch is converted by samples seen.
- A non-finite loss stops the run before the optimizer step, so the last checkpoint stays good; a
  checkpoint is never written from non-finite weights.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from facerec import checkpoint as ckpt
from facerec.config import save_config
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
from facerec.model_io import load_backbone_state
from facerec.optim import build_optimizer, build_schedule, param_groups

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(ValueError):
    """The loss (or the weights) became NaN/inf; the message says where and what to try."""


def train(config: dict) -> dict:
    """Run (or resume) the training described by ``config`` (see :mod:`facerec.config`).

    Returns a summary dict (``steps, seconds, run_dir, final, best``) on every rank.
    """
    info = init_distributed(config["train"]["device"])
    try:
        return Trainer(config, info).fit()
    finally:
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
        from data import generate_synthetic, synthetic_set_differences

        # rank 0 alone decides and generates; every rank waits, whatever it saw of a half-written set
        if info.is_main and not path.exists():
            print(f"generating synthetic training data in {path} ...", flush=True)
            generate_synthetic(path, **data_cfg["synth"])
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


def build_dataset(path: Path, input_size: int, flip: bool, augment: dict | None = None):
    """RecordIO set (``.rec`` file or directory with ``train.rec``), else an ``<identity>/<image>`` folder;
    ``augment`` is the ``data.augment`` section (None or every ``p`` 0: no augmentation)."""
    from data import FaceFolderDataset, FaceRecordDataset
    from data.augment import Augment

    records = path.suffix == ".rec" or (path / "train.rec").exists()
    return (FaceRecordDataset if records else FaceFolderDataset)(path, input_size=input_size, train=flip,
                                                                 augment=Augment(**(augment or {})))


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


class Trainer:
    """State and steps of one training run; :meth:`fit` does the work."""

    def __init__(self, config: dict, info: DistInfo):
        from backbones import build_backbone
        from data import load_bin
        from losses import build_head

        self.config, self.info = config, info
        tcfg, mcfg = config["train"], config["model"]
        self.tcfg = tcfg
        self.device = info.device
        self.run_dir = Path(tcfg["output_dir"])
        self.ckpt_dir = self.run_dir / "checkpoints"
        if info.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.yaml")

        _seed_everything(tcfg["seed"])  # same on every rank: identical initial weights
        train_path = prepare_train_data(config["data"], info)
        self.dataset = build_dataset(train_path, mcfg["input_size"], config["data"]["flip"],
                                     config["data"]["augment"])
        for path in config["data"]["verify"]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"data.verify: no such file: {path}")
        verify = config["data"]["verify"] if info.is_main else []
        self.verify_sets = {Path(p).stem: load_bin(p) for p in verify}

        model_kwargs = {k: v for k, v in mcfg.items() if k != "norm_kwargs"}
        self.backbone = build_backbone(**model_kwargs, **mcfg["norm_kwargs"])
        if tcfg["init_backbone"]:
            load_backbone_state(self.backbone, ckpt.backbone_state(tcfg["init_backbone"]),
                                f"train.init_backbone {tcfg['init_backbone']}")
        if info.world_size > 1 and (mcfg["norm"] in ("syncsn", "syncbn") or tcfg["batch_size"] == 1):
            sync_batchnorm1d(self.backbone)
        self.channels_last = tcfg["channels_last"] and self.device.type == "cuda"
        torch.backends.cudnn.benchmark = self.device.type == "cuda"  # fixed input shapes
        self.backbone.to(self.device, memory_format=torch.channels_last if self.channels_last else None)
        self.head = build_head(dict(config["head"]), embedding_size=mcfg["embedding_size"],
                               num_classes=self.dataset.num_classes).to(self.device)
        self.model = self.backbone
        if info.world_size > 1:
            self.model = DistributedDataParallel(
                self.backbone, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
            self.model.register_comm_hook(None, _allreduce_sum_hook)

        self.optimizer = build_optimizer(param_groups(self.backbone, self.head, config["optim"]),
                                         config["optim"])
        self.head.attach_optimizer(self.optimizer)  # Partial FC sampling: step only the sampled rows
        self.loader = build_train_loader(self.dataset, tcfg["batch_size"], config["data"]["num_workers"],
                                         info, tcfg["seed"])
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.train has {len(self.dataset)} images, fewer than one global batch "
                             f"({tcfg['batch_size']} x {info.world_size} processes)")
        self.global_batch = tcfg["batch_size"] * info.world_size
        total = tcfg["epochs"] * self.steps_per_epoch
        self.total_steps = min(total, tcfg["max_steps"]) if tcfg["max_steps"] is not None else total
        self.schedule = build_schedule(self.optimizer, config["schedule"], self.total_steps,
                                       self.steps_per_epoch)
        self.amp_dtype = AMP_DTYPES.get(tcfg["precision"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tcfg["precision"] == "fp16")
        self.step = self.epoch = self.batch = 0
        self.best: dict = {}
        self.last_verification: dict = {}
        self.baselines: dict = {}
        self.last_checkpoint: Path | None = None  # the same on every rank (only rank 0 writes it)
        self._resume()
        _seed_everything(tcfg["seed"] + 1000 * info.rank + self.step)  # data order comes from the sampler

    # ---------------------------------------------------------------- checkpoints
    def _resume(self) -> None:
        choice = self.tcfg["resume"]
        found = ckpt.step_checkpoints(self.ckpt_dir)
        if choice == "none":
            if found:
                self._say(f"warning: train.resume=none: starting afresh although {self.ckpt_dir} holds "
                          f"checkpoints up to {found[-1].name}; they will be replaced as this run saves")
            return
        if choice == "auto":
            if not found:
                return
            path = found[-1]
        else:
            path = Path(choice)
        state = ckpt.load_checkpoint(path)
        missing = [k for k in ckpt.REQUIRED if k not in state]
        if missing:
            raise ValueError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")
        if state["config"].get("model") != self.config["model"]:
            raise ValueError(f"{path}: checkpoint model {state['config'].get('model')} differs from "
                             f"{self.config['model']}; use train.init_backbone to start from its weights")
        self.backbone.load_state_dict(state["backbone"])
        self.optimizer.load_state_dict(state["optimizer"])
        ckpt.load_head_optimizer_state(self.optimizer, self.head, state["head_optimizer"])
        self.head.load_state_dict(state["head"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        if state["global_batch"] != self.global_batch:
            self.batch = self.batch * state["global_batch"] // self.global_batch
            self._say(f"warning: global batch changed from {state['global_batch']} to {self.global_batch} "
                      f"({state['world_size']} -> {self.info.world_size} processes); continuing at batch "
                      f"{self.batch} of epoch {self.epoch}; the learning rate is not rescaled")
        self.schedule.load_state_dict(state["schedule"])
        factor = self.schedule.lr_lambdas[0](self.step)  # this step's lr, also if the total steps changed
        for group, base in zip(self.optimizer.param_groups, self.schedule.base_lrs):
            group["lr"] = base * factor
        self.best = state.get("best", {})
        if state["world_size"] == self.info.world_size:
            ckpt.set_rng_state(state["rng"][self.info.rank])
        self.last_checkpoint = path
        self._say(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch})")

    def _check_finite_weights(self) -> None:
        bad = any(not torch.isfinite(p).all() for p in list(self.backbone.parameters())
                  + list(self.head.parameters()))
        flag = torch.tensor([float(bad)], device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag)
        if flag.item():
            raise TrainingDiverged(self._diverged_message("weights are not finite", float("nan")))

    def save_checkpoint(self) -> None:
        """Write ``step_<N>.pt`` (rank 0; every rank takes part in gathering the head)."""
        self._check_finite_weights()
        state = {
            "backbone": self.backbone.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": ckpt.split_optimizer_state(self.optimizer, self.head),
            "head_optimizer": ckpt.head_optimizer_state(self.optimizer, self.head),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": all_gather_objects(ckpt.rng_state()),
            "step": self.step, "epoch": self.epoch, "batch": self.batch,
            "global_batch": self.global_batch, "world_size": self.info.world_size,
            "config": self.config, "best": self.best,
        }
        if self.info.is_main:
            ckpt.save_checkpoint(state, self.ckpt_dir / f"step_{self.step}.pt")
            ckpt.prune_checkpoints(self.ckpt_dir, self.tcfg["keep_checkpoints"])
        self.last_checkpoint = self.ckpt_dir / f"step_{self.step}.pt"
        barrier()

    # ---------------------------------------------------------------- verification
    def _accuracies(self, model, flip: bool = True) -> dict:
        """Verification results of ``model`` (any images -> embeddings module) on each ``data.verify`` set."""
        from eval.verification import evaluate
        from facerec.embedding import embed_images

        results = {}
        for name, (images, issame) in self.verify_sets.items():
            emb = embed_images(model, images, self.config["model"]["input_size"],
                               batch_size=self.tcfg["verify_batch_size"], flip=flip, device=self.device)
            r = evaluate(emb, issame)
            results[name] = {"accuracy": float(r["accuracy"]), "accuracy_std": float(r["accuracy_std"]),
                             "threshold": float(r["threshold"])}
        return results

    def report_baselines(self) -> None:
        """Accuracy of the untrained model and of raw pixels (cosine of the normalised pixel vectors) on
        each verification set, before training: what the trained accuracy is to be read against."""
        if self.info.is_main and self.verify_sets:
            untrained = self._accuracies(self.backbone)
            pixels = self._accuracies(torch.nn.Flatten(), flip=False)
            self.baselines = {name: {"untrained": untrained[name]["accuracy"],
                                     "raw_pixels": pixels[name]["accuracy"]} for name in self.verify_sets}
            text = ", ".join(f"{k} untrained model {v['untrained']:.4f}, raw pixels {v['raw_pixels']:.4f}"
                             for k, v in self.baselines.items())
            self._say(f"baselines before training: {text}")
            self.log.log(self.step, epoch=self.epoch, baselines=self.baselines)
        barrier()

    def verify(self) -> dict:
        """Accuracy on each ``data.verify`` set (rank 0; others wait); updates ``best`` and ``best.pt``."""
        results = {}
        if self.info.is_main and self.verify_sets:
            results = self._accuracies(self.backbone)
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
        head = self.head.state_dict()  # collective
        if self.info.is_main:
            ckpt.save_checkpoint({"backbone": self.backbone.state_dict(), "head": head, "config": self.config,
                                  "step": self.step, "epoch": self.epoch, "best": self.best},
                                 self.ckpt_dir / "best.pt")

    # ---------------------------------------------------------------- loop
    def _say(self, text: str) -> None:
        if self.info.is_main:
            log = getattr(self, "log", None)
            log.message(text) if log is not None else print(text, flush=True)

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
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with autocast:
            embeddings = self.model(images)
        loss = self.head(embeddings.float(), labels)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(self._diverged_message("the loss is not finite", value))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tcfg["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.backbone.parameters(), self.tcfg["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():
            # fp16: the scaler skips the optimizer step of a batch with inf/nan gradients (as it should),
            # and the schedule still advances one iteration; torch would warn about the call order.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
            self.schedule.step()
        return value

    def fit(self) -> dict:
        tcfg = self.tcfg
        self._say(f"training {self.config['model']['name']} ({self.config['model']['norm']}) on "
                  f"{len(self.dataset)} images / {self.dataset.num_classes} classes: {self.total_steps} "
                  f"steps of {self.global_batch} images ({self.info.world_size} x {tcfg['batch_size']}) on "
                  f"{self.device}; run dir {self.run_dir}")
        self.log = MetricsLog(self.run_dir, enabled=self.info.is_main, resume_step=self.step,
                              total_steps=self.total_steps, progress=tcfg["progress"])
        if tcfg["baselines"] and self.step == 0 and self.config["data"]["verify"]:
            self.report_baselines()
        start, start_step = time.time(), self.step
        window_loss, window_n, window_t = 0.0, 0, time.time()
        try:
            while self.step < self.total_steps:
                self.loader.sampler.set_epoch(self.epoch)
                self.loader.sampler.skip = self.batch * tcfg["batch_size"]
                for images, labels in self.loader:
                    loss = self.train_step(images, labels)
                    self.step += 1
                    self.batch += 1
                    window_loss, window_n = window_loss + loss, window_n + 1
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.log.progress(self.step, loss=loss, lr=lr, epoch=self.epoch)
                    if self.step % tcfg["log_every"] == 0 or self.step == self.total_steps:
                        now = time.time()
                        ips = window_n * self.global_batch / max(now - window_t, 1e-9)
                        self.log.log(self.step, epoch=self.epoch, loss=window_loss / window_n, lr=lr,
                                     images_per_sec=ips)
                        self.log.progress(self.step, loss=window_loss / window_n, lr=lr,
                                          img_s=round(ips, 1), epoch=self.epoch)
                        window_loss, window_n, window_t = 0.0, 0, now
                    if self.batch == self.steps_per_epoch:
                        self.epoch, self.batch = self.epoch + 1, 0
                    if self.batch == 0 or self.step % tcfg["checkpoint_every"] == 0:
                        self.save_checkpoint()
                    if self.config["data"]["verify"] and tcfg["verify_every"] \
                            and self.step % tcfg["verify_every"] == 0 and self.step < self.total_steps:
                        self.verify()
                    if self.step >= self.total_steps:
                        break
            if self.last_checkpoint != self.ckpt_dir / f"step_{self.step}.pt":
                self.save_checkpoint()
            if self.config["data"]["verify"]:
                self.verify()
        finally:
            self.log.close()
        seconds = time.time() - start
        summary = {"steps": self.step, "trained_steps": self.step - start_step, "seconds": seconds,
                   "run_dir": str(self.run_dir), "final": self.last_verification, "best": self.best,
                   "baselines": self.baselines}
        if self.info.is_main:
            final = ", ".join(self._describe(k, v["accuracy"]) for k, v in self.last_verification.items())
            best = (f"; best {self.best['accuracy']:.4f} at step {self.best['step']}" if self.best else "")
            print(f"done: {self.step} steps ({self.step - start_step} this run) in {_duration(seconds)}; "
                  f"verification: {final or 'none configured'}{best}; run dir: {self.run_dir}", flush=True)
        return summary


def _allreduce_sum_hook(process_group, bucket):
    """DDP communication hook that sums gradients over processes instead of averaging them.

    Partial FC's loss is already the mean over the global batch, and each process's backward yields its
    own images' share of that loss's gradient; the sum of the shares is the gradient of the global mean
    (the same as one process with the whole batch), the DDP default mean would be 1/W of it.
    """
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    work = torch.distributed.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


__all__ = ["Trainer", "TrainingDiverged", "build_dataset", "prepare_train_data", "train"]
