"""Verification pairs from the raw LFW and CFP releases, as insightface-style ``.bin`` files or in memory.

LFW (``<root>/<Name>/<Name>_<NNNN>.jpg`` + ``pairs.txt``): 10 folds of same pairs then different pairs, kept
in file order. Faces are aligned from the MTCNN detector's 5 points (the face nearest the centre, the LFW
convention), from given landmarks, or cropped to :data:`LFW_FACE_BOX` (see there); that crop also stands in
for a photo where the detector finds no face (such photos are listed in the summary).

CFP (``Data/Images``, ``Data/Fiducials``, ``Protocol``): for protocol FF / FP, folds ``Split/<P>/01..10``
in order, each its ``same.txt`` pairs then its ``diff.txt`` pairs (first image frontal, second frontal for FF
and profile for FP), images numbered by ``Pair_list_F.txt`` / ``Pair_list_P.txt``. Faces are aligned from
the detector's 5 points (the main face), where it finds none from the release's 30 manual fiducials
(:func:`cfp_alignment_points`), or from the fiducials alone.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .align import ARCFACE_TEMPLATE, read_landmarks_csv
from .bins import write_bin
from .detection.photos import DetectSettings, detect_landmarks
from .errors import DataError
from .pack import FaceJob, encode_face, refuse_overwrite
from .workers import default_workers, map_ordered

# LFW images are a Viola-Jones face box enlarged 2.2x and scaled to 250x250: the box is the central ~114x114.
# In such a box the eyes sit ~0.38 and the mouth ~0.78 of its height from the top and are ~0.38 of its width
# apart: eyes at y ~112, mouth at y ~157, eye distance ~44 (of 250). The 134x134 square from (58, 50), resized
# to 112, puts the eyes at y ~51.8 centred on x = 56 (template 51.6, 56.0), 36.8 apart (template 35.2), the
# mouth 37.6 below them (template 40.7): the ArcFace scale splits the two. An estimate from box proportions,
# not a fit to measured LFW landmarks. Fractions of the image size, so it follows a resized copy of LFW.
LFW_FACE_BOX = (58 / 250, 50 / 250, 192 / 250, 184 / 250)

LFW_DETECT = DetectSettings(rule="center", size=None)  # LFW photos are centred on the named person
CFP_DETECT = DetectSettings(rule="main", size=None)
CFP_ALIGNMENTS = ("detect", "fiducials", "centre")
CFP_PROTOCOLS = {"FF": ("Pair_list_F.txt", "Pair_list_F.txt"), "FP": ("Pair_list_F.txt", "Pair_list_P.txt")}

# CFP fiducials (30 points, one half of the face, the same scheme for frontal and profile images):
# 0-8 jaw line (ear to chin), 9-11 eyebrow, 12-17 eye contour, 18-21 nose bridge down to the tip,
# 22-24 nose base, 25 mouth corner, 26-29 lip midline (upper lip, mouth opening, lower lip, ...).
CFP_EYE = slice(12, 18)
CFP_NOSE_TIP = 21
CFP_MOUTH_CORNER = 25
CFP_MIDLINE = (18, 19, 20, 21, 26, 27, 28, 29)
# Profiles: visible eye centre and visible mouth corner -> midpoints of the template's eyes and mouth corners.
PROFILE_REFERENCE = np.stack([ARCFACE_TEMPLATE[:2].mean(0), ARCFACE_TEMPLATE[3:].mean(0)])


def _reflect(points: np.ndarray, line_points: np.ndarray) -> np.ndarray:
    """Mirror ``points`` across the total-least-squares line through ``line_points``."""
    centre = line_points.mean(axis=0)
    direction = np.linalg.svd(line_points - centre)[2][0]
    offset = points - centre
    along = offset @ direction
    return centre + 2 * np.outer(along, direction) - offset


def cfp_alignment_points(fiducials: np.ndarray, profile: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(landmarks, reference)`` for :func:`data.align.align_face` from one image's 30 CFP fiducials.

    Frontal: the annotated half gives one eye centre (mean of the eye contour), the nose tip and one mouth
    corner; the other eye and corner are mirrored across the facial midline (line fitted to the nose-bridge
    and lip-midline points), giving the usual 5 points for the full ArcFace template.
    Profile: the other half is hidden, so only the visible eye centre and mouth corner are used, mapped to
    the midpoints of the template's eyes and of its mouth corners. The eye-to-mouth-corner segment keeps its
    length and stays vertical under any yaw (over the 2,000 CFP profiles it is 0 +- 15 degrees from
    vertical), so profiles get the frontal scale and upright rotation, with the visible cheek centred; this
    is also where detectors' 5 points put a profile (both eyes and both corners collapse onto the visible
    ones).
    """
    fiducials = np.asarray(fiducials, dtype=np.float64)
    eye = fiducials[CFP_EYE].mean(axis=0)
    corner = fiducials[CFP_MOUTH_CORNER]
    if profile:
        return np.stack([eye, corner]), PROFILE_REFERENCE
    other_eye, other_corner = _reflect(np.stack([eye, corner]), fiducials[list(CFP_MIDLINE)])
    eyes = sorted([eye, other_eye], key=lambda p: p[0])
    corners = sorted([corner, other_corner], key=lambda p: p[0])
    return np.stack([eyes[0], eyes[1], fiducials[CFP_NOSE_TIP], corners[0], corners[1]]), ARCFACE_TEMPLATE


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------- LFW


