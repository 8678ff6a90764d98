"""Byte-for-byte interoperability of data.recordio with the original mxnet 1.9.1 (run in its own venv).

Skipped, with pip's reason, where mxnet cannot be installed. Files cross between the two sides; Python
objects cross as pickles of builtins only (numpy 1.x and 2.x pickles of arrays are not interchangeable)."""
from __future__ import annotations

import pickle
import struct

import cv2
import numpy as np
import pytest

from benchmarks.mxnet_env import MXNetUnavailable, mxnet_python, run_script
from data.datasets import FaceRecordDataset
from data.recordio import MXIndexedRecordIO, MXRecordIO, pack, pack_img, unpack, unpack_img

MAGIC = struct.pack("<I", 0xCED7230A)

MXNET_SIDE = r'''
import pickle, sys
import numpy as np
import mxnet.recordio as rio

jobs = pickle.load(open(sys.argv[1], "rb"))
out = {}
payloads = jobs["payloads"]
# write the same records as the python side
w = rio.MXIndexedRecordIO(jobs["mx_idx"], jobs["mx_rec"], "w")
for key, payload in payloads:
    w.write_idx(key, payload)
w.close()
w = rio.MXRecordIO(jobs["mx_seq"], "w")
for _, payload in payloads:
    w.write(payload)
w.close()
# read the files written by the python side
r = rio.MXIndexedRecordIO(jobs["our_idx"], jobs["our_rec"], "r")
out["keys"] = list(r.keys)
out["read_idx"] = [r.read_idx(k) for k in reversed(r.keys)]
r.close()
r = rio.MXRecordIO(jobs["our_seq"], "r")
seq = []
while True:
    item = r.read()
    if item is None:
        break
    seq.append(item)
out["read"] = seq
# image-record headers
def plain(header):
    label = header.label
    label = [float(v) for v in label] if isinstance(label, np.ndarray) else float(label)
    return (int(header.flag), label, int(header.id), int(header.id2))
def label_of(spec):
    kind, value = spec
    return np.array(value, dtype=np.float32) if kind == "array" else value
out["pack"] = [rio.pack(rio.IRHeader(flag, label_of(label), i, i2), s)
               for (flag, label, i, i2), s in jobs["headers"]]
out["unpack"] = [(plain(h), s) for h, s in (rio.unpack(b) for b in jobs["our_packed"])]
images = [np.frombuffer(b, np.uint8).reshape(shape) for b, shape in jobs["images"]]
out["pack_img"] = [rio.pack_img(rio.IRHeader(0, float(i), i, 0), img, quality=q, img_fmt=fmt)
                   for i, img in enumerate(images) for q, fmt in jobs["img_formats"]]
# an insightface-layout pack written by mxnet: header record 0, images 1..6, identity records 7..9
pack_dir = jobs["pack_dir"]
w = rio.MXIndexedRecordIO(pack_dir + "/train.idx", pack_dir + "/train.rec", "w")
w.write_idx(0, rio.pack(rio.IRHeader(0, [7, 10], 0, 0), b""))
for key in range(1, 7):
    label = (key - 1) // 2
    w.write_idx(key, rio.pack_img(rio.IRHeader(0, [label, 0.5], key, 0), images[label], quality=95))
for identity in range(3):
    w.write_idx(7 + identity, rio.pack(rio.IRHeader(0, [1 + 2 * identity, 3 + 2 * identity], 0, 0), b""))
w.close()
r = rio.MXIndexedRecordIO(pack_dir + "/train.idx", pack_dir + "/train.rec", "r")
out["pack_decoded"] = [(plain(h), img.tobytes(), img.shape)
                       for h, img in (rio.unpack_img(r.read_idx(k)) for k in range(1, 7))]
decoded = [rio.unpack_img(s) for s in jobs["our_img_records"]]
out["unpack_img"] = [(plain(h), img.tobytes(), img.shape) for h, img in decoded]
pickle.dump(out, open(sys.argv[2], "wb"))
'''


