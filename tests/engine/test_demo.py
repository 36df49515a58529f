"""demo/demo.py on the CPU with the tiny oracle model of conftest.py."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from seg_methods.engine import Trainer, build_checkpointer, build_predictor

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_demo():
    spec = importlib.util.spec_from_file_location("seg_demo", os.path.join(REPO, "demo", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def demo_setup(engine_cfg, tiny_dataset, tiny_hw, tmp_path):
    """A config file and a checkpoint whose conv predicts class = argmax of the RGB channels."""
    engine_cfg.INPUT.MIN_SIZE_TEST = 0  # keep the original size
    model = Trainer.build_model(engine_cfg)
    with torch.no_grad():
        model.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        model.conv.bias.zero_()
    build_checkpointer(model, save_dir=str(tmp_path)).save("w")
    cfg_file = tmp_path / "demo.yaml"
    cfg_file.write_text(engine_cfg.dump())
    records, _ = tiny_dataset["val"]
    return str(cfg_file), str(tmp_path / "w.pth"), records, tiny_hw


def test_demo_draws_every_input_with_loaded_weights(demo_setup, tmp_path, capsys):
    cfg_file, weights, records, (H, W) = demo_setup
    folder = os.path.dirname(records[0]["file_name"])
    out = tmp_path / "vis"
    demo = _load_demo()
    written = demo.main(
        ["--config-file", cfg_file, "--input", folder, "--output", str(out), "--confidence", "0.3"]
        + ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"]
    )
    assert [os.path.basename(p) for p in written] == ["000000.png", "000001.png", "000002.png"]
    for p in written:
        assert np.asarray(Image.open(p)).shape == (H, W, 3)
    printed = capsys.readouterr().out
    assert (
        printed.count(" s, outputs ['panoptic_seg', 'instances', 'sem_seg'], drew panoptic_seg")
        == 3
    )


def test_demo_glob_and_missing_input(demo_setup, tmp_path):
    cfg_file, weights, records, _ = demo_setup
    folder = os.path.dirname(records[0]["file_name"])
    demo = _load_demo()
    written = demo.main(
        ["--config-file", cfg_file, "--input", os.path.join(folder, "00000[01].png")]
        + ["--output", str(tmp_path / "g"), "--opts", "MODEL.WEIGHTS", weights]
    )
    assert len(written) == 2
    with pytest.raises(FileNotFoundError, match="nope.png"):
        demo.main(["--config-file", cfg_file, "--input", "nope.png", "--output", str(tmp_path)])


def test_build_predictor_loads_weights_with_the_project_checkpointer(demo_setup):
    cfg_file, weights, _, (H, W) = demo_setup
    from seg_methods.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(cfg_file)
    cfg.MODEL.WEIGHTS = weights
    predictor = build_predictor(cfg)
    assert torch.equal(predictor.model.conv.weight.view(3, 3), torch.eye(3))
    assert cfg.MODEL.WEIGHTS == weights  # the caller's config is untouched
    # predictions follow the loaded weights: a pure red image is class 0 everywhere
    red_bgr = np.zeros((H, W, 3), np.uint8)
    red_bgr[..., 2] = 255
    out = predictor(red_bgr)
    assert (out["sem_seg"].argmax(0) == 0).all()
