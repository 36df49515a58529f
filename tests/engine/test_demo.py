"""demo/demo.py on the CPU with the tiny oracle model of conftest.py."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from seg_methods.engine import Trainer, build_checkpointer, build_predictor
from seg_methods.utils.checkpoint import RandomWeightsError
from repo_scripts import load_script


def _load_demo():
    return load_script("demo/demo.py", "seg_demo")


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
    result = demo.main(
        ["--config-file", cfg_file, "--input", folder, "--output", str(out), "--confidence", "0.3"]
        + ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"]
    )
    written = result.written
    assert result.failed == []
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
    ).written
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


def _image(path, H, W, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((H, W, 3), value, np.uint8)).save(path)


def test_demo_refuses_random_weights_unless_asked(demo_setup, tmp_path):
    cfg_file, weights, records, _ = demo_setup
    demo = _load_demo()
    argv = ["--config-file", cfg_file, "--input", records[0]["file_name"]]
    argv += ["--output", str(tmp_path / "r")]
    with pytest.raises(RandomWeightsError, match="MODEL.WEIGHTS is empty.*--random-weights"):
        demo.main(argv)
    assert not (tmp_path / "r").exists()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        demo.main(argv + ["MODEL.WEIGHTS", str(tmp_path / "nope.pth")])
    result = demo.main(argv + ["--random-weights"])
    assert len(result.written) == 1 and os.path.isfile(result.written[0])


def test_demo_skips_unreadable_images_and_counts_them(demo_setup, tmp_path, capsys):
    cfg_file, weights, _, (H, W) = demo_setup
    folder = tmp_path / "imgs"
    _image(str(folder / "a.png"), H, W)
    _image(str(folder / "c.png"), H, W, 200)
    (folder / "b.jpg").write_bytes(b"this is not an image")
    good = (folder / "c.png").read_bytes()
    (folder / "d.png").write_bytes(good[: len(good) // 3])  # truncated
    demo = _load_demo()
    argv = ["--config-file", cfg_file, "--input", str(folder), "--output", str(tmp_path / "o")]
    argv += ["MODEL.WEIGHTS", weights]
    result = demo.main(argv)
    assert [os.path.basename(p) for p in result.written] == ["a.png", "c.png"]
    assert [os.path.basename(p) for p, _ in result.failed] == ["b.jpg", "d.png"]
    err = capsys.readouterr().err
    assert f"{folder / 'b.jpg'}: SKIPPED, cannot read the image" in err
    assert "2 of 4 image(s) could not be read and were skipped" in err
    assert demo.cli(argv) == 1  # the exit code of `python demo/demo.py` with failures
    (folder / "b.jpg").unlink()
    (folder / "d.png").unlink()
    assert demo.cli(argv) == 0


def test_demo_output_names_keep_extension_and_subfolders(demo_setup, tmp_path):
    cfg_file, weights, _, (H, W) = demo_setup
    folder = tmp_path / "imgs"
    _image(str(folder / "a.png"), H, W, 10)
    Image.fromarray(np.full((H, W, 3), 250, np.uint8)).save(str(folder / "a.jpg"))
    _image(str(folder / "x" / "s.png"), H, W)
    _image(str(folder / "y" / "s.png"), H, W)
    demo = _load_demo()
    out = tmp_path / "o"
    base = ["--config-file", cfg_file, "--output", str(out), "MODEL.WEIGHTS", weights]
    written = demo.main(["--input", str(folder)] + base).written
    assert sorted(os.path.relpath(p, out) for p in written) == ["a.jpg.png", "a.png"]
    # a.jpg (bright) and a.png (dark) did not overwrite each other
    drawn_jpg = np.asarray(Image.open(out / "a.jpg.png"))
    assert not np.array_equal(drawn_jpg, np.asarray(Image.open(out / "a.png")))
    # same file names in two folders: the sub-folders are mirrored
    written = demo.main(["--input", str(folder / "*" / "s.png")] + base).written
    assert sorted(os.path.relpath(p, out) for p in written) == ["x/s.png", "y/s.png"]
    assert demo.output_paths([str(folder / "a.jpg")], "o") == [os.path.join("o", "a.jpg.png")]
    # the same image given twice is drawn once
    assert demo.expand_inputs([str(folder / "a.png"), str(folder)]) == [
        str(folder / "a.png"),
        str(folder / "a.jpg"),
    ]