def _payloads():
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes().replace(MAGIC, b"")
    return [
        (0, pack((0, [12.0, 20.0], 0, 0), b"")),               # insightface-style header record
        (1, pack((0, 3.0, 1, 0), noise[:333])),                # scalar label, unaligned length
        (2, pack((0, [4.0, 1.5, -2.0], 2, 0), noise[:100])),   # label array
        (3, b""),                                              # empty record
        (4, b"a"), (5, b"ab"), (6, b"abc"), (7, b"abcd"),      # every padding length
        (8, MAGIC),                                            # magic alone: a split into two empty parts
        (9, noise[:40] + MAGIC + noise[40:81]),                # aligned magic: forced split
        (10, MAGIC + noise[:8] + MAGIC + MAGIC + noise[8:23] + MAGIC),  # several aligned offsets, adjacent
        (11, noise[:41] + MAGIC + noise[41:60]),               # unaligned magic: no split
        (12, pack((0, 5.0, 12, 0), noise[:20] + MAGIC + noise[20:50])),  # magic inside an image record
        (20, noise),                                           # non-consecutive key
        (13, bytes(64)),
    ]


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    try:
        mxnet_python()
    except MXNetUnavailable as error:
        pytest.skip(f"mxnet 1.9.1 unavailable: {error}")
    tmp = tmp_path_factory.mktemp("interop")
    payloads = _payloads()
    with MXIndexedRecordIO(tmp / "ours.idx", tmp / "ours.rec", "w") as writer:
        for key, payload in payloads:
            writer.write_idx(key, payload)
    with MXRecordIO(tmp / "ours_seq.rec", "w") as writer:
        for _, payload in payloads:
            writer.write(payload)
    headers = [((0, ("scalar", 7.0), 5, 0), b"xyz"), ((0, ("scalar", 2), 2**40 + 3, 9), b""),
               ((3, ("array", [1.0, 2.0]), 1, 2), b"payload"), ((0, ("array", [0.5]), 0, 0), MAGIC),
               ((9, ("scalar", -1.25), 0, 2**63), b"q")]

    def label_of(spec):
        kind, value = spec
        return np.array(value, dtype=np.float32) if kind == "array" else value

    our_packed = [pack((flag, label_of(label), i, i2), s) for (flag, label, i, i2), s in headers]
    rng = np.random.default_rng(0)
    images = [cv2.GaussianBlur(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8), (5, 5), 1.5)
              for _ in range(3)]
    formats = [(95, ".jpg"), (80, ".jpeg"), (3, ".png")]
    our_img_records = [pack_img((0, float(i), i, 0), img, quality=q, img_fmt=fmt)
                       for i, img in enumerate(images) for q, fmt in formats]
    jobs = {
        "payloads": payloads, "mx_idx": str(tmp / "mx.idx"), "mx_rec": str(tmp / "mx.rec"),
        "mx_seq": str(tmp / "mx_seq.rec"), "our_idx": str(tmp / "ours.idx"), "our_rec": str(tmp / "ours.rec"),
        "our_seq": str(tmp / "ours_seq.rec"), "headers": headers, "our_packed": our_packed,
        "images": [(img.tobytes(), img.shape) for img in images], "img_formats": formats,
        "our_img_records": our_img_records, "pack_dir": str(tmp / "pack"),
    }
    (tmp / "pack").mkdir()
    (tmp / "jobs.pkl").write_bytes(pickle.dumps(jobs, protocol=4))
    run_script(MXNET_SIDE, tmp / "jobs.pkl", tmp / "out.pkl")
    out = pickle.loads((tmp / "out.pkl").read_bytes())
    return {"tmp": tmp, "payloads": payloads, "out": out, "headers": headers, "our_packed": our_packed,
            "images": images, "formats": formats, "our_img_records": our_img_records}


