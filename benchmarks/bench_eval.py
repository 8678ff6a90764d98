"""Evaluation speed: the export/verify embedding pipeline against the bare model forward, and ``evaluate``.

Prints, measured side by side in one run on the same images:
* bare forward: the model on pre-made normalised tensors (image + flipped image, as the pipeline does);
* pipeline: ``facerec.embedding.embed_images`` on encoded JPEGs (decode + resize + normalise + forward);
* export: ``facerec.export.export_embeddings`` from a ``.bin`` file to ``.npz`` (adds reading and saving);
* the pipeline/forward throughput ratio (target >= 0.9) and the time of ``evaluate`` on 6,000 pairs.

    python -m benchmarks.bench_eval [--device cpu|cuda] [--quick] [--model iresnet18 --width 32 --size 112]
                                    [--images 256 --batch-size 64 --repeats 3 --threads N]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from backbones import build_backbone
from data import decode_image, encode_image, to_tensor, write_bin
from eval.verification import evaluate
from facerec.embedding import embed_images
from facerec.export import export_embeddings


def face_sized_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """Smooth random colour images encoded as JPEG (quality 90), a stand-in for aligned face crops."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
        noise = rng.normal(0, 6, image.shape)
        images.append(encode_image(np.clip(image + noise, 0, 255).astype(np.uint8), quality=90))
    return images


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def bare_forward(model, batches: list[torch.Tensor], device: str) -> float:
    """Seconds for the model on pre-made tensors (already on the device, flipped copies included)."""
    sync(device)
    start = time.perf_counter()
    for x in batches:
        model(x)
    sync(device)
    return time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model and few images")
    parser.add_argument("--model", default="iresnet18")
    parser.add_argument("--norm", default="sn")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--images", type=int, default=None, help="images per measurement (default 256)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.width, args.size, args.images, args.repeats = 8, 32, args.images or 32, 1
    count = args.images or 256
    device = args.device

    model = build_backbone(args.model, norm=args.norm, embedding_size=512 if not args.quick else 64,
                           input_size=args.size, width=args.width).to(device).eval()
    images = face_sized_jpegs(count, args.size)
    pixels = np.stack([decode_image(b, size=args.size) for b in images])
    batches = []
    for start in range(0, count, args.batch_size):
        x = to_tensor(pixels[start:start + args.batch_size])
        batches.append(torch.cat([x, x.flip(3)]).to(device))
    print(f"model {args.model} norm={args.norm} width={args.width} input {args.size} on {device}; "
          f"{count} images, batch {args.batch_size} (+ flipped), {torch.get_num_threads()} torch threads")

    with tempfile.TemporaryDirectory() as tmp:
        bin_path = Path(tmp) / "images.bin"
        write_bin(bin_path, images, [True] * (count // 2))
        options = {"batch_size": args.batch_size, "device": device}
        run_pipeline = lambda: embed_images(model, images, args.size, **options)
        run_export = lambda: export_embeddings(model, bin_path, Path(tmp) / "out.npz", args.size, **options,
                                               progress=False)
        # warm-up (allocator, kernel selection), then alternate the three so drift hits all alike
        bare_forward(model, batches[:2], device), run_pipeline()
        best = {"bare forward": [], "pipeline (embed_images)": [], "export (.bin -> .npz)": []}
        for _ in range(args.repeats):
            best["bare forward"].append(bare_forward(model, batches, device))
            best["pipeline (embed_images)"].append(timed(run_pipeline))
            best["export (.bin -> .npz)"].append(timed(run_export))
    seconds = {name: min(times) for name, times in best.items()}
    for name, s in seconds.items():
        print(f"  {name:26s} {count / s:9.1f} images/s  ({s:.3f} s)")
    bare = seconds["bare forward"]
    print(f"  throughput ratio pipeline / bare forward: {bare / seconds['pipeline (embed_images)']:.3f} "
          f"(target >= 0.9); export / bare forward: {bare / seconds['export (.bin -> .npz)']:.3f}")

    rng = np.random.default_rng(1)
    pairs = 6000
    issame = np.tile(np.repeat([True, False], 300), 10)
    emb = rng.normal(size=(2 * pairs, 512)).astype(np.float32)
    emb[1::2][issame] += emb[0::2][issame]
    times = [timed(lambda: evaluate(emb, issame)) for _ in range(3 if not args.quick else 1)]
    print(f"evaluate on {pairs} pairs (512-d, 10 folds, 400 thresholds, TAR@FAR, AUC/EER): "
          f"{1000 * min(times):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
