"""data.augment: each jitter does what it says, draws are seeded, probabilities hold, off is today's path."""
import cv2
import numpy as np
import pytest
import torch

from data.augment import (
    Augment,
    adjust_colour,
    erase_rectangle,
    gaussian_blur,
    jpeg_roundtrip,
    to_grayscale,
    warp_crop,
)
from data.datasets import FaceFolderDataset
from data.images import encode_image
from data.loader import build_loader
from facerec.config import ConfigError, defaults, load_config
from facerec.distributed import DistInfo
from facerec.train import build_dataset, build_run

ON = {"scale": {"p": 1.0, "max": 0.2}, "rotate": {"p": 1.0, "max": 20.0}, "shift": {"p": 1.0, "max": 0.1},
      "colour": {"p": 1.0, "brightness": 0.3, "contrast": 0.3, "saturation": 0.3}, "grayscale": {"p": 1.0},
      "blur": {"p": 1.0, "sigma": [0.5, 1.5]}, "jpeg": {"p": 1.0, "quality": [30, 90]},
      "erase": {"p": 1.0, "area": [0.05, 0.3]}}


def _square(size=32, side=8, right=0):
    """A white square on black, centred, or ``right`` px right of the image centre."""
    image = np.zeros((size, size, 3), np.uint8)
    start = (size - side) // 2
    image[start:start + side, start + right:start + right + side] = 255
    return image


def _texture(seed=0, size=16):
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), (size, size),
                      interpolation=cv2.INTER_CUBIC)


def _area_and_centre(image):
    mask = image[..., 0].astype(np.float64) / 255
    ys, xs = np.indices(mask.shape)
    return mask.sum(), (mask * xs).sum() / mask.sum(), (mask * ys).sum() / mask.sum()


def test_warp_crop_resizes_and_moves_the_crop():
    area, x, y = _area_and_centre(_square())
    zoomed, zx, zy = _area_and_centre(warp_crop(_square(), 1.5, 0.0, 0.0, 0.0))
    assert zoomed == pytest.approx(area * 1.5**2, rel=0.02) and (zx, zy) == pytest.approx((x, y), abs=0.01)
    moved, mx, my = _area_and_centre(warp_crop(_square(), 1.0, 0.0, 0.25, -0.125))
    assert moved == pytest.approx(area, rel=1e-6) and (mx - x, my - y) == pytest.approx((8, -4), abs=0.01)
    assert warp_crop(_square(), 0.5, 0.0, 0, 0)[0, 0].tolist() == [0, 0, 0]  # uncovered border is black


@pytest.mark.parametrize(("degrees", "offset"), [(90.0, (0, -16)), (-90.0, (0, 16)), (180.0, (-16, 0))])
def test_warp_crop_turns_the_crop_counter_clockwise_about_its_centre(degrees, offset):
    """A square right of the centre goes above it at 90 degrees (image rows grow downwards)."""
    area, x, y = _area_and_centre(_square(64, 8, right=16))
    turned, tx, ty = _area_and_centre(warp_crop(_square(64, 8, right=16), 1.0, degrees, 0.0, 0.0))
    assert turned == pytest.approx(area, rel=1e-6)
    assert (tx - 31.5, ty - 31.5) == pytest.approx(offset, abs=0.01)
    assert (x - 31.5, y - 31.5) == pytest.approx((16, 0), abs=0.01)