def read_lfw_pairs(pairs_path) -> tuple[list[tuple[str, int, str, int]], np.ndarray]:
    """Parse an LFW ``pairs.txt``: header ``<folds>\\t<n>``, then per fold n same then n different lines.

    Returns ``([(name1, number1, name2, number2)], issame)`` in file order.
    """
    pairs_path = Path(pairs_path)
    if not pairs_path.is_file():
        raise FileNotFoundError(f"LFW pairs file not found: {pairs_path} (give --pairs / pairs_path)")
    lines = _read_lines(pairs_path)
    try:
        folds, per_fold = (int(v) for v in lines[0].split())
    except (ValueError, IndexError):
        raise DataError(f"{pairs_path}:1: expected the header '<folds><TAB><pairs per fold>'") from None
    if len(lines) - 1 != 2 * folds * per_fold:
        raise DataError(
            f"{pairs_path}: header says {folds} folds x {per_fold} same + {per_fold} different pairs = "
            f"{2 * folds * per_fold} lines, found {len(lines) - 1}"
        )
    pairs, issame = [], []
    for line_no, line in enumerate(lines[1:], start=2):
        same = (line_no - 2) % (2 * per_fold) < per_fold
        fields = line.split()
        try:
            if same and len(fields) == 3:
                pairs.append((fields[0], int(fields[1]), fields[0], int(fields[2])))
            elif not same and len(fields) == 4:
                pairs.append((fields[0], int(fields[1]), fields[2], int(fields[3])))
            else:
                raise ValueError
        except ValueError:
            expected = "name<TAB>i<TAB>j" if same else "name1<TAB>i<TAB>name2<TAB>j"
            raise DataError(f"{pairs_path}:{line_no}: expected '{expected}', got {line!r}") from None
        issame.append(same)
    return pairs, np.array(issame, dtype=bool)


def _lfw_image_root(lfw_dir: Path, name: str) -> Path:
    """The folder holding the ``<Name>/`` folders: ``lfw_dir`` itself or its only subfolder that has them."""
    if (lfw_dir / name).is_dir():
        return lfw_dir
    candidates = [p for p in sorted(lfw_dir.iterdir()) if p.is_dir() and (p / name).is_dir()]
    if len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(f"{lfw_dir}: no folder {name}/ (nor a subfolder holding the LFW person folders)")


