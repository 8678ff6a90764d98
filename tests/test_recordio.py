"""data.recordio: container, index, image-record header, split records, errors, pickling."""
from __future__ import annotations

import hashlib
import pickle
import struct

import numpy as np
import pytest

from data.errors import DataError
from data.recordio import (
    IRHeader,
    MXIndexedRecordIO,
    MXRecordIO,
    pack,
    pack_img,
    read_index,
    unpack,
    unpack_img,
)

MAGIC = struct.pack("<I", 0xCED7230A)
PAYLOADS = [b"hello", b"", b"abcd", b"x" * 7, MAGIC, b"abcd" + MAGIC + b"ef", MAGIC + MAGIC,
            b"q" + MAGIC + b"rrr", bytes(range(256)) * 4]


def _write(tmp_path, payloads=PAYLOADS, keys=None, name="t"):
    rec, idx = tmp_path / f"{name}.rec", tmp_path / f"{name}.idx"
    keys = range(len(payloads)) if keys is None else keys
    with MXIndexedRecordIO(idx, rec, "w") as writer:
        for key, payload in zip(keys, payloads):
            writer.write_idx(key, payload)
    return rec, idx


def _parts(raw):
    """(cflag, payload) of each container part in a raw .rec byte string."""
    parts, pos = [], 0
    while pos < len(raw):
        magic, lrec = struct.unpack_from("<II", raw, pos)
        assert magic == 0xCED7230A
        length = lrec & ((1 << 29) - 1)
        parts.append((lrec >> 29, raw[pos + 8:pos + 8 + length]))
        pos += 8 + (length + 3) // 4 * 4
    return parts


def test_container_layout_and_padding(tmp_path):
    rec = tmp_path / "a.rec"
    with MXRecordIO(rec, "w") as writer:
        assert writer.tell() == 0
        writer.write(b"abcde")
        assert writer.tell() == 16
        writer.write(b"")
        assert writer.tell() == 24
    raw = rec.read_bytes()
    assert raw == MAGIC + struct.pack("<I", 5) + b"abcde\0\0\0" + MAGIC + struct.pack("<I", 0)


def test_indexed_round_trip_random_access_and_sequential(tmp_path):
    rec, idx = _write(tmp_path, keys=[5 * k + 3 for k in range(len(PAYLOADS))])
    with MXIndexedRecordIO(idx, rec, "r") as reader:
        assert reader.keys == [5 * k + 3 for k in range(len(PAYLOADS))]
        for key, payload in reversed(list(zip(reader.keys, PAYLOADS))):
            assert reader.read_idx(key) == payload
        reader.seek(reader.keys[2])
        assert reader.read() == PAYLOADS[2]
        assert reader.read() == PAYLOADS[3]
        reader.reset()
        assert list(iter(reader.read, None)) == PAYLOADS
        assert reader.read() is None
    lines = idx.read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(k) for k in reader.keys]


def test_split_records_at_aligned_magic(tmp_path):
    noise = bytes(range(1, 41))
    cases = {
        noise[:8] + MAGIC + noise[8:20]: [(1, noise[:8]), (3, noise[8:20])],
        MAGIC: [(1, b""), (3, b"")],
        MAGIC + noise[:4] + MAGIC + MAGIC + noise[4:6]: [(1, b""), (2, noise[:4]), (2, b""), (3, noise[4:6])],
        noise[:5] + MAGIC + noise[5:12]: [(0, noise[:5] + MAGIC + noise[5:12])],  # unaligned: not split
        noise[:2] + MAGIC: [(0, noise[:2] + MAGIC)],
    }
    for n, (payload, expected) in enumerate(cases.items()):
        rec = tmp_path / f"s{n}.rec"
        with MXRecordIO(rec, "w") as writer:
            writer.write(payload)
        raw = rec.read_bytes()
        assert _parts(raw) == expected
        assert len(raw) % 4 == 0
        with MXRecordIO(rec, "r") as reader:
            assert reader.read() == payload
            assert reader.read() is None


def test_header_pack_unpack():
    packed = pack(IRHeader(0, 3, 7, 1), b"img")
    assert packed == struct.pack("<IfQQ", 0, 3.0, 7, 1) + b"img"
    header, payload = unpack(packed)
    assert header == (0, 3.0, 7, 1) and payload == b"img"
    packed = pack(IRHeader(0, [2.0, 5.5, -1.0], 9, 0), b"xy")
    assert packed[:24] == struct.pack("<IfQQ", 3, 0.0, 9, 0)
    header, payload = unpack(packed)
    assert header.flag == 3 and payload == b"xy"
    np.testing.assert_array_equal(header.label, np.array([2.0, 5.5, -1.0], np.float32))
    header, _ = unpack(pack((5, np.float32(4.0), 0, 0), b""))  # a numpy scalar is a scalar label
    assert header.flag == 0 and header.label == 4.0
    with pytest.raises(DataError, match="shorter than the 24-byte"):
        unpack(b"short")
    with pytest.raises(DataError, match="announces 4 labels"):
        unpack(struct.pack("<IfQQ", 4, 0.0, 0, 0) + b"\0" * 8)


