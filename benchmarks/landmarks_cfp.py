"""Landmark accuracy of the MTCNN detector on the real CFP photos, against the release's fiducials.

Frontal images (5,000): detection rate and NME, the mean distance of the detector's 5 points (main face)
from the 5 points derived from the 30 manual fiducials (eye centres, nose tip, mouth corners; the hidden
half mirrored across the facial midline, see ``data.verification_sets.cfp_alignment_points``), divided by
the inter-ocular distance (eye centre to eye centre).
Profile images (2,000): only one half is annotated, so the error is over the visible eye centre, the nose
tip and the visible mouth corner (each detected eye / mouth corner matched to the nearer of the two), and
it is divided by the inter-ocular distance the face would have seen from the front: the visible eye to
mouth-corner distance times the ArcFace template's ratio of the two (35.24 / 40.78).

The detections of all 7,000 images are cached (``--cache``, an .npz) and reused by later runs and by
``benchmarks/real_cfp.py --align detect``.

    python -m benchmarks.landmarks_cfp [--workers 2] [--device cuda] [--cache FILE.npz]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from data.align import ARCFACE_TEMPLATE
from data.detection import DetectSettings, detect_landmarks
from data.verification_sets import CFP_MOUTH_CORNER, CFP_NOSE_TIP, cfp_alignment_points

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CFP = ROOT.parent / "shared" / "data" / "cfp"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "facerec_cfp_detections.npz"
# the template's inter-ocular distance over its (left) eye to (left) mouth-corner distance
FRONTAL_RATIO = float(np.linalg.norm(ARCFACE_TEMPLATE[0] - ARCFACE_TEMPLATE[1])
                      / np.linalg.norm(ARCFACE_TEMPLATE[0] - ARCFACE_TEMPLATE[3]))


def cfp_images(cfp_dir: Path) -> list[Path]:
    """Every CFP image, ``Data/Images/<id>/<pose>/NN.jpg``, sorted."""
    images = sorted((cfp_dir / "Data" / "Images").glob("*/*/*.jpg"))
    if not images:
        raise FileNotFoundError(f"no CFP images under {cfp_dir / 'Data' / 'Images'}")
    return images


def cfp_detections(cfp_dir: Path, cache: Path = DEFAULT_CACHE, workers: int = 2, device: str = "cpu") -> dict:
    """``{image path: (5, 2) detected landmarks of the main face, or None}`` for all CFP images; read from
    ``cache`` when it holds them, else detected (``workers`` processes, ``device``) and saved there."""
    images = cfp_images(cfp_dir)
    names = [p.relative_to(cfp_dir / "Data" / "Images").as_posix() for p in images]
    if cache.is_file():
        saved = np.load(cache)
        if saved["names"].tolist() == names:
            return {p: (None if np.isnan(m).any() else m) for p, m in zip(images, saved["landmarks"])}
        print(f"{cache} holds other images: detecting again")
    start = time.perf_counter()
    found = detect_landmarks(images, DetectSettings(size=None, device=device), workers, "cfp detect")
    seconds = time.perf_counter() - start
    print(f"detected {len(images)} CFP images in {seconds:.0f} s ({len(images) / seconds:.1f} photos/s, "
          f"{workers} workers, {device})")
    landmarks = np.stack([np.full((5, 2), np.nan) if found[p] is None else found[p] for p in images])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, names=np.array(names), landmarks=landmarks)
    return found


def fiducials_of(image: Path) -> np.ndarray:
    """The 30 release fiducials of ``.../Data/Images/<id>/<pose>/NN.jpg``."""
    parts = image.parts
    i = len(parts) - 1 - parts[::-1].index("Images")
    return np.loadtxt(Path(*parts[:i], "Fiducials", *parts[i + 1:]).with_suffix(".txt"), delimiter=",")


def frontal_nme(detected: np.ndarray, fiducials: np.ndarray) -> float:
    """Mean 5-point error over the inter-ocular distance, against the fiducial-derived 5 points."""
    truth, _ = cfp_alignment_points(fiducials, profile=False)
    return float(np.linalg.norm(detected - truth, axis=1).mean() / np.linalg.norm(truth[0] - truth[1]))


def profile_nme(detected: np.ndarray, fiducials: np.ndarray) -> float:
    """Mean error of the visible eye, nose tip and visible mouth corner, over the frontal-equivalent
    inter-ocular distance (visible eye to mouth corner times :data:`FRONTAL_RATIO`)."""
    (eye, corner), _ = cfp_alignment_points(fiducials, profile=True)
    nose = fiducials[CFP_NOSE_TIP]
    errors = [np.linalg.norm(detected[:2] - eye, axis=1).min(), np.linalg.norm(detected[2] - nose),
              np.linalg.norm(detected[3:] - corner, axis=1).min()]
    assert np.allclose(corner, fiducials[CFP_MOUTH_CORNER])
    return float(np.mean(errors) / (np.linalg.norm(eye - corner) * FRONTAL_RATIO))


def report(pose: str, images: list[Path], found: dict) -> None:
    """Print the detection rate and the NME figures of one pose."""
    measure = frontal_nme if pose == "frontal" else profile_nme
    errors = np.array([measure(found[p], fiducials_of(p)) for p in images if found[p] is not None])
    print(f"{pose}: detected {len(errors)} of {len(images)} images ({100 * len(errors) / len(images):.2f}%); "
          f"NME mean {errors.mean():.4f}, median {np.median(errors):.4f}, "
          f"{(errors > 0.2).sum()} images above 0.2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfp", type=Path, default=DEFAULT_CFP, help=f"CFP release (default {DEFAULT_CFP})")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"detections (default {DEFAULT_CACHE})")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    found = cfp_detections(args.cfp, args.cache, args.workers, args.device)
    for pose in ("frontal", "profile"):
        report(pose, [p for p in found if p.parent.name == pose], found)


if __name__ == "__main__":
    main()
