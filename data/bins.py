"""Verification ``.bin`` files (insightface format): a pickle of ``(bins, issame_list)``, read safely.

``bins`` holds ``2 * P`` encoded images (pair ``i`` is ``bins[2i], bins[2i + 1]``) and ``issame_list`` ``P``
booleans. Published files are Python-2 pickles; a pickle can name any Python callable, so :func:`load_bin`
uses an unpickler that resolves only the few globals such files need (numpy bool arrays and scalars, and
``_codecs.encode`` / ``bytearray`` limited to latin-1 text or bytes, which Python 3 uses for bytes in
protocols 0-2) and refuses all else.
"""
from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path

import numpy as np

from .errors import DataError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar
    from numpy.core.numeric import _frombuffer


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as Python 3 pickles bytes (protocols 0-2): latin-1 only."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _bytearray(data=b"", encoding=None):
    """``bytearray`` as pickled (from bytes, or latin-1 text in protocols 0-2), never from a size."""
    if isinstance(data, str) and encoding is not None:
        return bytearray(_latin1_encode(data, encoding))
    if isinstance(data, bytes) and encoding is None:
        return bytearray(data)
    raise pickle.UnpicklingError(f"refused bytearray({type(data).__name__}, {encoding!r})")


_ALLOWED_GLOBALS = {
    ("builtins", "bytearray"): _bytearray,
    ("__builtin__", "bytearray"): _bytearray,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS[(_module, "_reconstruct")] = _reconstruct
    _ALLOWED_GLOBALS[(_module, "scalar")] = scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED_GLOBALS[(_module, "_frombuffer")] = _frombuffer


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _as_image_bytes(item, index: int, path: Path) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, bytearray):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise DataError(f"{path}: image {index} is {type(item).__name__}, expected encoded image bytes")


def _as_issame(values, path: Path) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)):
        raise DataError(f"{path}: issame_list must be a flat list of bools, got {array.dtype}{array.shape}")
    if array.dtype != np.bool_ and not np.isin(array, (0, 1)).all():
        raise DataError(f"{path}: issame_list holds values other than 0/1")
    return array.astype(bool)


def load_bin(path) -> tuple[list[bytes], np.ndarray]:
    """Read an insightface verification ``.bin``: ``(2P encoded images, P bools)``; runs no pickled code.

    Raises ``FileNotFoundError`` if absent and :class:`DataError` (naming the file) for a pickle that needs
    any other global (e.g. ``os.system``), is not a pickle, or does not hold ``(2P images, P booleans)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification file not found: {path}")
    with open(path, "rb") as f:
        try:
            obj = _SafeUnpickler(f, encoding="bytes").load()
        except _RefusedGlobal as exc:
            raise DataError(f"{path}: refused to unpickle global {exc} (not a verification .bin)") from None
        except Exception as exc:  # truncated, not a pickle, bad opcode ...
            raise DataError(f"{path}: not a verification pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2 or not isinstance(obj[0], (list, tuple)):
        raise DataError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    if not obj[0] and not len(obj[1]):
        raise DataError(f"{path}: holds no pairs (an empty image list and issame_list)")
    images = [_as_image_bytes(item, i, path) for i, item in enumerate(obj[0])]
    issame = _as_issame(obj[1], path)
    if len(images) != 2 * len(issame):
        raise DataError(f"{path}: {len(images)} images for {len(issame)} pairs, expected {2 * len(issame)}")
    return images, issame


def write_bin(path, images, issame) -> None:
    """Write ``(images, issame)`` as insightface does (pickle of a list of bytes and a list of bools).

    ``images``: ``2P`` encoded images (bytes); ``issame``: ``P`` booleans. Written to a temporary file beside
    ``path`` and renamed, so a crash never leaves a partial ``.bin``; an existing file is replaced.
    """
    path = Path(path)
    images = [_as_image_bytes(item, i, path) for i, item in enumerate(images)]
    flags = [bool(x) for x in _as_issame(list(issame), path)]
    if len(images) != 2 * len(flags):
        raise ValueError(f"{path}: {len(images)} images for {len(flags)} pairs, expected {2 * len(flags)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            pickle.dump((images, flags), f, protocol=4)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
