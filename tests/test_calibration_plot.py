"""mllmcal.plot: every plot renders to PNG and SVG files that are real images."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

import mllmcal


def pairs(n=3000, seed=0, power=2.0):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, generator=g) * 0.7 + 0.3  # leaves the low bins empty
    y = torch.rand(n, generator=g) < c**power
    return c, y


def check_png(path, min_bytes=5000):
    assert path.exists() and path.stat().st_size > min_bytes
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 200
        # Not a blank canvas: a real plot has many distinct colours.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


def test_importing_mllmcal_does_not_import_matplotlib():
    code = "import sys, mllmcal; assert 'matplotlib' not in sys.modules; mllmcal.plot; assert 'matplotlib' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reliability_diagram_from_state_and_pairs(tmp_path):
    c, y = pairs()
    s = mllmcal.CalibrationState(15)
    s.update(c, y)
    p1 = mllmcal.plot.reliability_diagram(s, tmp_path / "rel.png")
    p2 = mllmcal.plot.reliability_diagram((c, y), tmp_path / "sub" / "rel.svg", n_bins=10)
    check_png(p1)
    svg = p2.read_text()
    assert p2.stat().st_size > 5000 and svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "ECE" in svg  # the legend text


def test_confidence_histogram_risk_coverage_and_temperature_comparison(tmp_path):
    c, y = pairs(seed=1)
    check_png(mllmcal.plot.confidence_histogram((c, y), tmp_path / "hist.png"))
    check_png(mllmcal.plot.risk_coverage_plot(c, y, tmp_path / "rc.png"))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2000, 10, generator=g) * 4
    lab = torch.multinomial(torch.softmax(x / 2, -1), 1, generator=g).squeeze(1)
    t = mllmcal.fit_temperature(x, lab)
    before, after = mllmcal.CalibrationState(), mllmcal.CalibrationState()
    before.update_logits(x, lab)
    after.update_logits(x, lab, temperature=t)
    assert after.ece() < before.ece()
    check_png(mllmcal.plot.temperature_comparison(before, after, tmp_path / "ts.png", temperature=t))


def test_plot_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        mllmcal.plot.reliability_diagram(pairs(), tmp_path / "rel.jpg")
    with pytest.raises(ValueError, match="empty"):
        mllmcal.plot.reliability_diagram(mllmcal.CalibrationState(), tmp_path / "rel.png")
    with pytest.raises(TypeError, match="CalibrationState or a"):
        mllmcal.plot.reliability_diagram(42, tmp_path / "rel.png")
