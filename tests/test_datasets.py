"""data.images, data.datasets and data.loader on tiny packs built with our own writer."""
from __future__ import annotations

import hashlib
import os
import pickle

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from data.datasets import FaceFolderDataset, FaceRecordDataset
from data.errors import DataError
from data.images import decode_image, encode_image, to_tensor
from data.loader import build_loader
from data.recordio import MXIndexedRecordIO, pack

IDS, PER_ID, SIZE = 3, 4, 16


def _image(label, n):
    """An RGB image whose left half encodes (label, n) and whose right half is black (flips show)."""
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[:, : SIZE // 2] = (40 + 60 * label, 30 + 40 * n, 200)
    return rgb


def _png(label, n):
    return encode_image(_image(label, n), ext=".png")


def _expected(label, n, flip=False):
    image = _image(label, n)
    return to_tensor(image[:, ::-1] if flip else image)


def _write_pack(folder, layout, labels=None, property_classes=IDS, corrupt_key=None, header=None):
    """Write train.rec/.idx(/property) of IDS x PER_ID images in one of three layouts; return image keys."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [(label, n) for label in range(IDS) for n in range(PER_ID)]
    labels = [label for label, _ in items] if labels is None else labels
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "w") as writer:
        if layout == "insightface":
            start = 1 + len(items)
            writer.write_idx(0, pack((0, header or [start, start + IDS], 0, 0), b""))
            keys = list(range(1, start))
            for key, (label, n), value in zip(keys, items, labels):
                image = b"garbage" if key == corrupt_key else _png(label, n)
                writer.write_idx(key, pack((0, float(value), key, 0), image))
            for identity in range(IDS):
                first = 1 + identity * PER_ID
                writer.write_idx(start + identity, pack((0, [first, first + PER_ID], 0, 0), b""))
        else:
            base = {"im2rec0": 0, "im2rec1": 1, "shuffled": 100}[layout]
            keys = [base + i for i in range(len(items))]
            order = range(len(items))
            if layout == "shuffled":
                order = np.random.default_rng(1).permutation(len(items))
            for i in order:
                (label, n), value = items[i], labels[i]
                value = [float(value), 7.0] if layout == "shuffled" else float(value)  # label arrays too
                writer.write_idx(keys[i], pack((0, value, keys[i], 0), _png(label, n)))
    if property_classes is not None:
        (folder / "property").write_text(f"{property_classes},{SIZE},{SIZE}")
    return keys, items


@pytest.mark.parametrize("layout", ["insightface", "im2rec0", "im2rec1", "shuffled"])
def test_record_dataset_layouts(tmp_path, layout):
    classes = None if layout == "im2rec1" else IDS
    keys, items = _write_pack(tmp_path / layout, layout, property_classes=classes)
    dataset = FaceRecordDataset(tmp_path / layout, train=False)
    assert len(dataset) == IDS * PER_ID and dataset.num_classes == IDS
    assert dataset.layout == ("insightface" if layout == "insightface" else "records")
    expected = dict(zip(keys, items))
    assert sorted(dataset.keys.tolist()) == sorted(keys)
    for i in range(len(dataset)):
        tensor, label = dataset[i]
        want_label, n = expected[int(dataset.keys[i])]
        assert label == want_label == dataset.labels[i]
        assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, _expected(want_label, n), atol=0, rtol=0)
    assert FaceRecordDataset(tmp_path / layout / "train.rec", input_size=32)[0][0].shape == (3, 32, 32)


def test_random_flip_is_seeded_and_reproducible(tmp_path):
    _write_pack(tmp_path, "insightface")
    dataset = FaceRecordDataset(tmp_path, train=True)

    def flips():
        torch.manual_seed(7)
        fresh = pickle.loads(pickle.dumps(dataset))
        out = []
        for i in range(len(fresh)):
            tensor, label = fresh[i]
            n = (int(fresh.keys[i]) - 1) % PER_ID
            if torch.equal(tensor, _expected(label, n, flip=True)):
                out.append(True)
            else:
                torch.testing.assert_close(tensor, _expected(label, n), atol=0, rtol=0)
                out.append(False)
        return out

    first = flips()
    assert first == flips() and 0 < sum(first) < len(first)


def test_missing_index_is_rebuilt_and_inputs_unchanged(tmp_path, capsys):
    _write_pack(tmp_path, "insightface")
    (tmp_path / "train.idx").unlink()
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    dataset = FaceRecordDataset(tmp_path, train=True)
    assert dataset.layout == "insightface" and len(dataset) == IDS * PER_ID
    for i in range(len(dataset)):
        dataset[i]
    assert "rebuilding the index" in capsys.readouterr().err
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()} == digest


def test_property_mismatch_explains_both(tmp_path):
    _write_pack(tmp_path / "a", "insightface", property_classes=5)
    with pytest.raises(DataError, match=r"property declares 5 classes but the records give 3 \(identity"):
        FaceRecordDataset(tmp_path / "a")
    _write_pack(tmp_path / "b", "im2rec0", property_classes=4)
    with pytest.raises(DataError, match=r"declares 4 classes but the records give 3 \(max label \+ 1\)"):
        FaceRecordDataset(tmp_path / "b")
    _write_pack(tmp_path / "c", "im2rec0")
    (tmp_path / "c" / "property").write_text("many,112,112")
    with pytest.raises(DataError, match="expected 'num_classes,height,width'"):
        FaceRecordDataset(tmp_path / "c")


@pytest.mark.parametrize(("layout", "bad", "message"), [
    ("insightface", 3, r"record key 6: label 3 is outside 0..2"),
    ("im2rec1", -1, r"record key 6: label -1 is outside 0..2"),
    ("im2rec0", 1.5, r"record key 5: label 1.5 is not an integer"),
])
def test_labels_out_of_range_name_the_key(tmp_path, layout, bad, message):
    labels = [label for label in range(IDS) for _ in range(PER_ID)]
    labels[5] = bad
    _write_pack(tmp_path, layout, labels=labels, property_classes=None)
    with pytest.raises(DataError, match=rf"train\.rec: {message}"):
        FaceRecordDataset(tmp_path)


def test_undecodable_image_names_key(tmp_path):
    _write_pack(tmp_path, "insightface", corrupt_key=4)
    dataset = FaceRecordDataset(tmp_path, train=False)
    dataset[0]
    with pytest.raises(DataError, match=r"train\.rec: record key 4 at offset \d+: image does not decode"):
        dataset[3]


def test_unknown_layouts(tmp_path):
    _write_pack(tmp_path / "a", "insightface", header=[1 + IDS * PER_ID, 50])
    with pytest.raises(DataError, match="unknown layout: header record 0 announces .* key 16 is not in"):
        FaceRecordDataset(tmp_path / "a")
    folder = tmp_path / "b"
    _write_pack(folder, "insightface")
    lines = (folder / "train.idx").read_text().splitlines()
    (folder / "train.idx").write_text("\n".join(lines[1:]) + "\n")  # header record not indexed
    with pytest.raises(DataError, match=r"unknown layout: record key 13 holds no image"):
        FaceRecordDataset(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FaceRecordDataset(tmp_path / "nowhere")


def test_folder_dataset(tmp_path):
    root = tmp_path / "faces"
    for label, name in enumerate(["alice", "bob", "carol"]):
        (root / name).mkdir(parents=True)
        for n, ext in enumerate([".jpg", ".PNG", ".bmp"]):
            bgr = cv2.cvtColor(_image(label, n), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(root / name / f"{n}{ext}"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 100])
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    dataset = FaceFolderDataset(root, train=False)
    assert dataset.num_classes == 3 and dataset.identities == ["alice", "bob", "carol"]
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    tensor, label = dataset[4]
    assert label == 1
    torch.testing.assert_close(tensor, _expected(1, 1), atol=0, rtol=0)  # the PNG: lossless
    assert FaceFolderDataset(root, input_size=8)[0][0].shape == (3, 8, 8)
    (tmp_path / "void" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        FaceFolderDataset(tmp_path / "void")
    with pytest.raises(FileNotFoundError):
        FaceFolderDataset(tmp_path / "missing")


def test_decode_encode_to_tensor():
    rgb = _image(1, 2)
    np.testing.assert_array_equal(decode_image(encode_image(rgb, ext=".png")), rgb)  # RGB in, RGB out
    jpeg = encode_image(rgb, quality=95)
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert abs(int(bgr[0, 0, 0]) - 200) < 6  # stored BGR, as insightface's records
    gray = cv2.imencode(".png", np.arange(64, dtype=np.uint8).reshape(8, 8))[1].tobytes()
    image = decode_image(gray)
    assert image.shape == (8, 8, 3) and np.array_equal(image[..., 0], image[..., 2])
    assert decode_image(jpeg, size=8).shape == (8, 8, 3)
    assert decode_image(jpeg, size=40).shape == (40, 40, 3)
    with pytest.raises(DataError, match="photo.jpg: image does not decode"):
        decode_image(b"\xff\xd8 broken", source="photo.jpg")
    with pytest.raises(DataError, match="does not decode"):
        decode_image(b"")
    batch = np.stack([rgb, rgb[::-1]])
    tensor = to_tensor(batch)
    assert tensor.shape == (2, 3, SIZE, SIZE) and tensor.is_contiguous()
    reference = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(tensor, reference)
    torch.testing.assert_close(to_tensor(rgb), reference[0])
    with pytest.raises(ValueError, match="uint8 RGB"):
        to_tensor(np.zeros((4, 4), np.uint8))


def _epoch(loader):
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_loader_two_workers_reproducible(tmp_path):
    _write_pack(tmp_path, "insightface")
    dataset = FaceRecordDataset(tmp_path, train=True)
    first = _epoch(build_loader(dataset, batch_size=4, num_workers=2, seed=3))
    again = _epoch(build_loader(dataset, batch_size=4, num_workers=2, seed=3))
    other = _epoch(build_loader(dataset, batch_size=4, num_workers=2, seed=4))
    assert len(first) == 3 and first[0][0].shape == (4, 3, SIZE, SIZE)
    for (a, la), (b, lb) in zip(first, again):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert any(not torch.equal(la, lb) for (_, la), (_, lb) in zip(first, other))
    assert sorted(torch.cat([labels for _, labels in first]).tolist()) == sorted(dataset.labels.tolist())
    assert "_records" not in pickle.loads(pickle.dumps(dataset)).__dict__  # workers open their own file


def test_loader_distributed_sampler(tmp_path):
    _write_pack(tmp_path, "im2rec0")
    dataset = FaceRecordDataset(tmp_path, train=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        loader = build_loader(dataset, batch_size=5, num_workers=0, shuffle=True, seed=1)
        assert isinstance(loader.sampler, DistributedSampler)
        loader.sampler.set_epoch(0)
        epoch0 = torch.cat([labels for _, labels in loader])
        loader.sampler.set_epoch(1)
        epoch1 = torch.cat([labels for _, labels in loader])
        assert len(epoch0) == len(epoch1) == 10  # drop_last
        assert [x[1].tolist() for x in loader] == [x[1].tolist() for x in loader]
    finally:
        dist.destroy_process_group()
    assert not isinstance(build_loader(dataset, batch_size=5, num_workers=0).sampler, DistributedSampler)


def test_bench_data_quick_runs(capsys):
    from benchmarks.bench_data import main

    assert main(["--quick", "--records", "120", "--repeat", "1"]) == 0
    table = capsys.readouterr().out
    for row in ("read_idx shuffled keys", "decode+flip+normalise", "build_loader 2 workers",
                "every augmentation"):
        assert row in table


class _ParentPid(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return os.getppid()


def test_loader_workers_are_not_forks_of_the_caller():
    """A worker forked after OpenCV/torch started their thread pools can deadlock (it hung a CI run):
    workers must start from a fork server, so none of them is a child of this process."""
    loader = build_loader(_ParentPid(), batch_size=2, num_workers=2, shuffle=False)
    parents = {int(pid) for batch in loader for pid in batch}
    assert os.getpid() not in parents