def lfw_pairs(lfw_dir, pairs_path=None, size: int = 112, landmarks=None, box=LFW_FACE_BOX, quality: int = 95,
              workers: int | None = None, detect: DetectSettings | None = None
              ) -> tuple[list[bytes], np.ndarray, dict]:
    """Face crops (JPEG bytes, 2 per pair, file order), ``issame`` and how the faces were aligned, for raw
    LFW and its ``pairs.txt``.

    ``landmarks``: CSV ``image,x1,y1,...,x5,y5`` with image paths relative to the folder holding the person
    folders (``Name/Name_0001.jpg``); then faces are aligned to the ArcFace template. Else ``detect``
    (:class:`DetectSettings`) aligns them from the detector's landmarks; photos without a detected face, and
    all photos when ``detect`` is None, are cropped to ``box`` (fractions of the image size, default
    :data:`LFW_FACE_BOX`). The third value counts ``{"landmarks" | "detector" | "crop": images}`` and lists
    the photos where the detector found no face (``"no_face"``).
    """
    lfw_dir = Path(lfw_dir)
    pairs_path = lfw_dir / "pairs.txt" if pairs_path is None else Path(pairs_path)
    pairs, issame = read_lfw_pairs(pairs_path)
    root = _lfw_image_root(lfw_dir, pairs[0][0])
    points = read_landmarks_csv(landmarks) if landmarks is not None else None
    paths = [f"{name}/{name}_{number:04d}.jpg" for a, i, b, j in pairs for name, number in ((a, i), (b, j))]
    keys = list(dict.fromkeys(paths))  # each image processed once
    for key in keys:
        if not (root / key).is_file():
            raise FileNotFoundError(f"LFW image {root / key} (named in {pairs_path}) not found")
        if points is not None and key not in points:
            raise ValueError(f"{landmarks}: no landmarks for image {key!r}")
    source = "landmarks"
    if points is None and detect is not None:
        source, found = "detector", _detect(detect, [root / key for key in keys], workers, "lfw detect")
        points = {key: found[root / key] for key in keys}
    jobs = [FaceJob(root / key, size, quality, points[key], box=None) if points is not None and
            points[key] is not None else FaceJob(root / key, size, quality, box=box) for key in keys]
    encoded = dict(zip(keys, map_ordered(encode_face, jobs, workers, "lfw")))
    no_face = [key for key in keys if points is not None and points[key] is None]
    aligned = {source: len(keys) - len(no_face), "crop": len(no_face), "no_face": no_face} if points else \
        {"crop": len(keys)}
    return [encoded[path] for path in paths], issame, aligned


def _detect(settings: DetectSettings, paths: list[Path], workers: int | None, desc: str) -> dict:
    """:func:`data.detection.detect_landmarks` with this module's worker default."""
    workers = default_workers() if workers is None else workers
    return detect_landmarks(paths, settings, workers, desc)


def make_bin_lfw(lfw_dir, pairs_path=None, output="lfw.bin", size: int = 112, landmarks=None,
                 crop=LFW_FACE_BOX, quality: int = 95, workers: int | None = None,
                 force: bool = False, detect: DetectSettings | None = LFW_DETECT) -> dict:
    """Write raw LFW's pairs as an insightface ``.bin`` (6,000 pairs for the standard ``pairs.txt``).

    See :func:`lfw_pairs` for ``landmarks`` / ``detect`` (default: the face nearest the centre) / ``crop``.
    Refuses to replace ``output`` unless ``force``. Returns a summary (see :func:`describe_pairs`) with
    ``aligned``: how the faces were aligned.
    """
    output = Path(output)
    refuse_overwrite([output], force)
    start = time.perf_counter()
    images, issame, aligned = lfw_pairs(lfw_dir, pairs_path, size, landmarks, crop, quality, workers, detect)
    write_bin(output, images, issame)
    folds = int((issame[1:] & ~issame[:-1]).sum()) + 1  # each fold starts with its same pairs
    return {**describe_pairs(output, issame, folds, size, time.perf_counter() - start), "aligned": aligned}


# ---------------------------------------------------------------------------------------------------- CFP


def _read_pair_list(path: Path) -> dict[int, Path]:
    numbered = {}
    for line_no, line in enumerate(_read_lines(path), start=1):
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise DataError(f"{path}:{line_no}: expected '<number> <image path>', got {line!r}")
        numbered[int(fields[0])] = (path.parent / fields[1]).resolve()
    return numbered


def _read_index_pairs(path: Path, first: dict, second: dict) -> list[tuple[Path, Path]]:
    pairs = []
    for line_no, line in enumerate(_read_lines(path), start=1):
        try:
            i, j = (int(v) for v in line.split(","))
            pairs.append((first[i], second[j]))
        except (ValueError, KeyError):
            message = f"{path}:{line_no}: expected 'i,j' numbered in the pair lists, got {line!r}"
            raise DataError(message) from None
    return pairs


