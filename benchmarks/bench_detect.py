"""MTCNN detection speed: photos per second on LFW-sized (250x250) and large (1920x1080) photos, and the
share of the time spent in each stage (pyramid + P-Net, R-Net, O-Net).

The photos are real CFP faces: for 250x250 a photo's face square scaled to LFW's framing, for 1920x1080 a
face pasted (about 300 pixels high) into a plain scene. One process; ``--threads`` torch threads.

    python -m benchmarks.bench_detect [--device cuda] [--photos 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from data.detection import MTCNN, read_photo
from data.verification_sets import cfp_alignment_points

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CFP = ROOT.parent / "shared" / "data" / "cfp"
SIZES = {"250x250": (250, 250), "1920x1080": (1080, 1920)}


def face_photo(cfp_dir: Path, index: int, height: int, width: int) -> np.ndarray:
    """A ``height`` x ``width`` photo holding CFP frontal face ``index``: the square of 2.2 eye-to-mouth
    distances around the face, scaled to 0.45 of the photo height, at a spread of positions."""
    ident, number = 1 + index % 500, 1 + (index // 500) % 10
    image = read_photo(cfp_dir / "Data" / "Images" / f"{ident:03d}" / "frontal" / f"{number:02d}.jpg")
    fiducials = np.loadtxt(cfp_dir / "Data" / "Fiducials" / f"{ident:03d}" / "frontal" / f"{number:02d}.txt",
                           delimiter=",")
    points, _ = cfp_alignment_points(fiducials, profile=False)
    half = int(2.2 * np.linalg.norm(points[0] - points[4]) / 2 * 2)
    padded = cv2.copyMakeBorder(image, half, half, half, half, cv2.BORDER_CONSTANT, value=(110, 110, 110))
    x0, y0 = points.mean(0).astype(int)
    side = int(0.45 * height) if height > 250 else height
    face = cv2.resize(padded[y0 : y0 + 2 * half, x0 : x0 + 2 * half], (side, side))
    if side == height:
        return face
    photo = np.full((height, width, 3), 110, np.uint8)
    rng = np.random.default_rng(index)
    top, left = rng.integers(0, height - side), rng.integers(0, width - side)
    photo[top : top + side, left : left + side] = face
    return photo


def measure(detector: MTCNN, photos: list[np.ndarray], batch: int) -> tuple[float, dict, int]:
    """Photos per second over ``photos`` in batches of ``batch`` (after one warm-up batch), the share of
    each stage, and the number of photos with a face."""
    detector.detect(photos[:batch])
    detector.stage_seconds = dict.fromkeys(detector.stage_seconds, 0.0)
    found = 0
    start = time.perf_counter()
    for i in range(0, len(photos), batch):
        found += sum(bool(faces) for faces in detector.detect(photos[i : i + batch]))
    seconds = time.perf_counter() - start
    total = sum(detector.stage_seconds.values())
    return len(photos) / seconds, {k: v / total for k, v in detector.stage_seconds.items()}, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfp", type=Path, default=DEFAULT_CFP, help=f"CFP release (default {DEFAULT_CFP})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--photos", type=int, default=64, help="photos per size (default 64)")
    parser.add_argument("--batch", type=int, default=16, help="250x250 photos per detect call (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    detector = MTCNN(args.device, timed=True)
    print(f"MTCNN on {args.device}, {torch.get_num_threads()} torch threads, min face 20 px")
    for name, (height, width) in SIZES.items():
        count = args.photos if height == 250 else max(4, args.photos // 8)
        photos = [face_photo(args.cfp, i, height, width) for i in range(count)]
        batch = args.batch if height == 250 else 1
        rate, shares, found = measure(detector, photos, batch)
        stages = ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items())
        print(f"{name}: {rate:.1f} photos/s (batch {batch}, {count} photos, a face found in {found}); "
              f"time per stage: {stages}")


if __name__ == "__main__":
    main()
