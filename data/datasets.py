"""Face identity datasets: packed RecordIO (``train.rec``/``train.idx``/``property``) and image folders.

Items are ``(float tensor (3, S, S) normalised as (x/255-0.5)/0.5, int label)``, horizontally flipped at
random when ``train`` and jittered by ``augment`` (a :class:`data.augment.Augment`) when given; the
tensor is a channels-last strided view (one pass over the pixels; a DataLoader's collate stacks items
into a contiguous NCHW batch). The flip and the augmentation draw from a generator seeded per process
from ``torch.initial_seed()``, which a DataLoader sets per worker from its own seed, so loading is
reproducible. Files are opened lazily in the process that reads them (each DataLoader worker has its
own handle) and datasets pickle without open handles.
"""
from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .errors import DataError
from .images import decode_image, normalised_view
from .recordio import MXIndexedRecordIO, MXRecordIO, scan_image_headers, unpack

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class _FaceDataset(Dataset):
    """Shared item path: subclasses set ``labels``, ``num_classes`` and implement ``_encoded(index)``."""

    labels: np.ndarray
    num_classes: int

    def __init__(self, input_size=None, train=True, augment=None):
        self.input_size = input_size
        self.train = train
        self.augment = augment or None
        self._pid = None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        if self._pid != os.getpid():
            self._open()
        buf, describe = self._encoded(index)
        try:
            image = decode_image(buf, self.input_size)
        except DataError:
            raise DataError(f"{describe()}: image does not decode ({len(buf)} bytes)") from None
        if self.train and self._generator.random() < 0.5:
            image = cv2.flip(image, 1)
        if self.augment is not None:
            image = self.augment(image, self._generator)
        return normalised_view(image), int(self.labels[index])

    def _open(self):
        """Per-process state: the flip and augmentation generator (and file handles in subclasses)."""
        self._generator = np.random.default_rng(torch.initial_seed())
        self._pid = os.getpid()

    def _encoded(self, index):
        """Return (encoded image bytes, callable describing the item for error messages)."""
        raise NotImplementedError

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("_generator", "_records")}
        state["_pid"] = None
        return state


class FaceRecordDataset(_FaceDataset):
    """Images of an MXNet RecordIO pack, in any of the layouts found in the wild.

    ``path`` is a directory holding ``train.rec`` (+ ``train.idx``, ``property``) or a ``.rec`` file (its
    ``.idx`` next to it). Layouts: insightface (record 0 is a header with labels [A, B]: images are keys
    1..A-1 and identity records A..B-1), or every indexed record is an image (im2rec: keys from 0 or 1,
    possibly shuffled). The label is the header's scalar label or the first value of its label array;
    ``num_classes`` is the identity-record count (insightface) or max label + 1, checked against
    ``property`` (``num_classes,H,W``) when present. Labels outside 0..num_classes-1 raise DataError.
    Attributes: ``labels`` (int64 per item), ``keys`` (record key per item), ``num_classes``, ``layout``
    ("insightface" or "records"). A missing ``.idx`` is rebuilt in memory with keys in file order, which
    recovers insightface's layout only when record 0 is the first record of the file."""

    def __init__(self, path, input_size=None, train=True, augment=None):
        super().__init__(input_size, train, augment)
        self.path, idx_path, property_path = _record_paths(path)
        with MXIndexedRecordIO(idx_path, self.path, "r") as records:
            if not records.keys:
                raise DataError(f"{self.path}: unknown layout: the index {idx_path} lists no records")
            self.layout, keys, identities = self._detect_layout(records, idx_path)
            offsets = np.array([records.idx[k] for k in keys], dtype=np.int64)
            labels, sizes = scan_image_headers(records, offsets, keys)
        self.keys = np.asarray(keys, dtype=np.int64)
        self._offsets = offsets
        empty = np.flatnonzero(sizes == 0)
        if len(empty):
            raise DataError(f"{self.path}: unknown layout: record key {self.keys[empty[0]]} holds no image "
                            f"({len(empty)} such records); expected insightface's layout (record 0 a header "
                            "with labels [A, B]) or image records only")
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if len(bad):
            raise DataError(f"{self.path}: record key {self.keys[bad[0]]}: label {labels[bad[0]]} is not an "
                            "integer class index")
        self.labels = labels.astype(np.int64)
        if identities is not None:
            self.num_classes, origin = identities, "identity records in header record 0"
        else:
            self.num_classes, origin = int(self.labels.max()) + 1, "max label + 1"
        declared = _read_property(property_path)
        if declared is not None and declared != self.num_classes:
            raise DataError(f"{self.path}: {property_path} declares {declared} classes but the records give "
                            f"{self.num_classes} ({origin})")
        out = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
        if len(out):
            raise DataError(f"{self.path}: record key {self.keys[out[0]]}: label {self.labels[out[0]]} is "
                            f"outside 0..{self.num_classes - 1} ({self.num_classes} classes from {origin})")

    def _detect_layout(self, records, idx_path):
        """Return (layout name, image keys, identity count or None)."""
        if 0 in records.idx:
            header, payload = _unpack(records, 0)
            if header.flag >= 2 and not payload:
                start, end = (float(v) for v in header.label[:2])
                if not (start.is_integer() and end.is_integer() and 1 <= start <= end):
                    raise DataError(f"{self.path}: unknown layout: header record 0 has labels "
                                    f"[{start}, {end}], expected integers 1 <= A <= B")
                start, end = int(start), int(end)
                missing = next((k for k in range(1, end) if k not in records.idx), None)
                if missing is not None:
                    raise DataError(f"{self.path}: unknown layout: header record 0 announces images "
                                    f"1..{start - 1} and identities {start}..{end - 1} but key {missing} "
                                    f"is not in {idx_path}")
                return "insightface", list(range(1, start)), end - start
        return "records", list(records.keys), None

    def _open(self):
        super()._open()
        self._records = MXRecordIO(self.path, "r")

    def _encoded(self, index):
        offset, key = int(self._offsets[index]), int(self.keys[index])
        record = self._records.read_at(offset, key=key)
        (flag,) = struct.unpack_from("<I", record)
        return memoryview(record)[24 + 4 * flag:], lambda: f"{self.path}: record key {key} at offset {offset}"


