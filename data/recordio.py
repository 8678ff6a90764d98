"""Native MXNet RecordIO: the ``.rec`` container, the ``.idx`` index and the image-record header.

No mxnet needed. Names and behaviour follow ``mxnet.recordio`` (1.x) so scripts port by changing one import,
and files written here are byte-identical to those written by mxnet (dmlc-core's writer):

* record: uint32 magic ``0xCED7230A``, uint32 ``lrecord = cflag << 29 | length``, payload, zero padding to a
  multiple of 4 bytes; little-endian; ``length < 2**29``.
* a payload holding the magic word at a 4-byte-aligned offset is written as several parts split there
  (cflag 1 first, 2 middle, 3 last) without that word; reading puts the word back between the parts.
* ``.idx``: text lines ``key<TAB>byte_offset``.
* image record payload: header ``<IfQQ`` (flag, label, id, id2); flag k > 0 means the label field is 0 and k
  float32 labels follow the header; then the encoded image.

Reading memory-maps the ``.rec``; a missing ``.idx`` is rebuilt in memory by scanning the ``.rec`` (keys are
the record numbers in file order, as insightface writes them); nothing on disk is ever modified by a reader.
Malformed input raises :class:`data.errors.DataError` naming the file and the key or byte offset.
"""
from __future__ import annotations

import mmap
import numbers
import os
import struct
import sys
from collections import namedtuple

import cv2
import numpy as np
from tqdm import tqdm

from .errors import DataError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PREFIX = struct.Struct("<II")
_MAX_LENGTH = 1 << 29
_LENGTH_MASK = _MAX_LENGTH - 1

IRHeader = namedtuple("HEADER", ["flag", "label", "id", "id2"])
"""Image-record header: ``flag`` (number of float32 labels after the header, 0 for a scalar label),
``label`` (float, or np.ndarray when flag > 0), ``id`` and ``id2`` (uint64)."""

_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)


def _padded(length):
    return (length + 3) & ~3


