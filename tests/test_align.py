"""Least-squares similarity alignment to the ArcFace template."""
import math

import numpy as np
import pytest

from data import ARCFACE_TEMPLATE, align_face, similarity_transform
from data.align import crop_face, read_landmarks_csv


def _similarity(scale, angle_deg, tx, ty):
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]])


def _apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_template_values():
    assert ARCFACE_TEMPLATE.shape == (5, 2) and ARCFACE_TEMPLATE.dtype == np.float32
    np.testing.assert_allclose(ARCFACE_TEMPLATE[0], [38.2946, 51.6963])
    np.testing.assert_allclose(ARCFACE_TEMPLATE[4], [70.7299, 92.2041])


@pytest.mark.parametrize("scale,angle,tx,ty", [(1.0, 0, 0, 0), (0.37, 23, 15, -4), (2.5, -170, -80, 300)])
def test_recovers_exact_similarity(scale, angle, tx, ty):
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 250, (5, 2))
    truth = _similarity(scale, angle, tx, ty)
    np.testing.assert_allclose(similarity_transform(src, _apply(truth, src)), truth, atol=1e-9)


def test_noisy_points_give_the_least_squares_optimum():
    """A similarity is linear in (a, b, tx, ty) with M = [[a, -b, tx], [b, a, ty]]: solve that with lstsq."""
    rng = np.random.default_rng(1)
    src = rng.uniform(50, 200, (5, 2))
    dst = _apply(_similarity(0.6, 12, 5, 9), src) + rng.normal(0, 3, (5, 2))
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    expected = np.array([[a, -b, tx], [b, a, ty]])
    got = similarity_transform(src, dst)
    np.testing.assert_allclose(got, expected, atol=1e-8)
    # and it is a minimum: perturbing any parameter increases the squared error
    error = lambda m: ((_apply(m, src) - dst) ** 2).sum()
    for i, j in [(0, 0), (0, 1), (0, 2), (1, 2)]:
        for step in (1e-3, -1e-3):
            moved = got.copy()
            moved[i, j] += step
            if (i, j) == (0, 0):
                moved[1, 1] += step
            if (i, j) == (0, 1):
                moved[1, 0] -= step
            assert error(moved) > error(got)


def test_never_returns_a_reflection():
    src = ARCFACE_TEMPLATE.astype(np.float64)
    mirrored = src * [-1, 1]  # the best orthogonal fit would be a reflection
    matrix = similarity_transform(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_bad_shapes():
    with pytest.raises(ValueError):
        similarity_transform(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError):
        similarity_transform(np.ones((3, 2)), np.ones((3, 2)))  # degenerate source
    with pytest.raises(ValueError):
        align_face(np.zeros((50, 50, 3), np.uint8), np.zeros((4, 2)))


@pytest.mark.parametrize("size", [112, 64])
def test_landmarks_warp_onto_template(size):
    """A bright blob at each landmark of a rotated, scaled face lands on its (scaled) template point."""
    truth = _similarity(1.9, 17, 40, 10)  # template -> source image
    landmarks = _apply(truth, ARCFACE_TEMPLATE.astype(np.float64))
    ys, xs = np.mgrid[0:300, 0:300]
    template = ARCFACE_TEMPLATE * size / 112
    for (x, y), (tx, ty) in zip(landmarks, template):
        blob = 255 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 4.0**2))
        image = np.repeat(blob[..., None], 3, axis=2).astype(np.float32)
        face = align_face(image, landmarks, size=size)[..., 0]
        assert face.shape == (size, size)
        fy, fx = np.mgrid[0:size, 0:size]
        cx, cy = (face * fx).sum() / face.sum(), (face * fy).sum() / face.sum()
        assert abs(cx - tx) < 0.05 and abs(cy - ty) < 0.05, (cx, cy, tx, ty)


def test_outside_pixels_are_black():
    image = np.full((60, 60, 3), 200, np.uint8)
    big = ARCFACE_TEMPLATE * 2 - 60  # the crop covers source [-60, 164): the image fills crop [30, 60)
    face = align_face(image, big)
    assert (face[0, 0] == 0).all() and (face[100, 100] == 0).all() and (face[45, 45] == 200).all()


def test_crop_face_centre_square_and_box():
    image = np.zeros((50, 40, 3), np.uint8)
    image[5:45, :] = 255  # the centred 40x40 square is white, the 5-pixel bands above/below black
    assert (crop_face(image, 20) == 255).all()
    assert crop_face(image, 20, box=(0, 0, 40, 10)).mean() < 255
    with pytest.raises(ValueError):
        crop_face(image, 20, box=(0, 0, 41, 10))


def test_read_landmarks_csv(tmp_path):
    path = tmp_path / "marks.csv"
    path.write_text("image,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\na/1.jpg," + ",".join(map(str, range(10))) + "\n")
    marks = read_landmarks_csv(path)
    np.testing.assert_array_equal(marks["a/1.jpg"], np.arange(10).reshape(5, 2))
    path.write_text("a/1.jpg,1,2,3\n")
    with pytest.raises(ValueError, match="marks.csv:1"):
        read_landmarks_csv(path)
    with pytest.raises(FileNotFoundError):
        read_landmarks_csv(tmp_path / "missing.csv")
