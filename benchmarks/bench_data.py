"""Data-path throughput, measured side by side in one run.

* records read per second by data.recordio vs mxnet.recordio 1.9.1 (own venv, same file; target >= 1.0x)
* decode + flip + normalise per second in one process (FaceRecordDataset.__getitem__) vs a bare
  ``cv2.imdecode`` loop over the same records (target >= 0.85x)
* the same with every augmentation of ``data.augment`` switched on (p = 1, default strengths): its cost
* images per second of a 2-worker build_loader, without and with that augmentation

Builds a pack of 112x112 JPEG records (insightface layout) in a temporary directory, or reads ``--rec``.
Usage: python -m benchmarks.bench_data [--quick] [--rec DIR_OR_REC] [--records N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.mxnet_env import MXNetUnavailable, run_script
from data.augment import Augment
from data.datasets import FaceRecordDataset
from data.loader import build_loader
from data.recordio import MXIndexedRecordIO, MXRecordIO, pack, unpack
from facerec.config import defaults

MXNET_READ = r'''
import json, sys, time
import mxnet.recordio as rio
idx, rec, order_path, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
order = [int(k) for k in open(order_path).read().split()]
reader = rio.MXIndexedRecordIO(idx, rec, "r")
best_random = best_sequential = float("inf")
for _ in range(repeat):
    start = time.perf_counter()
    for key in order:
        reader.read_idx(key)
    best_random = min(best_random, time.perf_counter() - start)
    sequential = rio.MXRecordIO(rec, "r")
    start = time.perf_counter()
    count = 0
    while sequential.read() is not None:
        count += 1
    best_sequential = min(best_sequential, time.perf_counter() - start)
    sequential.close()
print(json.dumps({"random": len(order) / best_random, "sequential": count / best_sequential}))
'''


def face_like_jpeg(rng, size=112, quality=95):
    """A 112x112 JPEG with photo-like statistics: smooth shading, a few shapes, sensor noise."""
    low = cv2.resize(rng.normal(128, 50, (6, 6, 3)).astype(np.float32), (size, size),
                     interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        axes = tuple(int(v) for v in rng.integers(4, size // 3, 2))
        colour = tuple(rng.uniform(0, 255, 3).tolist())
        cv2.ellipse(low, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    low = cv2.GaussianBlur(low, (0, 0), 1.2) + rng.normal(0, 5, low.shape)
    bgr = np.clip(low, 0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def build_pack(folder, records, seed=0):
    """Write train.rec/train.idx/property of ``records`` JPEG records in insightface's layout."""
    rng = np.random.default_rng(seed)
    identities = max(1, min(100, records // 8))
    labels = np.arange(records) * identities // records
    start = records + 1
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "w") as writer:
        writer.write_idx(0, pack((0, [start, start + identities], 0, 0), b""))
        for key, label in enumerate(labels, 1):
            writer.write_idx(key, pack((0, float(label), key, 0), face_like_jpeg(rng)))
        for identity in range(identities):
            keys = np.flatnonzero(labels == identity) + 1
            writer.write_idx(start + identity, pack((0, [keys[0], keys[-1] + 1], 0, 0), b""))
    (folder / "property").write_text(f"{identities},112,112")


def best_of(repeat, fn):
    """Shortest wall time of ``repeat`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_reading(rec, idx, repeat):
    with MXIndexedRecordIO(idx, rec, "r") as reader:
        order = list(reader.keys)
    np.random.default_rng(0).shuffle(order)
    ours = {}
    with MXIndexedRecordIO(idx, rec, "r") as reader:

        def random_reads():
            for key in order:
                reader.read_idx(key)

        ours["random"] = len(order) / best_of(repeat, random_reads)

    def sequential():
        with MXRecordIO(rec, "r") as r:
            while r.read() is not None:
                pass
    ours["sequential"] = len(order) / best_of(repeat, sequential)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(map(str, order)))
    try:
        theirs = json.loads(run_script(MXNET_READ, idx, rec, f.name, repeat).strip().splitlines()[-1])
    except MXNetUnavailable as error:
        theirs = {"error": str(error)}
    finally:
        os.unlink(f.name)
    return ours, theirs


def every_augmentation():
    """``data.augment``'s default strengths with every probability set to 1 (the most work per image)."""
    return Augment(**{name: {**params, "p": 1.0} for name, params in defaults()["data"]["augment"].items()})


def bench_decode(datasets, repeat):
    """Images per second of a bare ``cv2.imdecode`` loop and of each dataset's ``__getitem__``."""
    dataset = datasets[0]
    with MXRecordIO(dataset.path, "r") as reader:
        images = [np.frombuffer(unpack(reader.read_at(int(o)))[1], np.uint8) for o in dataset._offsets]

    def bare_loop():
        for buf in images:
            cv2.imdecode(buf, cv2.IMREAD_COLOR)

    def dataset_loop(dataset):  # results dropped as a DataLoader's collate drops them: memory is reused
        for i in range(len(dataset)):
            dataset[i]

    torch.manual_seed(0)
    best = [float("inf")] * (1 + len(datasets))
    for _ in range(repeat):  # interleaved, so all see the same machine load
        loops = [bare_loop] + [lambda d=d: dataset_loop(d) for d in datasets]
        best = [min(b, best_of(1, loop)) for b, loop in zip(best, loops)]
    return [len(images) / b for b in best]


def bench_loader(dataset, batch_size, epochs, num_workers=2):
    """Images per second of ``build_loader`` over ``epochs`` epochs, its workers started beforehand."""
    loader = build_loader(dataset, batch_size=batch_size, num_workers=num_workers, seed=0)
    next(iter(loader))  # start the (persistent) workers
    start, count = time.perf_counter(), 0
    for _ in range(epochs):
        for images, _ in loader:
            count += len(images)
    return count / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_data", description=__doc__.splitlines()[0])
    parser.add_argument("--rec", help="pack directory or .rec file to read (default: build one)")
    parser.add_argument("--records", type=int, help="records to build (default 5000, --quick 800)")
    parser.add_argument("--repeat", type=int, help="timing repeats, best kept (default 3, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    records = args.records or (800 if args.quick else 5000)
    repeat = args.repeat or (1 if args.quick else 3)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.rec:
            path = Path(args.rec)
        else:
            path = Path(tmp)
            build_pack(path, records)
        dataset = FaceRecordDataset(path, train=True)
        augmented = FaceRecordDataset(path, train=True, augment=every_augmentation())
        idx = str(Path(dataset.path).with_suffix(".idx"))
        size_mb = os.path.getsize(dataset.path) / 2**20
        print(f"pack: {dataset.path} ({len(dataset)} images, {dataset.num_classes} classes, "
              f"{size_mb:.1f} MiB)")
        ours, theirs = bench_reading(dataset.path, idx, repeat)
        bare, decode, decode_augmented = bench_decode([dataset, augmented], repeat)
        loaders = [bench_loader(d, batch_size=64 if args.quick else 128, epochs=1 if args.quick else 2)
                   for d in (dataset, augmented)]
    rows = []
    for mode in ("random", "sequential"):
        name = f"records read/s, {'read_idx shuffled keys' if mode == 'random' else 'read() sequential'}"
        if "error" in theirs:
            rows.append((name, ours[mode], float("nan"), f"mxnet unavailable: {theirs['error']}"))
        else:
            ratio = f"{ours[mode] / theirs[mode]:.2f}x (target >= 1.0x)"
            rows.append((name, ours[mode], theirs[mode], ratio))
    rows.append(("images/s/worker, decode+flip+normalise vs cv2.imdecode", decode, bare,
                 f"{decode / bare:.2f}x (target >= 0.85x)"))
    rows.append(("images/s/worker, the same + every augmentation (p=1)", decode_augmented, decode,
                 f"{decode_augmented / decode:.2f}x of no augmentation"))
    rows.append(("images/s, build_loader 2 workers", loaders[0], float("nan"), ""))
    rows.append(("images/s, build_loader 2 workers, every augmentation", loaders[1], loaders[0],
                 f"{loaders[1] / loaders[0]:.2f}x of no augmentation"))
    print(f"\n{'measure':<58} {'ours':>10} {'reference':>10}  ratio")
    for name, mine, ref, ratio in rows:
        print(f"{name:<58} {mine:>10.0f} {ref:>10.0f}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