def test_indexed_files_byte_identical(interop):
    tmp = interop["tmp"]
    assert (tmp / "ours.rec").read_bytes() == (tmp / "mx.rec").read_bytes()
    assert (tmp / "ours.idx").read_bytes() == (tmp / "mx.idx").read_bytes()
    assert (tmp / "ours.rec").read_bytes().count(MAGIC) > len(interop["payloads"])  # split records present


def test_sequential_files_byte_identical(interop):
    tmp = interop["tmp"]
    assert (tmp / "ours_seq.rec").read_bytes() == (tmp / "mx_seq.rec").read_bytes()


def test_mxnet_reads_ours(interop):
    payloads, out = interop["payloads"], interop["out"]
    assert out["keys"] == [key for key, _ in payloads]
    assert out["read_idx"] == [payload for _, payload in reversed(payloads)]
    assert out["read"] == [payload for _, payload in payloads]


def test_we_read_mxnets(interop):
    tmp, payloads = interop["tmp"], interop["payloads"]
    with MXIndexedRecordIO(tmp / "mx.idx", tmp / "mx.rec", "r") as reader:
        assert reader.keys == [key for key, _ in payloads]
        assert [reader.read_idx(key) for key, _ in payloads] == [payload for _, payload in payloads]
    with MXRecordIO(tmp / "mx_seq.rec", "r") as reader:
        records = iter(reader.read, None)
        assert list(records) == [payload for _, payload in payloads]


def _plain(header):
    label = header.label
    label = [float(v) for v in label] if isinstance(label, np.ndarray) else float(label)
    return (int(header.flag), label, int(header.id), int(header.id2))


def test_pack_and_unpack_match(interop):
    out = interop["out"]
    assert out["pack"] == interop["our_packed"]
    ours = [unpack(b) for b in interop["our_packed"]]
    assert out["unpack"] == [(_plain(h), s) for h, s in ours]
    assert [(_plain(h), s) for h, s in (unpack(b) for b in out["pack"])] == out["unpack"]


def test_pack_img_round_trips_match(interop):
    out, images, formats = interop["out"], interop["images"], interop["formats"]
    theirs = out["pack_img"]
    assert len(theirs) == len(interop["our_img_records"])
    for n, (mine, mx_record) in enumerate(zip(interop["our_img_records"], theirs)):
        original = images[n // len(formats)]
        fmt = formats[n % len(formats)][1]
        header_mine, img_mine = unpack_img(mine)
        header_mx, img_mx = unpack_img(mx_record)
        assert _plain(header_mine) == _plain(header_mx)
        h_mx_reads_mine, raw, shape = out["unpack_img"][n]
        img_mx_reads_mine = np.frombuffer(raw, np.uint8).reshape(shape)
        assert h_mx_reads_mine == _plain(header_mine)
        if fmt == ".png":  # lossless: every decode equals the original
            for img in (img_mine, img_mx, img_mx_reads_mine):
                np.testing.assert_array_equal(img, original)
        else:  # JPEG: different libjpeg builds, so compare decoded pixels with a tolerance
            for img in (img_mx, img_mx_reads_mine):
                assert img.shape == img_mine.shape
                assert np.abs(img.astype(int) - img_mine).mean() < 1.0
            assert np.abs(img_mine.astype(int) - original).mean() < 8.0


def test_dataset_reads_an_mxnet_written_pack(interop):
    dataset = FaceRecordDataset(interop["tmp"] / "pack", train=False)
    assert dataset.layout == "insightface" and dataset.num_classes == 3
    assert dataset.labels.tolist() == [0, 0, 1, 1, 2, 2] and dataset.keys.tolist() == [1, 2, 3, 4, 5, 6]
    for i, (header, raw, shape) in enumerate(interop["out"]["pack_decoded"]):
        tensor, label = dataset[i]
        assert header[1] == [float(label), 0.5]
        bgr = np.frombuffer(raw, np.uint8).reshape(shape)  # mxnet's decode of the same record
        rgb = ((tensor.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).round().astype(int)
        assert np.abs(rgb - bgr[..., ::-1]).mean() < 1.0
