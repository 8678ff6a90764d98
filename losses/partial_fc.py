"""Partial FC: a margin-softmax classifier whose class centres are sharded over the processes.

Each process keeps a contiguous, balanced slice of the (num_classes, embedding_size) class centres
(rank r holds classes ``shard_range(num_classes, world_size, r)``).  A step all-gathers the embeddings
(differentiably) and labels of every process, computes cosine logits against its own shard, applies the
margin head and a softmax cross-entropy whose max, exp-sum and target logit are combined over the shards
with all-reduces.  The loss is the mean over the global batch and its gradients are exact: each rank's
embeddings receive d(loss)/d(embedding) of the global loss, each shard d(loss)/d(its centres).
Note: DistributedDataParallel *averages* backbone gradients over the W processes, so a DDP backbone
trained with this loss would get 1/W of the global-mean gradient; register a communication hook that
sums instead (as facerec's training loop does) to get exactly the gradient of this loss.

Sampling (``sample_rate < 1``, training mode with gradients enabled): each step keeps every class of its
shard that is a target in the global batch plus random other classes, ``max(int(sample_rate *
shard_size), positives)`` rows in all.  Logits, loss and gradients involve only those rows (the
weight's gradient is a sparse tensor holding just those rows; GradScaler handles it).  So that an
ordinary torch optimizer (SGD with momentum, AdamW, ...) updates *only* those rows, call
:meth:`PartialFC.attach_optimizer` once: during each ``optimizer.step()`` the weight, its gradient and
every per-element optimizer state tensor (momentum buffer, Adam moments) are swapped for their sampled
rows, stepped, and scattered back.  Unsampled rows, and their momentum, stay bit-identical; weight decay
and momentum apply to sampled rows only (insightface keeps the optimizer state of the sampled
sub-matrix the same way).  Outside ``step()`` the parameter and its optimizer state have full shard
shape, so the usual checkpointing of parameters and optimizer state works.  Scalar optimizer state
(Adam's step count) is shared by all rows.

The state dict is world-size independent: key ``weight`` holds the full (num_classes, embedding_size)
matrix, gathered on save (``state_dict()`` is then a collective: call it on every rank) and sliced to
each rank's shard on load.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather as differentiable_all_gather


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of ``num_classes`` (sizes differ by at most one)."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)


class ShardedSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of logits whose columns are split over the processes of ``group``.

    ``logits`` (B, C_local) float32, ``labels`` (B,) local column of the target or -1 when another shard
    owns it.  Forward: all-reduce MAX of the row maxima, SUM of the exp-sums and SUM of the (shifted)
    target logit, contributed by its owning shard; ``loss = mean(log(sum_exp) - (target - max))``.
    Backward is local: ``(softmax - onehot) / B`` for this shard's columns.
    """

    @staticmethod
    def forward(ctx, logits, labels, group):
        row_max = logits.max(dim=1, keepdim=True).values
        if group is not None:
            dist.all_reduce(row_max, dist.ReduceOp.MAX, group=group)
        prob = torch.exp(logits - row_max)
        sum_exp = prob.sum(dim=1, keepdim=True)
        rows = torch.nonzero(labels >= 0).squeeze(1)
        cols = labels[rows]
        target = torch.zeros_like(sum_exp).squeeze(1)
        target[rows] = logits[rows, cols] - row_max[rows, 0]
        if group is not None:
            dist.all_reduce(sum_exp, dist.ReduceOp.SUM, group=group)
            dist.all_reduce(target, dist.ReduceOp.SUM, group=group)
        prob.div_(sum_exp)
        ctx.save_for_backward(prob, rows, cols)
        return (torch.log(sum_exp.squeeze(1)) - target).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        prob, rows, cols = ctx.saved_tensors
        grad = prob.clone()
        grad[rows, cols] -= 1.0
        return grad * (grad_loss / prob.shape[0]), None, None


