"""``photos/`` -> ``aligned/``: detect, choose and align the faces of a folder of photos, resumably.

The output mirrors the input's sub-folders (identity folders are kept). Each aligned face is written under
the photo's name (``--face all``: ``<name>_<i>`` for the i-th face from the left). Progress is recorded as
it goes in the landmarks CSV (one ``image,x1,y1,...,x5,y5`` row per face, ``image`` relative to the input:
the format ``pack --landmarks`` reads; ``--face all`` adds ``#<i>`` to the name) and in ``skipped.txt``
(photos without a face or undecodable, with the reason); a second run redoes none of the photos named there.
"""
from __future__ import annotations

import csv
from pathlib import Path

from .detection.photos import DetectSettings, detect_photos
from .images import encode_image
from .pack import IMAGE_EXTENSIONS
from .workers import default_workers

SKIPPED_NAME = "skipped.txt"


def list_photos(input_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under ``input_dir`` (any depth, sorted), leaving out those under ``exclude``."""
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder not found: {input_dir}")
    photos = [p for p in sorted(input_dir.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
              and not (exclude is not None and exclude in p.resolve().parents)]
    if not photos:
        raise ValueError(f"{input_dir}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    return photos


def _done(landmarks_out: Path, skipped_path: Path) -> set[str]:
    """Photos (relative names) already recorded in the landmarks CSV or the skipped list."""
    done = set()
    if landmarks_out.is_file():
        with open(landmarks_out, newline="") as f:
            done.update(row[0].split("#")[0] for row in csv.reader(f) if row and row[0] != "image")
    if skipped_path.is_file():
        done.update(line.split("\t")[0] for line in skipped_path.read_text().splitlines() if line)
    return done


def crop_name(relative: str, index: int | None) -> str:
    """Output name of a photo's aligned face: the photo's own, or ``<stem>_<index><suffix>`` for ``all``."""
    path = Path(relative)
    return relative if index is None else path.with_name(f"{path.stem}_{index}{path.suffix}").as_posix()


def align_folder(input_dir, output_dir, settings: DetectSettings | None = None, landmarks_out=None,
                 quality: int = 95, workers: int | None = None, progress: bool = True) -> dict:
    """Align every face photo under ``input_dir`` into ``output_dir`` (see the module docstring) with the
    detector's ``settings`` (default :class:`DetectSettings`: the main face, 112x112).

    ``landmarks_out`` defaults to ``output_dir/landmarks.csv``. Returns a summary: ``photos`` (in the
    input), ``resumed`` (already done before), ``aligned`` (photos with a face), ``faces`` (crops written),
    ``multi_face`` (photos in which more than one face was found), ``no_face`` and ``undecodable`` (lists of
    ``(photo, reason)``).
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    settings = DetectSettings() if settings is None else settings
    if settings.size is None or settings.size < 1:
        raise ValueError(f"crop size must be a positive integer, got {settings.size}")
    landmarks_out = output_dir / "landmarks.csv" if landmarks_out is None else Path(landmarks_out)
    skipped_path = output_dir / SKIPPED_NAME
    photos = list_photos(input_dir, exclude=output_dir.resolve() if output_dir.exists() else None)
    done = _done(landmarks_out, skipped_path)
    todo = [p for p in photos if p.relative_to(input_dir).as_posix() not in done]
    summary = {"photos": len(photos), "resumed": len(photos) - len(todo), "aligned": 0, "faces": 0,
               "multi_face": 0, "no_face": [], "undecodable": []}
    output_dir.mkdir(parents=True, exist_ok=True)
    landmarks_out.parent.mkdir(parents=True, exist_ok=True)
    new_csv = not landmarks_out.is_file() or landmarks_out.stat().st_size == 0
    workers = default_workers() if workers is None else workers
    with open(landmarks_out, "a", newline="") as marks, open(skipped_path, "a") as skipped:
        writer = csv.writer(marks)
        if new_csv:
            writer.writerow(["image"] + [f"{a}{i}" for i in range(1, 6) for a in "xy"])
        for path, result in detect_photos(todo, settings, workers, desc="align", progress=progress):
            relative = path.relative_to(input_dir).as_posix()
            summary["multi_face"] += result.found > 1
            if result.error is not None or not result.faces:
                reason = result.error or "no face found"
                summary["undecodable" if result.error else "no_face"].append((relative, reason))
                skipped.write(f"{relative}\t{reason}\n")
                skipped.flush()
                continue
            indexed = settings.rule == "all"
            for i, (face, crop) in enumerate(zip(result.faces, result.crops)):
                target = output_dir / crop_name(relative, i if indexed else None)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(encode_image(crop, quality, target.suffix.lower()))
                key = f"{relative}#{i}" if indexed else relative
                writer.writerow([key, *(f"{v:.2f}" for v in face.landmarks.ravel())])
            marks.flush()  # the row is written after its crops: a photo in the CSV is complete
            summary["aligned"] += 1
            summary["faces"] += len(result.faces)
    return summary
