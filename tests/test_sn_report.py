"""``run.py sn-report``: IN/LN/BN weights table, JSON and plot; ARGMAX accuracy change; non-SN models."""
import json

import numpy as np
import pytest

from backbones import hard_select, sn_mixture_weights
from data import generate_synthetic, load_bin
from eval.verification import evaluate
from facerec.cli import main
from tests.test_verify_cli import SIZE, reference_embeddings, save_tiny_checkpoint


def test_sn_report_weights_plot_and_argmax(tmp_path, capsys):
    model = save_tiny_checkpoint(tmp_path / "sn.pt", seed=6)
    generate_synthetic(tmp_path / "synth", identities=1, images_per_identity=2, size=SIZE, seed=3,
                       verify_pairs=20, workers=1, progress=False)
    out_dir = tmp_path / "report"
    code = main(["sn-report", "--checkpoint", str(tmp_path / "sn.pt"), "--output-dir", str(out_dir),
                 "--dataset", str(tmp_path / "synth" / "synth.bin"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    layers = sn_mixture_weights(model)
    report = json.loads((out_dir / "sn_weights.json").read_text())
    assert [layer["name"] for layer in report["layers"]] == [layer["name"] for layer in layers]
    for got, expected in zip(report["layers"], layers):
        np.testing.assert_allclose(got["mean"], expected["mean"], rtol=1e-6)
        np.testing.assert_allclose(got["var"], expected["var"], rtol=1e-6)
        assert abs(sum(got["mean"]) - 1) < 1e-5
    first = layers[0]
    assert f"{first['mean'][0]:.3f}" in out and first["name"] in out and "largest weight per layer" in out
    assert (out_dir / "sn_weights.png").read_bytes()[:4] == b"\x89PNG"
    images, issame = load_bin(tmp_path / "synth" / "synth.bin")
    soft = evaluate(*reference_embeddings(model, images)[:1], issame)["accuracy"]
    hard = evaluate(*reference_embeddings(hard_select(model), images)[:1], issame)["accuracy"]
    verification = report["verification"]
    assert verification["sn"]["synth"]["accuracy"] == pytest.approx(soft)
    assert verification["argmax"]["synth"]["accuracy"] == pytest.approx(hard)
    assert f"ARGMAX changes accuracy by {100 * (hard - soft):+.2f} points" in out


def test_sn_report_without_sn_layers(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path / "bn.pt", norm="bn")
    code = main(["sn-report", "--checkpoint", str(tmp_path / "bn.pt"), "--output-dir", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no Switchable Normalization layers" in err and "'bn'" in err
    assert not (tmp_path / "r").exists()


def test_sn_report_plot_shows_term_weights(tmp_path):
    from eval.report import format_sn_table, write_sn_png

    layers = [{"name": "a", "terms": ("IN", "LN", "BN"), "mean": [0.7, 0.2, 0.1], "var": [0.1, 0.1, 0.8]},
              {"name": "b", "terms": ("IN", "LN"), "mean": [0.5, 0.5], "var": [0.25, 0.75]}]
    table = format_sn_table(layers).splitlines()
    assert table[2].split() == ["0", "a", "0.700", "0.200", "0.100", "0.100", "0.100", "0.800"]
    assert table[3].split() == ["1", "b", "0.500", "0.500", "-", "0.250", "0.750", "-"]
    write_sn_png(tmp_path / "w.png", layers)
    import matplotlib.image

    pixels = matplotlib.image.imread(tmp_path / "w.png")
    assert pixels.shape[0] > 100 and pixels.std() > 0.05  # a real picture, not a blank canvas
