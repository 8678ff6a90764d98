"""The PNG writers draw off pyplot: a user's matplotlib backend and open figures stay as they were."""
import sys

import matplotlib
import matplotlib.image
import numpy as np
import pytest

from eval.report import write_roc_png, write_sn_png

LAYERS = [{"name": "a", "terms": ("IN", "LN", "BN"), "mean": [0.7, 0.2, 0.1], "var": [0.1, 0.1, 0.8]}]


@pytest.fixture
def svg_backend():
    """The backend a user chose (here: svg), restored afterwards."""
    before = matplotlib.rcParams["backend"]
    matplotlib.use("svg")
    yield
    matplotlib.rcParams["backend"] = before


def _open_figures() -> list:
    pyplot = sys.modules.get("matplotlib.pyplot")
    return [] if pyplot is None else pyplot.get_fignums()


def test_png_writers_leave_the_backend_and_pyplot_alone(tmp_path, svg_backend):
    figures = _open_figures()
    fpr = np.linspace(0, 1, 50)
    write_roc_png(tmp_path / "roc.png", {"model": (fpr, np.sqrt(fpr))})
    write_sn_png(tmp_path / "sn" / "w.png", LAYERS)
    assert matplotlib.rcParams["backend"] == "svg"
    assert _open_figures() == figures
    for path in (tmp_path / "roc.png", tmp_path / "sn" / "w.png"):
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 100 and pixels.std() > 0.05  # a real picture, not a blank canvas
