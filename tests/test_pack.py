"""pack_folder: image folder -> insightface RecordIO layout."""
import os

import cv2
import numpy as np
import pytest

from data import ARCFACE_TEMPLATE, DataError, FaceRecordDataset, decode_image, pack_folder
from data.recordio import MXIndexedRecordIO, unpack

NAMES = ("bob", "alice", "carol")  # sorted: alice=0, bob=1, carol=2


def _colour(identity, image):
    return (40 + 80 * identity, 60 + 60 * image, 200)  # BGR, distinct per image


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "faces"
    for name in NAMES:
        for j in range(3):
            (root / name).mkdir(parents=True, exist_ok=True)
            image = np.zeros((50, 40, 3), np.uint8)
            image[5:45, :] = _colour(sorted(NAMES).index(name), j)  # the centred 40x40 square
            cv2.imwrite(str(root / name / f"{j:02d}.png"), image)
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not an identity")
    return root


def _records(out):
    reader = MXIndexedRecordIO(out / "train.idx", out / "train.rec", "r")
    records = {key: unpack(reader.read_idx(key)) for key in reader.keys}
    reader.close()
    return records


def test_layout(folder, tmp_path):
    out = tmp_path / "packed"
    summary = pack_folder(folder, out, size=16, workers=1)
    assert summary["images"] == 9 and summary["classes"] == 3 and summary["skipped"] == []
    assert sorted(p.name for p in out.iterdir()) == ["property", "train.idx", "train.rec"]
    assert (out / "property").read_text().strip() == "3,16,16"
    records = _records(out)
    assert sorted(records) == list(range(13))
    header, payload = records[0]
    assert header.flag == 2 and header.label.tolist() == [10, 13] and payload == b""
    assert (out / "train.idx").read_text().splitlines()[0] == "0\t0"  # header record first in the file
    for key in range(1, 10):
        header, payload = records[key]
        identity, image = divmod(key - 1, 3)
        assert header.flag == 0 and header.label == identity
        rgb = decode_image(payload)
        assert rgb.shape == (16, 16, 3)
        # the non-square image was centre-cropped (no black bands) and stored BGR-encoded like insightface
        np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), _colour(identity, image)[::-1], atol=3)
    for identity in range(3):
        header, payload = records[10 + identity]
        assert header.flag == 2 and header.label.tolist() == [1 + 3 * identity, 4 + 3 * identity]
    dataset = FaceRecordDataset(out, train=False)
    assert dataset.num_classes == 3 and len(dataset) == 9 and dataset[4][1] == 1


def test_workers_give_identical_output(folder, tmp_path):
    pack_folder(folder, tmp_path / "one", size=16, workers=1)
    pack_folder(folder, tmp_path / "two", size=16, workers=2)
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_landmarks_align(folder, tmp_path):
    """A dot at each image's 'left eye' landmark ends up at the template's left eye."""
    rows = ["path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5"]
    scale = 0.3
    for name in NAMES:
        for j in range(3):
            marks = ARCFACE_TEMPLATE * scale + [3 + j, 6]  # a 33.6-pixel face crop inside the 40x50 image
            image = np.zeros((50, 40, 3), np.uint8)
            cv2.circle(image, tuple(int(round(v)) for v in marks[0]), 1, (255, 255, 255), -1)
            cv2.imwrite(str(folder / name / f"{j:02d}.png"), image)
            rows.append(f"{name}/{j:02d}.png," + ",".join(f"{v:.3f}" for v in marks.ravel()))
    csv = tmp_path / "marks.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "aligned"
    pack_folder(folder, out, landmarks=csv, size=112, workers=1)
    for key in range(1, 10):
        face = decode_image(_records(out)[key][1])[..., 0].astype(float)
        ys, xs = np.nonzero(face > 60)
        assert abs(xs.mean() - ARCFACE_TEMPLATE[0, 0]) < 3 and abs(ys.mean() - ARCFACE_TEMPLATE[0, 1]) < 3

    csv.write_text("\n".join(rows[:-1]) + "\n")  # carol/02.png has no row
    with pytest.raises(ValueError, match="carol/02.png"):
        pack_folder(folder, tmp_path / "missing", landmarks=csv, workers=1)
    assert not (tmp_path / "missing").exists()


def test_refuses_overwrite_without_force(folder, tmp_path):
    out = tmp_path / "packed"
    pack_folder(folder, out, size=16, workers=1)
    before = (out / "train.rec").read_bytes()
    with pytest.raises(FileExistsError, match="train.rec"):
        pack_folder(folder, out, size=24, workers=1)
    assert (out / "train.rec").read_bytes() == before
    pack_folder(folder, out, size=24, workers=1, force=True)
    assert (out / "property").read_text().strip() == "3,24,24"


def test_bad_image_is_named_and_nothing_is_left(folder, tmp_path):
    (folder / "bob" / "01.png").write_bytes(b"not an image")
    out = tmp_path / "packed"
    with pytest.raises(DataError, match=r"bob/01\.png"):
        pack_folder(folder, out, size=16, workers=2)
    assert list(out.iterdir()) == []  # no partial or temporary files

    summary = pack_folder(folder, out, size=16, workers=1, skip_bad=True)
    assert summary["images"] == 8 and len(summary["skipped"]) == 1 and "bob/01.png" in summary["skipped"][0]
    records = _records(out)
    assert records[0][0].label.tolist() == [9, 12]
    assert records[10][0].label.tolist() == [4, 6]  # bob keeps 2 images


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        pack_folder(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "flat").mkdir()
    cv2.imwrite(str(tmp_path / "flat" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no images"):
        pack_folder(tmp_path / "flat", tmp_path / "out")


def _command(module, argv):
    """Parse ``argv`` with the command's own arguments and run it, as facerec.cli does."""
    import argparse

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_pack_command(folder, tmp_path, capsys):
    from facerec.commands import pack

    out = tmp_path / "cli"
    argv = ["--input", str(folder), "--output", str(out), "--size", "16", "--workers", "1"]
    assert _command(pack, argv) == 0
    assert "9 images of 3 identities, 16x16" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        _command(pack, argv)
    assert _command(pack, argv + ["--force", "--quality", "80"]) == 0


def test_pack_through_run_py_cli(folder, tmp_path, capsys):
    from facerec.cli import main

    argv = ["pack", "--input", str(folder), "--output", str(tmp_path / "o"), "--size", "16", "--workers", "1"]
    assert main(argv) == 0
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "already exists" in err


def _parent_pid(_item):
    return os.getppid()


def test_worker_pool_never_forks_the_calling_process():
    """Forking after torch/OpenCV started their thread pools can deadlock: workers must come from a
    fork server, so none of them is a child of this (threaded) process."""
    from data.workers import map_ordered

    parents = set(map_ordered(_parent_pid, list(range(8)), workers=2))
    assert os.getpid() not in parents
