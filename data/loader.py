"""The training DataLoader: seeded shuffling, distributed sharding, per-worker file handles and seeds."""
from __future__ import annotations

import os
import random
import signal
from functools import partial

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from .workers import exit_with, worker_context


def seed_worker(worker_id, parent: int | None = None):
    """Seed numpy's and Python's global generators from the worker's torch seed (set by the DataLoader);
    one OpenCV thread per worker (the workers are the parallelism). The worker ends with process ``parent``
    (the loader's, even when it is killed) and leaves Ctrl-C to it: the parent stops at a step boundary
    and still needs its workers."""
    if parent is not None:
        exit_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _default_sampler(dataset, shuffle, drop_last, seed, generator):
    if dist.is_available() and dist.is_initialized():
        return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)


def build_loader(dataset, batch_size, num_workers=2, shuffle=True, drop_last=True, seed=0, sampler=None):
    """DataLoader over ``dataset`` reproducible from ``seed``.

    Under an initialised torch.distributed group each process reads its own shard through a
    DistributedSampler (call ``loader.sampler.set_epoch(epoch)`` every epoch); otherwise a RandomSampler
    driven by a generator seeded with ``seed``; or the given ``sampler``. Workers open their own file
    handles (datasets open files lazily), are seeded from the loader's generator, and start from a fork
    server rather than as forks of this process (a fork taken after OpenCV or torch started their thread
    pools can deadlock in the child); memory is pinned when CUDA is available."""
    generator = torch.Generator().manual_seed(seed)
    if sampler is None:
        sampler = _default_sampler(dataset, shuffle, drop_last, seed, generator)
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
        persistent_workers=workers,
        worker_init_fn=partial(seed_worker, parent=os.getpid()) if workers else None,
        multiprocessing_context=worker_context() if workers else None,
        generator=generator,
    )