class PartialFC(nn.Module):
    """Sharded margin-softmax classifier: ``loss = pfc(embeddings, labels)`` on this process's batch.

    Args:
        embedding_size: D of the (N, D) embeddings.
        num_classes: total number of classes over all processes.
        head: margin head ``head(cosine, labels) -> logits`` (e.g. :class:`losses.ArcFace`).
        sample_rate: fraction of each shard's class centres used per training step, in (0, 1].
        process_group: the processes that share the class centres and the batch (default: all of them,
            as ``SyncSwitchNorm2d``); world size and rank are those within it.

    Construct it after ``torch.distributed.init_process_group`` (when distributed); every process must
    pass batches of the same size.  Centres start as N(0, 0.01), as insightface.
    """

    def __init__(self, embedding_size: int, num_classes: int, head: nn.Module, sample_rate: float = 1.0,
                 process_group=None):
        super().__init__()
        for key, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        if self.rank < 0:
            raise ValueError("PartialFC: this process is not a member of process_group")
        if num_classes < self.world_size:
            raise ValueError(f"num_classes ({num_classes}) must be >= the world size ({self.world_size})")
        self.group = None  # single process: no communication
        if self.world_size > 1:
            self.group = dist.group.WORLD if process_group is None else process_group
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.class_start, self.class_end = shard_range(num_classes, self.world_size, self.rank)
        self.num_local = self.class_end - self.class_start
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        self.head = head
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, embedding_size)))
        self.sampled_index: torch.Tensor | None = None  # shard rows sampled since the last optimizer step
        self._hooked_optimizers: list[int] = []
        self._swapped: dict = {}

    @property
    def sampling(self) -> bool:
        return self.sample_rate < 1.0

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"shard=[{self.class_start}, {self.class_end}), sample_rate={self.sample_rate}")

    # ------------------------------------------------------------------ forward
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Global-batch mean margin-softmax loss (float32 scalar) for this process's (B, D) embeddings
        and (B,) integer labels in [0, num_classes)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be (B, {self.embedding_size}), got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1] or labels.is_floating_point():
            raise ValueError(f"labels must be integers of shape ({embeddings.shape[0]},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.long()
        if self.world_size > 1:
            self._check_equal_batches(embeddings.shape[0], embeddings.device)
            embeddings = torch.cat(differentiable_all_gather(embeddings, group=self.group))
            gathered = [torch.empty_like(labels) for _ in range(self.world_size)]
            dist.all_gather(gathered, labels, group=self.group)
            labels = torch.cat(gathered)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got values from "
                             f"{int(labels.min())} to {int(labels.max())}")
        local = labels - self.class_start
        local = torch.where((local >= 0) & (local < self.num_local), local, -1)
        weight = self.weight
        if self.sampling and self.training and torch.is_grad_enabled():
            index, local = self._sample(local)
            weight = F.embedding(index, self.weight, sparse=True)  # sparse gradient: sampled rows only
        cosine = F.linear(F.normalize(embeddings), F.normalize(weight))
        with torch.autocast(device_type=cosine.device.type, enabled=False):
            logits = self.head(cosine.float(), local).float()
            return ShardedSoftmaxCrossEntropy.apply(logits, local, self.group)

    def _check_equal_batches(self, batch: int, device: torch.device) -> None:
        sizes = torch.tensor([batch, -batch], device=device)
        dist.all_reduce(sizes, dist.ReduceOp.MAX, group=self.group)
        if int(sizes[0]) != -int(sizes[1]):
            raise ValueError(f"every process must pass the same batch size; got sizes from "
                             f"{-int(sizes[1])} to {int(sizes[0])}")

    def _sample(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted shard rows to use (all positives + random others) and labels remapped to them."""
        if not self._hooked_optimizers:
            raise RuntimeError(
                "PartialFC with sample_rate < 1 must know its optimizer so that only sampled rows are "
                "updated: call pfc.attach_optimizer(optimizer) once after creating the optimizer")
        with torch.no_grad():
            positive = torch.unique(local[local >= 0])
            score = torch.rand(self.num_local, device=local.device)
            score[positive] = 2.0
            k = max(self.num_sample, positive.numel())
            index = torch.topk(score, k).indices.sort().values
            local = torch.where(local >= 0, torch.searchsorted(index, local), local)
        pending = self.sampled_index
        self.sampled_index = index if pending is None else torch.unique(torch.cat([pending, index]))
        return index, local

    # ------------------------------------------------------------------ optimizer coupling
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer`` step only the rows sampled since its last step (no-op for sample_rate 1).

        Registers step pre/post hooks that swap ``weight``, its gradient and its per-element optimizer
        state for the sampled rows during ``optimizer.step()``.  Call once, after building the optimizer.
        """
        if not any(p is self.weight for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("attach_optimizer: the optimizer does not hold this PartialFC's weight")
        if not self.sampling or id(optimizer) in self._hooked_optimizers:
            return
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)
        self._hooked_optimizers.append(id(optimizer))

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        p, index, grad = self.weight, self.sampled_index, self.weight.grad
        if index is None or grad is None:
            return
        if grad.is_sparse:  # rows of the sampled forward passes (+ any left from earlier backward passes)
            grad = grad.coalesce()
            index = torch.unique(torch.cat([index, grad.indices()[0]]))
            rows = torch.searchsorted(index, grad.indices()[0])
            sub_grad = grad.values().new_zeros(index.numel(), p.shape[1]).index_add_(0, rows, grad.values())
        else:
            sub_grad = grad[index]
        state = optimizer.state.get(p, {})
        full_state = {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape}
        self._swapped = {"index": index, "data": p.data, "grad": p.grad, "state": full_state}
        p.data = p.data[index]
        p.grad = sub_grad
        for key, value in full_state.items():
            state[key] = value[index]

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        swapped, self._swapped = self._swapped, {}
        self.sampled_index = None
        if not swapped:
            return
        p, index = self.weight, swapped["index"]
        full = swapped["data"].index_copy_(0, index, p.data)
        state = optimizer.state.get(p, {})
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.shape == p.shape:  # per-element state, new ones start at 0
                target = swapped["state"].get(key)
                if target is None:
                    target = torch.zeros_like(full, dtype=value.dtype)
                state[key] = target.index_copy_(0, index, value)
        p.data = full
        p.grad = swapped["grad"]

    # ------------------------------------------------------------------ world-size independent state
    def full_weight(self) -> torch.Tensor:
        """The (num_classes, D) class centres of all shards (a collective when distributed)."""
        if self.world_size == 1:
            return self.weight.detach()
        rows = -(-self.num_classes // self.world_size)
        padded = self.weight.detach().new_zeros(rows, self.embedding_size)
        padded[: self.num_local] = self.weight.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        sizes = [end - start for start, end in
                 (shard_range(self.num_classes, self.world_size, r) for r in range(self.world_size))]
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if keep_vars and self.world_size == 1:
            destination[prefix + "weight"] = self.weight
        else:
            destination[prefix + "weight"] = self.full_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key
                               and "." not in k[len(prefix):])
        if key not in state_dict:
            missing_keys.append(key)
            return
        full = state_dict[key]
        if full.ndim != 2 or full.shape[1] != self.embedding_size:
            raise ValueError(f"{key}: expected class centres of shape (num_classes, {self.embedding_size}), "
                             f"got {tuple(full.shape)}")
        if full.shape[0] != self.num_classes:
            raise ValueError(f"{key}: the checkpoint has {full.shape[0]} classes but this PartialFC has "
                             f"{self.num_classes}")
        with torch.no_grad():
            self.weight.copy_(full[self.class_start:self.class_end])
        self.sampled_index = None