def test_colour_factors():
    image = _texture()
    assert np.array_equal(adjust_colour(image, 1.0, 1.0, 1.0), image)
    brighter = adjust_colour(image // 2, 1.5, 1.0, 1.0).astype(float)
    assert brighter.mean() == pytest.approx((image // 2).mean() * 1.5, abs=0.5)
    flat = adjust_colour(image, 1.0, 0.0, 1.0)
    assert flat.std() <= 0.5  # no contrast: every pixel at the mean gray
    gray = adjust_colour(image, 1.0, 1.0, 0.0).astype(int)
    assert np.abs(gray - gray[..., :1]).max() <= 1  # no saturation: R = G = B
    assert np.abs(gray[..., 0] - cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)).max() <= 1


def test_grayscale_blur_and_jpeg():
    image = _texture(size=32)
    gray = to_grayscale(image)
    assert np.array_equal(gray[..., 0], cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    noisy = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    sharpness = [cv2.Laplacian(x, cv2.CV_64F).var() for x in (noisy, gaussian_blur(noisy, 1.0),
                                                            gaussian_blur(noisy, 2.0))]
    assert sharpness[0] > 4 * sharpness[1] > 4 * sharpness[2]
    smooth = _texture(size=64).astype(int)
    errors = [np.abs(jpeg_roundtrip(_texture(size=64), quality) - smooth).mean() for quality in (10, 95)]
    assert errors[0] > 2 * errors[1] > 0


def test_erase_rectangle_covers_the_area_in_mid_gray():
    image = np.zeros((40, 60, 3), np.uint8)
    erased = erase_rectangle(image, 0.25, 1.5, 0.0, 1.0)  # 30 x 20 px, at the left and bottom edges
    rows, cols = np.nonzero(erased[..., 0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 39, 0, 29)
    assert set(np.unique(erased)) == {0, 128} and not image.any()  # the input is left alone
    assert (erase_rectangle(image, 1.0, 1.5, 0.5, 0.5) == 128).all()
    band = erase_rectangle(image, 1.0, 9.0, 0.5, 0.5)  # 147 x 16 px: the width capped at the image's
    assert (band[12:28] == 128).all() and not band[:12].any() and not band[28:].any()


def test_augment_draws_within_the_ranges():
    area = _area_and_centre(_square(64, 16))[0]
    augment = Augment(scale={"p": 1.0, "max": 0.2})
    rng = np.random.default_rng(0)
    ratios = np.array([_area_and_centre(augment(_square(64, 16), rng))[0] / area for _ in range(40)])
    assert ratios.min() < 0.8 and ratios.max() > 1.2
    assert (ratios > 0.8**2 * 0.97).all() and (ratios < 1.2**2 * 1.03).all()
    erase = Augment(erase={"p": 1.0, "area": [0.1, 0.2]})
    erased = np.array([(erase(_square(64, 0), rng) == 128).all(-1).mean() for _ in range(40)])
    assert erased.min() > 0.1 * 0.9 and erased.max() < 0.2 * 1.1 and erased.max() - erased.min() > 0.05
    rotate = Augment(rotate={"p": 1.0, "max": 30.0})
    centres = [_area_and_centre(rotate(_square(64, 8, right=16), rng))[1:] for _ in range(40)]
    degrees = np.degrees([np.arctan2(31.5 - cy, cx - 31.5) for cx, cy in centres])  # counter-clockwise
    assert degrees.min() < -20 and degrees.max() > 20 and np.abs(degrees).max() <= 30.5
    jpeg = Augment(jpeg={"p": 1.0, "quality": [40, 40]})
    assert np.array_equal(jpeg(_texture(), rng), jpeg_roundtrip(_texture(), 40))


def test_augment_is_reproducible_from_the_seed():
    augment = Augment(**ON)
    image = _texture(size=32)
    first = [augment(image, np.random.default_rng(5)) for _ in range(2)]
    other = augment(image, np.random.default_rng(6))
    assert np.array_equal(*first) and not np.array_equal(first[0], other)
    assert np.array_equal(image, _texture(size=32))  # the input is left alone


@pytest.mark.parametrize("name", list(ON))
def test_each_augmentation_fires_with_its_probability(name):
    augment = Augment(**{name: {**ON[name], "p": 0.25}})
    image, rng, draws = _texture(), np.random.default_rng(1), 800
    changed = sum(not np.array_equal(augment(image, rng), image) for _ in range(draws))
    assert abs(changed / draws - 0.25) < 0.08  # 5 standard deviations
    assert not Augment(**{name: {**ON[name], "p": 0.0}})


@pytest.mark.parametrize(("override", "message"), [
    ("data.augment.blur.p=1.5", "data.augment.blur.p must be a number in [0, 1], got 1.5"),
    ("data.augment.jpeg.quality=[90,30]", "data.augment.jpeg.quality must be a pair [lo, hi] with 1 <= lo"),
    ("data.augment.jpeg.quality=[0,30]", "data.augment.jpeg.quality must be a pair [lo, hi] with 1 <= lo"),
    ("data.augment.blur.sigma=1", "data.augment.blur.sigma must be a pair [lo, hi]"),
    ("data.augment.erase.area=[0.3,1.5]", "data.augment.erase.area must be a pair [lo, hi] with 0.01 <= lo"),
    ("data.augment.scale.max=-0.1", "data.augment.scale.max must be a number in [0, 0.9], got -0.1"),
    ("data.augment.rotate.max=60", "data.augment.rotate.max must be a number in [0, 45], got 60"),
    ("data.augment.hue.p=1", "unknown key 'data.augment.hue'; allowed: scale, rotate, shift, colour"),
    ("data.augment.colour.p=often", "data.augment.colour.p must be a number, got str 'often'"),
])
def test_bad_augment_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_augment_refuses_missing_keys_when_built_directly():
    with pytest.raises(ValueError, match="blur takes the keys p, sigma; got p"):
        Augment(blur={"p": 0.5})


def _folder(root, identities=2, images=4):
    for label in range(identities):
        (root / f"id{label}").mkdir(parents=True)
        for n in range(images):
            (root / f"id{label}" / f"{n}.png").write_bytes(encode_image(_texture(10 * label + n), ext=".png"))
    return root


def _epoch(dataset, seed):
    return torch.cat([images for images, _ in build_loader(dataset, batch_size=4, num_workers=2, seed=seed)])


def test_off_by_default_is_todays_dataset_and_on_runs_seeded_in_the_workers(tmp_path):
    root = _folder(tmp_path / "faces")
    assert not Augment(**defaults()["data"]["augment"])
    default = build_dataset(root, 16, True, defaults()["data"]["augment"])
    assert default.augment is None
    today = FaceFolderDataset(root, input_size=16, train=True)
    torch.manual_seed(3)  # both open their flip generator from this seed on first use
    assert all(torch.equal(default[i][0], today[i][0]) for i in range(len(today)))
    augmented = build_dataset(root, 16, True, ON)
    first, again = _epoch(augmented, 1), _epoch(augmented, 1)
    plain = torch.stack([today[i][0] for i in range(len(today))])
    assert torch.equal(first, again) and not any(torch.equal(image, p) for image in first for p in plain)


def test_trainer_builds_its_dataset_with_the_config_augmentation(tmp_path):
    root = _folder(tmp_path / "faces")
    config = load_config(None, [f"data.train={root}", "data.num_workers=0", "train.device=cpu",
                                "model.name=iresnet18", "model.width=8", "model.input_size=16",
                                "train.batch_size=4", f"train.output_dir={tmp_path / 'run'}",
                                "data.augment.grayscale.p=0.5"])
    parts = build_run(config, DistInfo(0, 1, 0, torch.device("cpu")))
    assert parts.dataset.augment.settings == {"grayscale": {"p": 0.5}}