class FaceFolderDataset(_FaceDataset):
    """Images in ``<root>/<identity>/<image>``; identities sorted by name get labels 0..n-1.

    Image extensions: jpg, jpeg, png, bmp (any case). Identity folders without images are skipped.
    Every file is checked up front (:func:`readable_image`: a JPEG/PNG/BMP that is complete); unreadable
    ones raise DataError listing them, or with ``skip_bad`` are left out (``skipped`` lists them)."""

    def __init__(self, root, input_size=None, train=True, augment=None, skip_bad=False):
        super().__init__(input_size, train, augment)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files, labels, self.identities, self.skipped = [], [], [], []
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for folder in tqdm(folders, desc="checking images", unit="id", file=sys.stderr, mininterval=1.0,
                           leave=False):
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            bad = [p for p in images if not readable_image(p)]
            images = sorted(set(images) - set(bad))
            self.skipped += bad
            if not images:
                print(f"{folder}: no images, identity skipped", file=sys.stderr)
                continue
            labels += [len(self.identities)] * len(images)
            self.identities.append(folder.name)
            self.files += images
        if self.skipped:
            listed = ", ".join(str(p.relative_to(self.root)) for p in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            if not skip_bad:
                raise DataError(f"{self.root}: {len(self.skipped)} unreadable images (empty, truncated or "
                                f"not JPEG/PNG/BMP): {listed}{more}; set data.bad_images=skip to train "
                                "without them")
            print(f"{self.root}: skipped {len(self.skipped)} unreadable images: {listed}{more}",
                  file=sys.stderr)
        if not self.files:
            raise DataError(f"{self.root}: no images found; expected <root>/<identity>/<image> with "
                            f"extensions {', '.join(IMAGE_EXTENSIONS)}")
        self.labels = np.array(labels, dtype=np.int64)
        self.num_classes = len(self.identities)

    def _encoded(self, index):
        path = self.files[index]
        return path.read_bytes(), lambda: str(path)


def readable_image(path: Path) -> bool:
    """Whether ``path`` holds a complete JPEG, PNG or BMP, from its first and last bytes (no decoding):
    a JPEG's end-of-image marker, a PNG's IEND chunk, a BMP's declared size."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1024))
        tail = f.read()
    if head.startswith(b"\xff\xd8"):  # 0xFFD9 (end of image) never occurs in entropy-coded data
        return b"\xff\xd9" in tail or b"\xff\xd9" in path.read_bytes()  # (data may follow the image)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" in tail[-16:]
    if head.startswith(b"BM") and size >= 6:
        return struct.unpack_from("<I", head, 2)[0] <= size
    return False


def _record_paths(path):
    """(rec, idx, property) paths for a pack directory or a ``.rec`` file."""
    path = Path(path)
    rec = path / "train.rec" if path.is_dir() else path
    if not rec.is_file():
        raise FileNotFoundError(f"record file {rec} does not exist (expected a .rec file or a directory "
                                "holding train.rec)")
    return str(rec), str(rec.with_suffix(".idx")), str(rec.parent / "property")


def _read_property(path):
    """num_classes from a ``num_classes,H,W`` property file, or None when there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    fields = text.split(",")
    try:
        return int(fields[0])
    except ValueError:
        raise DataError(f"{path}: expected 'num_classes,height,width', got {text[:80]!r}") from None


def _unpack(records, key):
    try:
        return unpack(records.read_idx(key))
    except DataError as error:
        if str(error).startswith(records.uri):
            raise
        raise DataError(f"{records.uri}: record key {key}: {error}") from None
