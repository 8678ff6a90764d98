"""Peak bytes of live tensors during a block, counted from tensor shapes: exact for real tensors, and
the same count for fake (meta-backed) tensors, so the memory of a step too large to run is derived
from the very code that runs it.

:class:`LiveTensorBytes` sees every tensor an aten operator returns (forward, backward and optimizer
ops alike) and counts each new storage once, from its creation until the last tensor using it is
freed (views and in-place results allocate nothing).  Tensors that exist before the block (parameters,
optimizer state) are not counted: the peak is the block's extra memory.  Scratch memory inside an
operator's kernel is not a tensor and is not seen.

Under ``FakeTensorMode`` the few data-dependent operators (``nonzero``, ``unique``, boolean-mask
indexing, ``.item()``) have no shape to compute; they are given their upper bound (every element
selected / unique) and ``.item()`` returns 0.  Sparse tensors count their indices
and values; fake sparse tensors do not carry them, so they are held here, and a sparse result of a
sparse input (clone, coalesce) gets new ones of the input's size (an upper bound for coalesce).
"""
from __future__ import annotations

import weakref

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes(fake) as live: ...``; then ``live.peak``: the most bytes of tensors created
    in the block that were alive at once.  ``fake``: the block runs under a ``FakeTensorMode``."""

    def __init__(self, fake: bool = False):
        super().__init__()
        self.fake = fake
        self.peak = 0
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self._sparse_parts: dict[int, tuple[weakref.ref, tuple[torch.Tensor, ...]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = self._fake_data_dependent(func, args) if self.fake else None
        if out is None:
            out = func(*args, **(kwargs or {}))
        if isinstance(out, (int, float, bool)) or any(r.alias_info for r in func._schema.returns):
            return out  # views and in-place results allocate nothing (their storage is counted or older)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor, func, args)
        self._forget_freed()
        self.peak = max(self.peak, sum(size for _, size in self._storages.values()))
        return out

    def _count(self, tensor: torch.Tensor, func, args) -> None:
        if not tensor.is_sparse:
            storage = tensor.untyped_storage()
            self._storages.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
            return
        if not self.fake:
            parts = (tensor._indices(), tensor._values())
        elif func is aten._sparse_coo_tensor_with_dims_and_tensors.default:
            parts = (args[3], args[4])  # (indices, values): the fake sparse tensor drops them
        elif args and id(args[0]) in self._sparse_parts:  # clone, coalesce, ...: new parts of at most
            parts = tuple(torch.empty_like(p) for p in self._sparse_parts[id(args[0])][1])  # that size
        else:
            return
        self._sparse_parts[id(tensor)] = (weakref.ref(tensor), parts)
        for part in parts:
            self._count(part, func, args)

    def _forget_freed(self) -> None:
        for key in [k for k, (ref, _) in self._sparse_parts.items() if ref() is None]:
            del self._sparse_parts[key]
        for key in [k for k, (ref, _) in self._storages.items() if ref.expired()]:
            del self._storages[key]

    @staticmethod
    def _fake_data_dependent(func, args):
        """Upper-bound results of the operators whose output shape depends on the data."""
        if func is aten._local_scalar_dense.default:
            return 0
        if func is aten.nonzero.default:
            x = args[0]
            return x.new_empty((x.numel(), x.dim()), dtype=torch.long)
        if func is aten._unique2.default:
            x = args[0]
            return x.new_empty(x.numel()), x.new_empty(0, dtype=torch.long), x.new_empty(0, dtype=torch.long)
        if func is aten.index.Tensor and len(args[1]) == 1 and args[1][0] is not None \
                and args[1][0].dtype == torch.bool:
            x, mask = args[0], args[1][0]
            return x.new_empty((mask.numel(), *x.shape[mask.dim():]))
        return None
