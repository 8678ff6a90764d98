"""Export embeddings of an image collection (.npz/.npy) and the backbone itself (ONNX)."""
from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data import encode_image, load_bin
from data.detection import detect_photos
from data.recordio import MXIndexedRecordIO, unpack
from eval.verification import l2_normalize

from .embedding import embed_images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PREPROCESSING = {
    "color": "RGB",
    "layout": "NCHW",
    "normalize": "(x / 255 - 0.5) / 0.5",
    "resize": "to input_size x input_size: cv2 INTER_AREA when shrinking, INTER_LINEAR when enlarging",
    "flip_sum": "verification embeds the image and its horizontal flip and sums the two outputs, "
                "then L2-normalises",
    "output": "embedding, not normalised",
}


@dataclass
class ImageSet:
    """Encoded images to embed, what identifies them (``labels`` and/or ``paths``) and further arrays to
    save with the embeddings (``issame`` for a ``.bin``)."""

    images: Sequence[bytes]
    labels: np.ndarray | None = None
    paths: list[str] | None = None
    extra: dict = field(default_factory=dict)


class _FileBytes:
    """Lazy sequence of file contents (read when indexed, so big folders are not held in memory)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.paths[i].read_bytes()


class _RecordImages:
    """Lazy sequence of the encoded images of an insightface ``train.rec``; fills ``labels`` as it reads."""

    def __init__(self, rec: Path):
        self.rec = MXIndexedRecordIO(str(rec.with_suffix(".idx")), str(rec), "r")
        header = unpack(self.rec.read_idx(0))[0] if 0 in self.rec.idx else None
        # insightface: record 0 is a header whose label [first, end) gives the image keys 1..first-1
        indexed = header is not None and header.flag > 0
        self.keys = list(range(1, int(header.label[0]))) if indexed else list(self.rec.keys)
        self.labels = np.full(len(self.keys), -1, dtype=np.int64)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        header, payload = unpack(self.rec.read_idx(self.keys[i]))
        self.labels[i] = int(np.atleast_1d(header.label)[0])
        return payload


def _folder(root: Path) -> ImageSet:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    paths = [str(p.relative_to(root)) for p in files]
    labels = None
    if all(len(p.relative_to(root).parts) == 2 for p in files):  # <root>/<identity>/<image>
        identities = sorted({p.parent.name for p in files})
        index = {name: i for i, name in enumerate(identities)}
        labels = np.array([index[p.parent.name] for p in files], dtype=np.int64)
    return ImageSet(_FileBytes(files), labels, paths)


def _list_file(path: Path) -> ImageSet:
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
            raise ValueError(f"{path}: line {lineno}: expected 'IMAGE_PATH [INTEGER_LABEL]', got {line!r}")
        entries.append((fields[0], int(fields[1]) if len(fields) == 2 else None, lineno))
    if not entries:
        raise ValueError(f"{path}: no image paths listed")
    has_label = [label is not None for _, label, _ in entries]
    if any(has_label) and not all(has_label):
        lineno = entries[has_label.index(not has_label[0])][2]
        raise ValueError(f"{path}: line {lineno}: some lines have a label and others not")
    files = [(path.parent / p) for p, _, _ in entries]
    for (_, _, lineno), file in zip(entries, files):
        if not file.is_file():
            raise FileNotFoundError(f"{path}: line {lineno}: image not found: {file}")
    labels = np.array([label for _, label, _ in entries], dtype=np.int64) if all(has_label) else None
    return ImageSet(_FileBytes(files), labels, [p for p, _, _ in entries])


def read_image_set(path) -> ImageSet:
    """Images from an image folder, a ``.rec`` (file or directory holding ``train.rec``), a verification
    ``.bin`` or a list file (one image path per line, optional integer label; relative to the list file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_dir() and (path / "train.rec").is_file():
        path = path / "train.rec"
    if path.is_dir():
        return _folder(path)
    if path.suffix == ".rec":
        records = _RecordImages(path)
        return ImageSet(records, records.labels)
    if path.suffix == ".bin":
        images, issame = load_bin(path)
        return ImageSet(images, extra={"issame": issame})
    return _list_file(path)


def detect_image_set(image_set: ImageSet, settings, workers: int = 1) -> ImageSet:
    """The faces of an image folder's or list file's photos, detected and aligned (``settings``: a
    :class:`data.detection.DetectSettings`); each kept face is an image (``--face all``: ``path#i``).
    Photos without a face are left out and listed in ``extra["no_face"]``."""
    if not isinstance(image_set.images, _FileBytes):
        raise ValueError("face detection applies to photos (an image folder or a list file), not to the "
                         "aligned faces of a .rec or .bin")
    images, labels, paths, no_face = [], [], [], []
    results = detect_photos(image_set.images.paths, settings, workers, desc="detect", progress=True)
    for i, (_, result) in enumerate(results):
        if result.error is not None:
            raise ValueError(result.error)
        if not result.faces:
            no_face.append(image_set.paths[i])
        for k, crop in enumerate(result.crops):
            images.append(encode_image(crop, ext=".png"))
            paths.append(f"{image_set.paths[i]}#{k}" if settings.rule == "all" else image_set.paths[i])
            labels.append(-1 if image_set.labels is None else image_set.labels[i])
    if not images:
        raise ValueError(f"no face found in any of the {len(image_set.paths)} photos")
    return ImageSet(images, None if image_set.labels is None else np.array(labels, dtype=np.int64), paths,
                    {**image_set.extra, "no_face": np.array(no_face, dtype=str)})


def export_embeddings(model, input_path, output_path, input_size: int, batch_size: int = 64,
                      flip: bool = True, device="cpu", progress: bool = True, detect=None,
                      detect_workers: int = 1) -> dict:
    """Embed every image of ``input_path`` and save them to ``output_path``.

    ``.npz``: ``embeddings`` (float32, L2-normalised), ``norms`` (L2 norm of each embedding before
    normalisation, so ``embeddings * norms[:, None]`` is the raw, flip-summed output), then ``labels``
    and/or ``paths`` when the input has them (``issame`` for a ``.bin``). ``.npy``: the embeddings only.
    ``detect`` (a :class:`data.detection.DetectSettings`): the input holds photos, whose faces are detected
    and aligned first (:func:`detect_image_set`, ``detect_workers`` processes). Returns the saved arrays.
    """
    output_path = Path(output_path)
    if output_path.suffix not in (".npz", ".npy"):
        raise ValueError(f"output must end in .npz or .npy, got {output_path}")
    image_set = read_image_set(input_path)
    if detect is not None:
        image_set = detect_image_set(image_set, detect, detect_workers)
    raw = embed_images(model, image_set.images, input_size, batch_size=batch_size, flip=flip, device=device,
                       progress=progress)
    arrays = {"embeddings": l2_normalize(raw).astype(np.float32),
              "norms": np.linalg.norm(raw.astype(np.float64), axis=1).astype(np.float32)}
    if image_set.labels is not None:
        arrays["labels"] = image_set.labels
    if image_set.paths is not None:
        arrays["paths"] = np.array(image_set.paths)
    arrays.update(image_set.extra)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if output_path.suffix == ".npy":
        np.save(output_path, arrays["embeddings"])
    else:
        np.savez(output_path, **arrays)
    return arrays


def export_onnx(model, path, input_size: int, model_config: dict | None = None, opset: int = 17) -> float:
    """Save ``model`` (eval mode, CPU) as ONNX with a dynamic batch axis: input ``input`` (N, 3, S, S) ->
    ``embedding`` (N, D); the preprocessing and the model config go into the metadata properties.

    The file is checked with ONNX Runtime against PyTorch on a random batch of 3; returns the largest
    absolute difference of the embeddings.
    """
    import onnx
    import onnxruntime

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()  # the caller's model stays where it is
    # keep_initializers_as_inputs avoids the legacy exporter's initializer de-duplication, which leaves
    # dangling node inputs when several parameters are equal (e.g. untrained SN mixture weights); the
    # weights are then moved back out of the graph inputs below.
    batch_axis = {"input": {0: "batch"}, "embedding": {0: "batch"}}
    torch.onnx.export(model, (torch.zeros(2, 3, input_size, input_size),), str(path), input_names=["input"],
                      output_names=["embedding"], dynamic_axes=batch_axis, opset_version=opset,
                      keep_initializers_as_inputs=True, dynamo=False)
    proto = onnx.load(str(path))
    weights = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    metadata = {**PREPROCESSING, "input_size": str(input_size), "model": json.dumps(model_config or {})}
    for key, value in metadata.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))

    x = torch.randn(3, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = model(x).numpy()
    return float(np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max())
