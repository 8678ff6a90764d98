"""Where the commands write: paths checked before any work, and write errors that name the path."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def check_output(path, option: str, folder: bool = False) -> Path:
    """``path`` (given as ``option``) if a file (or with ``folder`` a folder) can be written there: its
    nearest existing folder must be a folder that takes a new file. ValueError naming both otherwise."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{option} {path}: is a {'file' if folder else 'folder'}, expected a "
                         f"{'folder' if folder else 'file'}")
    place = path if folder else path.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise ValueError(f"{option} {path}: {place} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=place, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot write in {place} ({exc.strerror or exc})") from None
    return path


@contextlib.contextmanager
def writing(path, option: str):
    """Turn an operating-system error raised while writing ``path`` (full disk, permissions) into a
    ValueError naming ``option`` and ``path``; errors raised by our own checks (no errno) pass unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise ValueError(f"{option} {path}: cannot write ({exc.strerror or exc})") from None