def test_pack_img_is_bgr_like_mxnet():
    bgr = np.zeros((8, 6, 3), np.uint8)
    bgr[..., 0] = 255  # pure blue in BGR
    header, image = unpack_img(pack_img((0, 1.0, 2, 0), bgr, quality=1, img_fmt=".png"))
    assert header == (0, 1.0, 2, 0)
    np.testing.assert_array_equal(image, bgr)
    _, image = unpack_img(pack_img((0, [1.0, 2.0], 2, 0), bgr, quality=95, img_fmt=".jpg"))
    assert image.shape == (8, 6, 3) and image[..., 0].min() > 240 and image[..., 2].max() < 15
    with pytest.raises(DataError, match="does not decode"):
        unpack_img(pack((0, 1.0, 3, 0), b"not an image"))


def test_missing_index_is_rebuilt_in_memory(tmp_path, capsys):
    rec, idx = _write(tmp_path)
    idx.unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    with MXIndexedRecordIO(idx, rec, "r") as reader:
        assert reader.keys == list(range(len(PAYLOADS)))
        assert [reader.read_idx(k) for k in reader.keys] == PAYLOADS
    assert "rebuilding the index" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _digest(paths):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_reading_never_modifies_input(tmp_path):
    rec, idx = _write(tmp_path)
    before = _digest([rec, idx])
    with MXIndexedRecordIO(idx, rec, "r") as reader:
        for key in reader.keys:
            reader.read_idx(key)
    assert _digest([rec, idx]) == before


def test_bad_magic_names_file_key_and_offset(tmp_path):
    rec, idx = _write(tmp_path)
    raw = bytearray(rec.read_bytes())
    offset = int(idx.read_text().splitlines()[2].split("\t")[1])
    raw[offset:offset + 4] = b"\xde\xad\xbe\xef"
    rec.write_bytes(bytes(raw))
    expected = rf"t\.rec: record key 2 at offset {offset}: bad magic 0xEFBEADDE"
    with MXIndexedRecordIO(idx, rec, "r") as reader, pytest.raises(DataError, match=expected):
        reader.read_idx(2)
    with MXRecordIO(rec, "r") as reader, pytest.raises(DataError, match=f"offset {offset}: bad magic"):
        list(iter(reader.read, None))


def test_truncated_record(tmp_path):
    rec, idx = _write(tmp_path)
    raw = rec.read_bytes()
    rec.write_bytes(raw[:-10])
    last = len(PAYLOADS) - 1
    expected = rf"t\.rec: record key {last} at offset \d+: truncated"
    with MXIndexedRecordIO(idx, rec, "r") as reader, pytest.raises(DataError, match=expected):
        reader.read_idx(last)
    last_offset = int(idx.read_text().splitlines()[-1].split("\t")[1])
    rec.write_bytes(raw[:last_offset + 5])  # cut inside a record header
    with MXRecordIO(rec, "r") as reader, pytest.raises(DataError, match="truncated: record header"):
        list(iter(reader.read, None))


def test_index_offset_past_end(tmp_path):
    rec, idx = _write(tmp_path)
    idx.write_text(idx.read_text() + "99\t1000000\n")
    with MXIndexedRecordIO(idx, rec, "r") as reader:
        with pytest.raises(DataError, match=r"t\.rec: key 99: offset 1000000 is past the end of the file"):
            reader.read_idx(99)
        with pytest.raises(KeyError, match="not in the index"):
            reader.read_idx(12345)


def test_malformed_index_line_names_line_number(tmp_path):
    rec, idx = _write(tmp_path)
    lines = idx.read_text().splitlines()
    for bad in ("3 16", "x\t16", "3\t16\t1", "3\t-5"):
        idx.write_text("\n".join(lines[:2] + [bad] + lines[3:]) + "\n")
        with pytest.raises(DataError, match=r"t\.idx: line 3: malformed index line"):
            MXIndexedRecordIO(idx, rec, "r")
    idx.write_text("\n".join(lines) + "\n\n")  # trailing blank lines are fine
    strict = read_index(idx)
    assert strict[0] == list(range(len(PAYLOADS)))
    idx.write_text("\n\n".join(f" {line} \r" for line in lines))  # tolerated as mxnet does
    assert read_index(idx) == strict


def test_invalid_continuation_flag(tmp_path):
    rec = tmp_path / "c.rec"
    rec.write_bytes(MAGIC + struct.pack("<I", 2 << 29 | 4) + b"abcd")
    with MXRecordIO(rec, "r") as reader, pytest.raises(DataError, match="invalid continuation flag 2"):
        reader.read()


def test_pickled_reader_reopens_and_writer_refuses(tmp_path):
    rec, idx = _write(tmp_path)
    reader = MXIndexedRecordIO(idx, rec, "r")
    reader.read_idx(3)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read_idx(5) == PAYLOADS[5] and clone.keys == reader.keys
    assert clone.read() == PAYLOADS[6]
    reader.close(), clone.close()
    with MXRecordIO(tmp_path / "w.rec", "w") as writer, pytest.raises(TypeError, match="cannot pickle"):
        pickle.dumps(writer)
    with pytest.raises(ValueError, match="invalid flag"):
        MXRecordIO(rec, "a")


def test_record_length_limit(tmp_path):
    with MXRecordIO(tmp_path / "big.rec", "w") as writer:
        with pytest.raises(ValueError, match=r"must be < 2\*\*29 bytes"):
            writer.write(np.zeros(1 << 29, np.uint8))  # never touched: no memory is used
        writer.write(bytearray(b"ok"))
    with MXRecordIO(tmp_path / "big.rec", "r") as reader:
        assert reader.read() == b"ok"