def read_cfp_protocol(cfp_dir, protocol: str, folds=None) -> tuple[list[tuple[Path, Path]], np.ndarray, list]:
    """CFP protocol ``FF`` or ``FP``: ``([(image1, image2)], issame, [(fold, same, diff)])`` in fold order.

    ``folds``: fold numbers to keep (1-based, default all ``Split/<protocol>/NN`` folders).
    """
    protocol = protocol.upper()
    if protocol not in CFP_PROTOCOLS:
        raise ValueError(f"unknown CFP protocol {protocol!r}: expected one of {sorted(CFP_PROTOCOLS)}")
    base = Path(cfp_dir) / "Protocol"
    first, second = (_read_pair_list(base / name) for name in CFP_PROTOCOLS[protocol])
    split = base / "Split" / protocol
    if not split.is_dir():
        raise FileNotFoundError(f"CFP protocol folder not found: {split}")
    fold_dirs = sorted((p for p in split.iterdir() if p.is_dir() and p.name.isdigit()),
                       key=lambda p: int(p.name))
    if folds is not None:
        wanted = {int(f) for f in folds}
        missing = wanted - {int(p.name) for p in fold_dirs}
        if missing:
            raise ValueError(f"{split}: no fold(s) {sorted(missing)}")
        fold_dirs = [p for p in fold_dirs if int(p.name) in wanted]
    pairs, issame, counts = [], [], []
    for fold in fold_dirs:
        same = _read_index_pairs(fold / "same.txt", first, second)
        diff = _read_index_pairs(fold / "diff.txt", first, second)
        pairs += same + diff
        issame += [True] * len(same) + [False] * len(diff)
        counts.append((int(fold.name), len(same), len(diff)))
    return pairs, np.array(issame, dtype=bool), counts


def _cfp_fiducials_path(image: Path) -> Path:
    """``.../Data/Images/<id>/<pose>/NN.jpg`` -> ``.../Data/Fiducials/<id>/<pose>/NN.txt``."""
    parts = image.parts
    if "Images" not in parts:
        raise DataError(f"CFP image path {image} is not under a Data/Images folder")
    i = len(parts) - 1 - parts[::-1].index("Images")
    for folder in ("Fiducials", "Fiducial"):  # the release's Readme says Fiducial, its folder Fiducials
        candidate = Path(*parts[:i], folder, *parts[i + 1:]).with_suffix(".txt")
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"fiducials for {image} not found (expected {candidate})")


def _cfp_job(image: Path, size: int, quality: int, alignment: str, detected=None) -> FaceJob:
    """The job of one CFP image: ``alignment`` "centre" (centred square), "fiducials", or "detect" (the
    ``detected`` landmarks when not None, else the fiducials)."""
    if not image.is_file():
        raise FileNotFoundError(f"CFP image not found: {image}")
    if alignment == "centre":
        return FaceJob(image, size, quality)
    if alignment == "detect" and detected is not None:
        return FaceJob(image, size, quality, np.asarray(detected, dtype=np.float64))
    path = _cfp_fiducials_path(image)
    try:
        fiducials = np.loadtxt(path, delimiter=",", ndmin=2)
    except ValueError as exc:
        raise DataError(f"{path}: unreadable fiducials ({exc})") from None
    if fiducials.shape != (30, 2) or not np.isfinite(fiducials).all():
        raise DataError(f"{path}: expected 30 'x,y' lines, got an array of shape {fiducials.shape}")
    points, reference = cfp_alignment_points(fiducials, profile=image.parent.name.lower() == "profile")
    return FaceJob(image, size, quality, points, reference)


def cfp_pairs(cfp_dir, protocol: str, size: int = 112, alignment: str = "detect", folds=None,
              quality: int = 95, workers: int | None = None, detections: dict | None = None,
              detect: DetectSettings = CFP_DETECT) -> tuple[list[bytes], np.ndarray, list, dict]:
    """Face crops (JPEG bytes, 2 per pair), ``issame``, per-fold counts and how the faces were aligned, for
    one CFP protocol.

    ``alignment``: "detect" (default: the detector's 5 points of the main face, the fiducials where it finds
    no face), "fiducials" (:func:`cfp_alignment_points`) or "centre" (the centred square). ``detections``:
    ``{image path: (5, 2) points or None}`` already found (e.g. cached), used instead of running the
    detector (``detect``) and extended in place with the images it had not. The last value counts, per
    pose, the images aligned by ``{"detector", "fiducials"}``.
    """
    if alignment not in CFP_ALIGNMENTS:
        raise ValueError(f"unknown CFP alignment {alignment!r}: expected one of {', '.join(CFP_ALIGNMENTS)}")
    pairs, issame, counts = read_cfp_protocol(cfp_dir, protocol, folds)
    paths = list(dict.fromkeys(p for pair in pairs for p in pair))
    if alignment == "detect":
        detections = {} if detections is None else detections
        missing = [p for p in paths if p not in detections]
        if missing:
            detections.update(_detect(detect, missing, workers, "cfp detect"))
    found = {p: detections[p] if alignment == "detect" else None for p in paths}
    jobs = [_cfp_job(p, size, quality, alignment, found[p]) for p in paths]
    encoded = dict(zip(paths, map_ordered(encode_face, jobs, workers, f"cfp_{protocol.lower()}")))
    aligned = {}
    for p in paths:
        by = "detector" if found[p] is not None else alignment if alignment != "detect" else "fiducials"
        pose = aligned.setdefault(p.parent.name.lower(), {})
        pose[by] = pose.get(by, 0) + 1
    return [encoded[p] for pair in pairs for p in pair], issame, counts, aligned


