"""Pack an image folder ``<input>/<identity>/<image>`` into insightface RecordIO (train.rec/.idx, property).

Also holds the per-image work shared with :mod:`data.verification_sets`: read a file, crop or align the
face, encode it (:class:`FaceJob`, :func:`encode_face`), and an order-preserving parallel map.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .align import align_face, crop_face, read_landmarks_csv
from .detection.photos import detect_photos, read_photo
from .errors import DataError
from .images import encode_image
from .recordio import IRHeader, MXIndexedRecordIO, pack
from .workers import default_workers, map_ordered, remove_dead_temporaries

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
OUTPUT_NAMES = ("train.rec", "train.idx", "property")


@dataclass(frozen=True)
class FaceJob:
    """One image to turn into a ``size`` x ``size`` face crop.

    ``landmarks`` (N, 2) pixel points aligned onto ``reference`` (N, 2, 112x112 coordinates; default the
    ArcFace template) by :func:`data.align.align_face`; without landmarks the image is cropped to ``box`` =
    (x0, y0, x1, y1) given as fractions of width/height (default: the centred square) and resized.
    """

    path: Path
    size: int = 112
    quality: int = 95
    landmarks: np.ndarray | None = None
    reference: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None


def encode_face(job: FaceJob) -> bytes:
    """Read ``job.path``, crop or align the face and return it JPEG-encoded (BGR order, as insightface)."""
    image = read_photo(job.path)
    if job.landmarks is not None:
        face = align_face(image, job.landmarks, job.size, reference=job.reference)
    else:
        box = None
        if job.box is not None:
            height, width = image.shape[:2]
            box = (job.box[0] * width, job.box[1] * height, job.box[2] * width, job.box[3] * height)
        face = crop_face(image, job.size, box)
    return encode_image(face, quality=job.quality)


def _encode_or_report(job: FaceJob) -> bytes | str:
    """:func:`encode_face`, returning the error message instead of raising for an undecodable image."""
    try:
        return encode_face(job)
    except DataError as exc:
        return str(exc)


def refuse_overwrite(paths: Iterable[Path], force: bool) -> None:
    """Raise ``FileExistsError`` naming the first existing path unless ``force``."""
    if force:
        return
    for path in paths:
        if Path(path).exists():
            raise FileExistsError(f"{path} already exists (pass --force / force=True to overwrite)")


def scan_identities(input_dir: Path) -> list[tuple[str, list[Path]]]:
    """``[(identity, sorted image paths)]`` for ``<input_dir>/<identity>/<image>``, identities sorted by name.

    Identities without images are skipped; an input with no images at all is an error.
    """
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder not found: {input_dir}")
    identities = []
    for folder in sorted(p for p in input_dir.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if images:
            identities.append((folder.name, images))
    if not identities:
        raise ValueError(f"{input_dir}: no images found (expected <identity>/<image>.jpg files)")
    return identities


def pack_folder(input_dir, output_dir, landmarks=None, size: int = 112, quality: int = 95,
                workers: int | None = None, force: bool = False, skip_bad: bool = False, detect=None) -> dict:
    """Pack ``<input_dir>/<identity>/<image>`` into ``output_dir/{train.rec, train.idx, property}``.

    insightface layout: record 0 is a header (flag 2, labels ``[A, B]``); records ``1..A-1`` are the images,
    identities in sorted folder order (images sorted by file name), label = class index; records ``A..B-1``
    are one per identity (flag 2, labels ``[first, end)`` image keys, no image); ``property`` is
    ``num_classes,size,size``.

    ``landmarks``: CSV of ``image,x1,y1,...,x5,y5`` (image path relative to ``input_dir``, header optional);
    faces are then aligned to the ArcFace template. ``detect``: a :class:`data.detection.DetectSettings`:
    the faces are found and aligned by the MTCNN detector instead (``rule`` picks the face; ``all`` packs
    every face of a photo); photos without a face are left out and reported. Without either, the images are
    taken as aligned: the centred square (non-square images lose their longer sides' margins) is resized.
    Images are decoded, aligned and JPEG-encoded (``quality``) in ``workers`` processes, in order.
    An undecodable image is an error naming it, or with ``skip_bad`` it is left out and reported.
    Outputs are written under temporary names and renamed at the end; existing outputs are an error unless
    ``force``. Returns ``{"images", "classes", "skipped": [messages], "output": dir}``.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if size < 1 or not 1 <= quality <= 100:
        raise ValueError(f"size must be positive and quality in 1..100, got size={size}, quality={quality}")
    outputs = [output_dir / name for name in OUTPUT_NAMES]
    refuse_overwrite(outputs, force)
    identities = scan_identities(input_dir)
    if landmarks is not None and detect is not None:
        raise ValueError("give landmarks or detect, not both")
    points = read_landmarks_csv(landmarks) if landmarks is not None else None

    jobs, labels = [], []
    for label, (_, images) in enumerate(identities):
        for image in images:
            key = image.relative_to(input_dir).as_posix()
            if points is not None and key not in points:
                raise ValueError(f"{landmarks}: no landmarks for image {key!r}")
            jobs.append(FaceJob(image, size, quality, None if points is None else points[key]))
            labels.append(label)

    output_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(output_dir, tuple(f".{name}.tmp" for name in OUTPUT_NAMES))  # a killed pack's
    temporary = [output_dir / f".{name}.tmp{os.getpid()}" for name in OUTPUT_NAMES]
    skipped, no_face = [], []

    def encoded_images():
        results = (map_ordered(_encode_or_report, jobs, workers, "pack") if detect is None
                   else _detected_faces([job.path for job in jobs], detect, size, quality, workers, no_face))
        for label, result in zip(labels, results):
            if isinstance(result, str):
                if not skip_bad:
                    raise DataError(f"{result} (use --skip-bad to leave undecodable images out)")
                skipped.append(result)
                continue
            for image in [result] if isinstance(result, bytes) else result:
                yield label, image

    try:
        count = write_identity_records(temporary[0], temporary[1], encoded_images(), len(identities),
                                       names=[name for name, _ in identities], source=str(input_dir))
        temporary[2].write_text(f"{len(identities)},{size},{size}\n")
        for tmp, final in zip(temporary, outputs):
            os.replace(tmp, final)
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
    return {"images": count, "classes": len(identities), "skipped": skipped, "output": output_dir,
            "no_face": no_face}


def _detected_faces(paths, settings, size: int, quality: int, workers: int | None, no_face: list):
    """Per photo: its detected faces aligned and JPEG-encoded (a list, empty and its name appended to
    ``no_face`` when none was found), or an undecodable photo's error message."""
    settings = replace(settings, size=size)
    for path, result in detect_photos(paths, settings, default_workers() if workers is None else workers,
                                      desc="pack"):
        if result.error is None and not result.faces:
            no_face.append(str(path))
        yield result.error or [encode_image(crop, quality=quality) for crop in result.crops]


def write_identity_records(rec_path, idx_path, labelled_images: Iterable[tuple[int, bytes]], num_classes: int,
                           names: Sequence[str] | None = None, source: str = "") -> int:
    """Write ``(label, encoded image)`` pairs, grouped by label in increasing order, as an insightface pack.

    Record 0 is the header (flag 2, labels ``[A, B]``), records ``1..A-1`` the images (scalar label, ``id``
    = key), records ``A..B-1`` one per identity (labels ``[first, end)`` of its image keys, no image).
    Every label in ``0..num_classes-1`` must have an image (an error names the missing ones by ``names``
    and the input by ``source``). Returns the number of images written.
    """
    ranges = {}
    writer = MXIndexedRecordIO(str(idx_path), str(rec_path), "w")
    try:
        # record 0 goes first; its labels [A, B] are known only at the end (images may be skipped), so a
        # placeholder of the same byte length is written now and overwritten in place afterwards.
        writer.write_idx(0, _header_record(0, 0))
        key = 1
        for label, image in labelled_images:
            if label in ranges and ranges[label][1] != key or not 0 <= label < num_classes:
                raise ValueError(f"label {label}: images must come grouped by label, in 0..{num_classes - 1}")
            writer.write_idx(key, pack(IRHeader(0, float(label), key, 0), image))
            ranges[label] = (ranges.get(label, (key,))[0], key + 1)
            key += 1
        if len(ranges) != num_classes:
            empty = [names[i] if names else i for i in range(num_classes) if i not in ranges]
            raise DataError(f"{source or rec_path}: identities left without a decodable image: {empty}")
        first_identity = key
        for label in range(num_classes):
            writer.write_idx(key, _header_record(*ranges[label]))
            key += 1
    finally:
        writer.close()
    _patch_first_record(Path(rec_path), _header_record(0, 0), _header_record(first_identity, key))
    return first_identity - 1


def _header_record(start: int, end: int) -> bytes:
    """Payload of a label-range record (flag 2, labels ``[start, end)``, no image): always 32 bytes."""
    return pack(IRHeader(2, [float(start), float(end)], 0, 0), b"")


def _patch_first_record(rec_path: Path, placeholder: bytes, payload: bytes) -> None:
    """Overwrite the payload of the file's first record (same length) after checking it is ``placeholder``."""
    offset = 8  # after the record's magic word and length word
    with open(rec_path, "r+b") as f:
        f.seek(offset)
        if f.read(len(placeholder)) != placeholder or len(payload) != len(placeholder):
            raise RuntimeError(f"{rec_path}: first record is not the expected header placeholder")
        f.seek(offset)
        f.write(payload)