class MXRecordIO:
    """Sequential RecordIO reader (flag "r") or writer (flag "w"), like ``mxnet.recordio.MXRecordIO``."""

    def __init__(self, uri, flag):
        self.uri = os.fspath(uri)
        self.flag = flag
        self.is_open = False
        self.writable = flag == "w"
        self.pid = None
        self.open()

    def open(self):
        """Open the file: 'w' creates or truncates it, 'r' memory-maps it."""
        if self.flag == "w":
            self._file = open(self.uri, "wb")  # noqa: SIM115 (closed by close())
        elif self.flag == "r":
            with open(self.uri, "rb") as f:
                self._size = os.fstat(f.fileno()).st_size
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self._size else b""
            self._pos = 0
        else:
            raise ValueError(f"invalid flag {self.flag!r} for {self.uri}: expected 'r' or 'w'")
        self.pid = os.getpid()
        self.is_open = True

    def close(self):
        """Close the file (flushing a writer)."""
        if not self.is_open:
            return
        if self.writable:
            self._file.close()
        elif isinstance(self._buf, mmap.mmap):
            self._buf.close()
        self.is_open = False
        self.pid = None

    def reset(self):
        """Go back to the first record (a writer truncates the file, as mxnet does)."""
        self.close()
        self.open()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "is_open", False):
            self.close()

    def __getstate__(self):
        if self.writable and self.is_open:
            raise TypeError(f"cannot pickle {type(self).__name__} open for writing {self.uri}")
        state = {k: v for k, v in self.__dict__.items() if k not in ("_buf", "_file")}
        state["pid"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.is_open:
            pos = self._pos
            self.open()
            self._pos = pos

    def tell(self):
        """Byte offset of the next record to be written or read."""
        self._require_open()
        return self._file.tell() if self.writable else self._pos

    def write(self, buf):
        """Append one record (bytes-like), splitting it where the magic word sits at an aligned offset."""
        self._require_open()
        if not self.writable:
            raise ValueError(f"{self.uri} is opened for reading, not writing")
        if self.pid != os.getpid():
            raise RuntimeError(f"writer of {self.uri} used from another process than the one that opened it")
        size = len(buf) if isinstance(buf, bytes) else memoryview(buf).nbytes
        if size >= _MAX_LENGTH:
            raise ValueError(f"record of {size} bytes for {self.uri}: RecordIO records must be < 2**29 bytes")
        data = buf if isinstance(buf, bytes) else bytes(buf)
        write = self._file.write
        start = 0
        hit = data.find(_MAGIC_BYTES)
        while hit != -1:
            if hit % 4:
                hit = data.find(_MAGIC_BYTES, hit + 1)
                continue
            write(_PREFIX.pack(MAGIC, (1 if start == 0 else 2) << 29 | (hit - start)))
            write(data[start:hit])
            start = hit + 4
            hit = data.find(_MAGIC_BYTES, start)
        write(_PREFIX.pack(MAGIC, (3 if start else 0) << 29 | (size - start)))
        write(data[start:] if start else data)
        if size % 4:
            write(bytes(4 - size % 4))

    def read(self):
        """Return the next record as bytes, or None at the end of the file."""
        record, self._pos = self._read_record(self._pos)
        return record

    def read_at(self, offset, key=None):
        """Return the record starting at byte ``offset`` and leave the read position after it.

        ``key`` (optional) is only used to name the record in error messages."""
        self._check_offset(offset, key)
        record, self._pos = self._read_record(offset, key)
        return record

    def _require_open(self):
        if not self.is_open:
            raise ValueError(f"{self.uri} is closed")

    def _check_offset(self, offset, key=None):
        self._require_open()
        if self.writable:
            raise ValueError(f"{self.uri} is opened for writing, not reading")
        if not 0 <= offset < self._size:
            where = f"key {key}: " if key is not None else ""
            raise DataError(f"{self.uri}: {where}offset {offset} is past the end of the file "
                            f"({self._size} bytes); the index does not belong to this file or the file "
                            "is truncated")

    def _error(self, pos, key, what):
        where = f"record key {key} at offset {pos}" if key is not None else f"record at offset {pos}"
        return DataError(f"{self.uri}: {where}: {what}")

    def _read_record(self, pos, key=None):
        """Read the (possibly multi-part) record at ``pos``; return (bytes or None at EOF, next offset)."""
        self._require_open()
        if self.writable:
            raise ValueError(f"{self.uri} is opened for writing, not reading")
        buf, size = self._buf, self._size
        if pos >= size:
            return None, pos
        if pos + 8 <= size:  # fast path: a whole (cflag 0) record; anything else is checked by _spans
            magic, lrec = _PREFIX.unpack_from(buf, pos)
            end = pos + 8 + lrec
            if magic == MAGIC and lrec < _MAX_LENGTH and end + (-lrec & 3) <= size:
                return buf[pos + 8:end], end + (-lrec & 3)
        spans, nxt = self._spans(pos, key)
        if len(spans) == 1:
            start, end = spans[0]
            return buf[start:end], nxt
        return _MAGIC_BYTES.join([buf[start:end] for start, end in spans]), nxt

    def _spans(self, pos, key=None):
        """Check the record at ``pos``; return (payload (start, end) of each of its parts, next offset)."""
        buf, size, first = self._buf, self._size, pos
        spans = []
        while True:
            if pos + 8 > size:
                raise self._error(first, key, f"truncated: record header at offset {pos} needs 8 bytes, "
                                              f"{size - pos} left")
            magic, lrec = _PREFIX.unpack_from(buf, pos)
            if magic != MAGIC:
                raise self._error(first, key, f"bad magic 0x{magic:08X} at offset {pos} "
                                              f"(expected 0x{MAGIC:08X}); not a RecordIO file or a wrong "
                                              "index offset")
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if cflag not in ((2, 3) if spans else (0, 1)):
                expected = "a continuation part (2 or 3)" if spans else "a record start (0 or 1)"
                raise self._error(first, key, f"invalid continuation flag {cflag} at offset {pos}, "
                                              f"expected {expected}")
            start = pos + 8
            pos = start + _padded(length)
            if pos > size:
                raise self._error(first, key, f"truncated: payload of {length} bytes at offset {start} "
                                              f"but only {size - start} bytes left")
            spans.append((start, start + length))
            if cflag in (0, 3):
                return spans, pos

    def _scan_offsets(self, desc):
        """Byte offsets of all records in file order (a multi-part record counts once)."""
        offsets = []
        pos = 0
        with tqdm(total=self._size, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                  mininterval=1.0) as bar:
            while pos < self._size:
                offsets.append(pos)
                nxt = self._spans(pos)[1]
                bar.update(nxt - pos)
                pos = nxt
        return offsets


class MXIndexedRecordIO(MXRecordIO):
    """RecordIO with random access through a ``key<TAB>offset`` index, like mxnet's ``MXIndexedRecordIO``.

    Reading with a missing ``idx_path`` rebuilds the index in memory by scanning ``uri`` (keys 0..N-1 in file
    order, the insightface convention); the index is not written anywhere."""

    def __init__(self, idx_path, uri, flag, key_type=int):
        self.idx_path = os.fspath(idx_path)
        self.key_type = key_type
        self.idx = {}
        self.keys = []
        self._fidx = None
        super().__init__(uri, flag)

    def open(self):
        super().open()
        if self.writable:
            self.idx, self.keys = {}, []
            self._fidx = open(self.idx_path, "w")  # noqa: SIM115 (closed by close())
        elif os.path.exists(self.idx_path):
            self.keys, offsets = read_index(self.idx_path, self.key_type)
            self.idx = dict(zip(self.keys, offsets))
        else:
            print(f"{self.idx_path} not found: rebuilding the index by scanning {self.uri} "
                  "(kept in memory, nothing is written)", file=sys.stderr)
            offsets = self._scan_offsets(desc=f"indexing {os.path.basename(self.uri)}")
            self.keys = [self.key_type(i) for i in range(len(offsets))]
            self.idx = dict(zip(self.keys, offsets))

    def close(self):
        if not self.is_open:
            return
        super().close()
        if self._fidx is not None:
            self._fidx.close()
            self._fidx = None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_fidx", None)
        if state["is_open"]:  # the index is re-read on unpickling
            state.pop("idx"), state.pop("keys")
        return state

    def __setstate__(self, state):
        self._fidx = None
        super().__setstate__(state)

    def seek(self, idx):
        """Set the read position to the record with key ``idx``."""
        self._check_offset(self._offset(idx), idx)
        self._pos = self.idx[idx]

    def read_idx(self, idx):
        """Return the record with key ``idx``."""
        return self.read_at(self._offset(idx), key=idx)

    def write_idx(self, idx, buf):
        """Append a record and index it under key ``idx``."""
        key = self.key_type(idx)
        pos = self.tell()
        self.write(buf)
        self._fidx.write(f"{key}\t{pos}\n")
        self.idx[key] = pos
        self.keys.append(key)

    def _offset(self, key):
        try:
            return self.idx[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in the index {self.idx_path}") from None


def read_index(idx_path, key_type=int):
    """Parse a ``.idx`` file into (keys list, offsets list); malformed lines raise DataError with the line."""
    with open(idx_path) as f:
        text = f.read()
    parsed = _read_index_fast(text) if key_type is int else None
    return parsed if parsed is not None else _read_index_lines(text, key_type, idx_path)


def _read_index_fast(text):
    """Vectorised parse of a strictly well-formed index (one ``key<TAB>offset`` per line, nothing else);
    None when the text is anything else, for the line-by-line parser to accept or report."""
    body = text.rstrip("\n")
    if not body or " " in body or "\r" in body or "\n\n" in body:
        return None
    chars = np.frombuffer(body.encode(), np.uint8)
    newlines = np.flatnonzero(chars == 10)
    line_of_tab = np.searchsorted(newlines, np.flatnonzero(chars == 9))
    tabs_per_line = np.bincount(line_of_tab, minlength=len(newlines) + 1)
    tokens = body.split()
    if (tabs_per_line != 1).any() or len(tokens) != 2 * len(tabs_per_line):
        return None
    try:
        keys = list(map(int, tokens[0::2]))
        offsets = np.array(tokens[1::2]).astype(np.int64)
    except ValueError:
        return None
    return (keys, offsets.tolist()) if (offsets >= 0).all() else None


def _read_index_lines(text, key_type, idx_path):
    keys, offsets = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.strip().split("\t")
        if fields == [""]:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            key, offset = key_type(fields[0]), int(fields[1])
            if offset < 0:
                raise ValueError
        except ValueError:
            raise DataError(f"{idx_path}: line {lineno}: malformed index line {line[:80]!r}: "
                            "expected '<key><TAB><byte offset>'") from None
        keys.append(key)
        offsets.append(offset)
    return keys, offsets


def pack(header, s):
    """Prefix the payload ``s`` with an image-record header; an array ``label`` sets flag to its size."""
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
    else:
        label = np.asarray(header.label, dtype=np.float32)
        header = header._replace(flag=label.size, label=0)
        s = label.tobytes() + s
    return struct.pack(_IR_FORMAT, *header) + s


def unpack(s):
    """Split a record into (IRHeader, payload); the label is a float, or an np.ndarray when flag > 0."""
    if len(s) < _IR_SIZE:
        raise DataError(f"record of {len(s)} bytes is shorter than the {_IR_SIZE}-byte image-record header")
    header = IRHeader(*struct.unpack_from(_IR_FORMAT, s))
    s = s[_IR_SIZE:]
    if header.flag > 0:
        if len(s) < 4 * header.flag:
            raise DataError(f"image-record header announces {header.flag} labels but only {len(s)} bytes "
                            "follow")
        header = header._replace(label=np.frombuffer(s, np.float32, header.flag))
        s = s[header.flag * 4:]
    return header, s


def unpack_img(s, iscolor=-1):
    """Split a record into (IRHeader, image decoded by ``cv2.imdecode(.., iscolor)``: BGR like mxnet)."""
    header, s = unpack(s)
    img = cv2.imdecode(np.frombuffer(s, dtype=np.uint8), iscolor) if len(s) else None
    if img is None:
        raise DataError(f"image of record id {header.id} ({len(s)} bytes) does not decode")
    return header, img


def pack_img(header, img, quality=95, img_fmt=".jpg"):
    """Encode ``img`` (BGR, as cv2/mxnet) with ``img_fmt`` and pack it with ``header``.

    ``quality`` is the JPEG quality (1-100) or the PNG compression level (0-9)."""
    params = []
    if img_fmt.upper() in (".JPG", ".JPEG"):
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif img_fmt.upper() == ".PNG":
        params = [cv2.IMWRITE_PNG_COMPRESSION, quality]
    ok, buf = cv2.imencode(img_fmt, img, params)
    if not ok:
        raise ValueError(f"cv2.imencode failed to encode a {getattr(img, 'shape', '?')} image as {img_fmt}")
    return pack(header, buf.tobytes())


def scan_image_headers(records: MXRecordIO, offsets, keys=None):
    """Read the image-record header of the records at ``offsets`` of an open reader, vectorised.

    Returns ``(labels, image_sizes)``: float64 label (the scalar, or the first value of a label array; NaN
    for an empty label array) and the byte count of the image after the header, one per record. Records
    whose header is not a plain single-part record are read one by one; errors name the key (from
    ``keys``) and the offset."""
    offsets = np.asarray(offsets, dtype=np.int64)
    keys = offsets if keys is None else keys
    labels = np.empty(len(offsets), np.float64)
    sizes = np.empty(len(offsets), np.int64)
    fixed = _PREFIX.size + _IR_SIZE + 4  # container prefix, header and the first array label
    data = np.frombuffer(records._buf, np.uint8) if records._size else np.zeros(0, np.uint8)
    span = np.arange(fixed)
    chunk = 1 << 17
    slow = []
    for lo in range(0, len(offsets), chunk):
        off = offsets[lo:lo + chunk]
        fast = np.flatnonzero((off >= 0) & (off + fixed <= records._size))
        words = data[off[fast, None] + span].view("<u4")
        length, flag = words[:, 1] & _LENGTH_MASK, words[:, 2].astype(np.int64)
        ok = (words[:, 0] == MAGIC) & (words[:, 1] >> 29 == 0) & (length >= _IR_SIZE + 4 * flag)
        fast, words, length, flag = fast[ok], words[ok], length[ok], flag[ok]
        labels[lo + fast] = np.where(flag == 0, words[:, 3].view("<f4"), words[:, 8].view("<f4"))
        sizes[lo + fast] = length - _IR_SIZE - 4 * flag
        rest = np.ones(len(off), bool)
        rest[fast] = False
        slow += (lo + np.flatnonzero(rest)).tolist()
    # the view of the mmap goes before any record is read one by one: an error raised while it lived
    # would keep it in the traceback, and the reader's close() would then fail with BufferError
    del data
    for i in slow:
        key = keys[i]
        try:
            header, image = unpack(records.read_at(int(offsets[i]), key=key))
        except DataError as error:
            if str(error).startswith(records.uri):
                raise
            raise DataError(f"{records.uri}: record key {key} at offset {offsets[i]}: {error}") from None
        label = np.asarray(header.label, np.float64).reshape(-1)
        labels[i] = label[0] if label.size else np.nan
        sizes[i] = len(image)
    return labels, sizes