def make_bin_cfp(cfp_dir, output_dir, size: int = 112, protocols=("FF", "FP"), alignment: str = "detect",
                 folds=None, quality: int = 95, workers: int | None = None, force: bool = False,
                 detections: dict | None = None, detect: DetectSettings = CFP_DETECT) -> dict:
    """Write ``cfp_ff.bin`` / ``cfp_fp.bin`` (7,000 pairs each for the full release) into ``output_dir``.

    Folds stored contiguously in order, each with its ``same.txt`` pairs then its ``diff.txt`` pairs (the
    layout of insightface's ``cfp_ff.bin`` / ``cfp_fp.bin``: 10 contiguous folds of 350 + 350). See
    :func:`cfp_pairs` for ``alignment``, ``detections`` and ``detect``. Refuses to replace existing files
    unless ``force``. Returns ``{"cfp_ff": summary, ...}`` (:func:`describe_pairs`, with ``aligned``: per
    pose, the images aligned by the detector and by the fiducials).
    """
    output_dir = Path(output_dir)
    outputs = {p.upper(): output_dir / f"cfp_{p.lower()}.bin" for p in protocols}
    refuse_overwrite(outputs.values(), force)
    summaries = {}
    for protocol, output in outputs.items():
        start = time.perf_counter()
        detections = {} if detections is None else detections  # FF and FP share their frontal images
        images, issame, counts, aligned = cfp_pairs(cfp_dir, protocol, size, alignment, folds, quality,
                                                    workers, detections, detect)
        write_bin(output, images, issame)
        summary = describe_pairs(output, issame, len(counts), size, time.perf_counter() - start)
        summary["per_fold"] = [{"fold": f, "same": s, "diff": d} for f, s, d in counts]
        summary["aligned"] = aligned
        summaries[output.stem] = summary
    return summaries


# ---------------------------------------------------------------------------------------------------- both


def describe_pairs(path, issame: np.ndarray, folds: int, size: int, seconds: float) -> dict:
    """Summary of a written pair set: path, pairs, same/different counts, folds, image size, seconds."""
    issame = np.asarray(issame, dtype=bool)
    return {"path": Path(path), "pairs": len(issame), "same": int(issame.sum()), "diff": int((~issame).sum()),
            "folds": folds, "image_size": size, "seconds": round(seconds, 1)}


def load_raw_pairs(path, name: str | None = None, size: int = 112, workers: int | None = None,
                   device="cpu") -> dict:
    """Aligned pairs straight from a raw release folder, without writing a ``.bin``; faces aligned as
    ``make-bin`` does by default (the detector on ``device``, see :func:`lfw_pairs` and :func:`cfp_pairs`).

    LFW (a folder with ``pairs.txt``) -> ``{"lfw": (images, issame)}``; CFP (a folder with
    ``Protocol/Split``) -> ``{"cfp_ff": ..., "cfp_fp": ...}``; ``images`` are JPEG bytes, 2 per pair.
    ``name`` picks one set. Any other layout is a ``ValueError``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"verification folder not found: {path}")
    if (path / "pairs.txt").is_file():
        detect = replace(LFW_DETECT, device=str(device))
        builders = {"lfw": lambda: lfw_pairs(path, size=size, workers=workers, detect=detect)[:2]}
    elif (path / "Protocol" / "Split").is_dir():
        cache, detect = {}, replace(CFP_DETECT, device=str(device))  # FF and FP share their frontal images
        build = lambda p: cfp_pairs(path, p, size, workers=workers, detections=cache, detect=detect)[:2]
        builders = {f"cfp_{p.lower()}": (lambda p=p: build(p)) for p in CFP_PROTOCOLS}
    else:
        raise ValueError(
            f"{path}: not a raw LFW folder (pairs.txt + <Name>/<Name>_NNNN.jpg) nor a raw CFP folder "
            "(Protocol/Split, Protocol/Pair_list_F.txt, Data/Images)"
        )
    if name is not None:
        if name not in builders:
            raise ValueError(f"{path}: no set {name!r} here; available: {sorted(builders)}")
        builders = {name: builders[name]}
    return {key: build() for key, build in builders.items()}

