"""Nearest-prototype painting: the palette (class hue, prototype shade), ``paint_prototypes``, and
``demo/demo.py --paint-prototypes`` on the ProtoSeg quick config with random weights."""

import colorsys
import os

import numpy as np
import pytest
import torch
from PIL import Image

from seg_methods.engine.visualization import paint_prototypes, prototype_palette
from repo_scripts import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(REPO, "configs", "quick_schedules")


def _load_demo():
    return load_script("demo/demo.py", "seg_demo")


def test_palette_class_hue_and_prototype_shade():
    c, m = 8, 3
    pal = prototype_palette(c, m)
    assert pal.shape == (c * m, 3) and pal.dtype == np.uint8
    assert len({tuple(p) for p in pal}) == c * m  # every (class, prototype) distinct
    hsv = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in pal]).reshape(c, m, 3)
    # one hue per class (up to uint8 rounding), different between classes
    assert np.abs(hsv[:, :, 0] - hsv[:, :1, 0]).max() < 0.01
    assert len(np.unique(np.round(hsv[:, 0, 0], 2))) == c
    # shade (HSV value) grows with the prototype index
    assert (np.diff(hsv[:, :, 2], axis=1) > 0.1).all()


def test_paint_prototypes_lookup_blend_and_errors():
    ids = torch.tensor([[0, 5], [3, 2]])
    pal = prototype_palette(2, 3)
    painted = paint_prototypes(ids, 2, 3)
    assert painted.shape == (2, 2, 3)
    assert (painted[0, 1] == pal[5]).all() and (painted[1, 0] == pal[3]).all()
    image = np.full((2, 2, 3), 100, np.uint8)
    blended = paint_prototypes(ids, 2, 3, image=image)
    assert (blended[0, 0] == (pal[0].astype(int) + 100) // 2).all()
    with pytest.raises(ValueError, match="prototype_index"):
        paint_prototypes(torch.tensor([[6]]), 2, 3)


def test_demo_paints_prototypes(tmp_path, capsys):
    demo = _load_demo()
    rng = np.random.default_rng(0)
    img = tmp_path / "in" / "a.png"
    img.parent.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(img)
    cfg = os.path.join(QUICK, "protoseg_synthetic_semantic_instant_test.yaml")
    out = tmp_path / "out"
    argv = ["--config-file", cfg, "--input", str(img), "--output", str(out), "--random-weights"]
    argv += ["--paint-prototypes", "INPUT.MIN_SIZE_TEST", "0"]  # keep the 40x56 size
    result = demo.main(argv)
    proto = out / "a.prototypes.png"
    assert str(proto) in result.written and (out / "a.png").exists()
    painted = np.asarray(Image.open(proto))
    assert painted.shape == (40, 56, 3)
    # every pixel has a palette colour of the quick config (8 classes x 3 prototypes)
    pal = {tuple(p) for p in prototype_palette(8, 3)}
    assert {tuple(p) for p in painted.reshape(-1, 3)} <= pal
    assert "painted nearest prototypes" in capsys.readouterr().out


def test_demo_paint_prototypes_needs_protoseg(tmp_path):
    demo = _load_demo()
    cfg = os.path.join(QUICK, "per_pixel_deeplabv3plus_synthetic_semantic_instant_test.yaml")
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    argv = ["--config-file", cfg, "--input", str(img), "--output", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="--paint-prototypes needs a ProtoSeg model"):
        demo.main(argv + ["--random-weights", "--paint-prototypes"])
