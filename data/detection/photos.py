"""Faces in photo files: which face of a photo to keep, and detection over many photos in worker processes."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..align import align_face
from ..errors import DataError
from ..images import decode_image
from ..workers import map_ordered
from .mtcnn import MTCNN, Face

# "main": the largest face near the centre, i.e. the largest  box area - 2 * (squared distance of the box
# centre from the image centre)  (insightface's rule for picking the subject of a photo); "largest": the
# largest box; "center": the box whose centre is nearest the image centre; "all": every face.
FACE_RULES = ("main", "largest", "center", "all")


def choose_faces(faces: Sequence[Face], height: int, width: int, rule: str = "main") -> list[Face]:
    """The face(s) of a ``height`` x ``width`` photo kept by ``rule`` (see :data:`FACE_RULES`); ``all`` keeps
    every face, left to right; the others keep one (none when ``faces`` is empty)."""
    if rule not in FACE_RULES:
        raise ValueError(f"unknown face rule {rule!r}: expected one of {', '.join(FACE_RULES)}")
    if rule == "all":
        return sorted(faces, key=lambda f: (f.box[0], f.box[1]))
    if not faces:
        return []
    boxes = np.stack([f.box for f in faces])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    offset = ((boxes[:, :2] + boxes[:, 2:]) / 2 - [width / 2, height / 2]) ** 2
    value = {"main": area - 2 * offset.sum(1), "largest": area, "center": -offset.sum(1)}[rule]
    return [faces[int(np.argmax(value))]]


def read_photo(path) -> np.ndarray:
    """A photo file as uint8 RGB (EXIF orientation applied, grayscale to 3 channels, alpha dropped)."""
    try:
        buf = Path(path).read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return decode_image(buf, source=str(path))


@dataclass
class PhotoFaces:
    """One photo's result: the faces kept by the face rule and their aligned ``crops`` (uint8 RGB, when
    asked for), how many faces were ``found`` in all, the photo's ``(height, width)``, and ``error`` (an
    undecodable file's message) when it could not be read."""

    faces: list[Face] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    found: int = 0
    shape: tuple[int, int] = (0, 0)
    error: str | None = None


@dataclass(frozen=True)
class DetectSettings:
    """How :func:`detect_photos` works: face rule, crop side (``None``: no crops), device, smallest face
    searched (pixels), photos per batch."""

    rule: str = "main"
    size: int | None = 112
    device: str = "cpu"
    min_face: float = 20.0
    batch: int = 8


def _detect_batch(detector: MTCNN, paths: Sequence, settings: DetectSettings) -> list[PhotoFaces]:
    photos, results = [], []
    for path in paths:
        try:
            photos.append(read_photo(path))
            results.append(PhotoFaces(shape=photos[-1].shape[:2]))
        except DataError as exc:
            results.append(PhotoFaces(error=str(exc)))
    found, photos = iter(detector.detect(photos)), iter(photos)
    for result in results:
        if result.error is None:
            faces, photo = next(found), next(photos)
            result.found = len(faces)
            result.faces = choose_faces(faces, *result.shape, settings.rule)
            if settings.size is not None:
                result.crops = [align_face(photo, face.landmarks, settings.size) for face in result.faces]
    return results


# The detector of a worker process of detect_photos' pool, built once by the pool's initialiser (each
# worker is a fresh process started for that pool, so this state never outlives or crosses one pool).
_WORKER_DETECTOR: list[MTCNN] = []


def _start_worker(settings: DetectSettings) -> None:
    """Worker initialiser: one torch thread per worker process (the pool spreads over the cores), and the
    worker's detector."""
    torch.set_num_threads(1)
    _WORKER_DETECTOR.append(MTCNN(settings.device, settings.min_face))


def _detect_chunk(task) -> list[PhotoFaces]:
    """Worker task: the worker's detector over one chunk of photos."""
    settings, paths = task
    return _detect_batch(_WORKER_DETECTOR[0], paths, settings)


def detect_photos(paths: Sequence, settings: DetectSettings, workers: int = 1,
                  desc: str = "detect", progress: bool = True):
    """Yield ``(path, PhotoFaces)`` for every photo, in order, detecting in batches of ``settings.batch``.

    ``workers > 1`` spreads the batches over a fork-server pool of one-thread processes, each with its own
    detector; otherwise one detector runs here. Weights errors are raised before any work.
    """
    detector = MTCNN(settings.device, settings.min_face)  # also checks the weights up front
    chunks = [list(paths[i : i + settings.batch]) for i in range(0, len(paths), settings.batch)]
    bar = tqdm(total=len(paths), desc=desc, unit="photo", dynamic_ncols=True, mininterval=1.0,
               disable=not progress)
    with bar:
        if workers <= 1 or len(chunks) < 2:
            results = (_detect_batch(detector, chunk, settings) for chunk in chunks)
            for chunk, found in zip(chunks, results):
                bar.update(len(chunk))
                yield from zip(chunk, found)
            return
        tasks = [(settings, chunk) for chunk in chunks]
        results = map_ordered(_detect_chunk, tasks, workers, progress=False, initializer=_start_worker,
                              initargs=(settings,))
        for chunk, found in zip(chunks, results):
            bar.update(len(chunk))
            yield from zip(chunk, found)


def detect_landmarks(paths: Sequence, settings: DetectSettings, workers: int = 1,
                     desc: str = "detect", progress: bool = True) -> dict:
    """``{path: (5, 2) landmarks of the face kept by settings.rule, or None when no face was found}``.

    One face per photo (``settings.rule`` must not be ``all``); an undecodable photo raises DataError."""
    if settings.rule == "all":
        raise ValueError("detect_landmarks keeps one face per photo: choose a rule other than 'all'")
    found = {}
    for path, result in detect_photos(paths, replace(settings, size=None), workers, desc, progress):
        if result.error is not None:
            raise DataError(result.error)
        found[path] = result.faces[0].landmarks if result.faces else None
    return found
