"""Trainer end to end on the CPU with the tiny dataset and models of conftest.py."""

import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from seg_methods.utils.checkpoint import SegCheckpointer
from seg_methods.engine import (
    TRAINING_LOG_FILE,
    Trainer,
    build_checkpointer,
    evaluate_checkpoint,
    setup,
)


def _read_metrics(cfg):
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        return json.load(f)


def test_train_two_iterations_then_eval_writes_metrics_and_drawings(engine_cfg, tiny_hw):
    H, W = tiny_hw
    trainer = Trainer(engine_cfg)
    trainer.resume_or_load(resume=False)
    w0 = trainer.model.conv.weight.detach().clone()
    results = trainer.train()

    assert trainer.iter == 2 and trainer.model.calls >= 2
    assert not torch.equal(w0, trainer.model.conv.weight)  # the optimizer stepped
    # the oracle returns the ground truth: every metric is exactly 100
    metrics = _read_metrics(engine_cfg)
    assert set(metrics) == {"panoptic_seg", "sem_seg", "segm"}
    assert metrics["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert metrics["panoptic_seg"]["PQ_st"] == pytest.approx(100.0)
    assert metrics["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert metrics["sem_seg"]["IoU-square"] == pytest.approx(100.0)
    assert metrics["segm"]["AP"] == pytest.approx(100.0)
    assert metrics["segm"]["APl"] is None  # no large object: non-finite -> null
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100.0)

    # drawings: ground truth | panoptic | instances | semantic, small images enlarged so that
    # the longer side is 512 (x16 here)
    vis = sorted(os.listdir(os.path.join(engine_cfg.OUTPUT_DIR, "vis")))
    assert vis == ["000_000000.png", "001_000001.png"]
    img = np.asarray(Image.open(os.path.join(engine_cfg.OUTPUT_DIR, "vis", vis[0])))
    assert img.shape == (16 * H, 4 * 16 * W, 3)

    # detectron2's per-iteration log is JSON lines in its own file; checkpoints were written
    with open(os.path.join(engine_cfg.OUTPUT_DIR, TRAINING_LOG_FILE)) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    assert lines[0]["iteration"] == 1 and "loss_ce" in lines[0] and "eta_seconds" not in lines[0]
    assert any("panoptic_seg/PQ" in line for line in lines)
    assert os.path.isfile(os.path.join(engine_cfg.OUTPUT_DIR, "model_final.pth"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(engine_cfg.OUTPUT_DIR))


def test_trainer_uses_the_project_checkpointer(engine_cfg):
    engine_cfg.DATASETS.TEST = ()
    trainer = Trainer(engine_cfg)
    assert type(trainer.checkpointer) is SegCheckpointer
    periodic = [h for h in trainer._hooks if hasattr(h, "checkpointer")]
    assert periodic and all(h.checkpointer is trainer.checkpointer for h in periodic)


def test_nan_loss_stops_training_with_the_iteration(engine_cfg):
    engine_cfg.MODEL.META_ARCHITECTURE = "EngineTestNaN"
    engine_cfg.SOLVER.MAX_ITER = 4
    trainer = Trainer(engine_cfg)
    with pytest.raises(FloatingPointError, match=r"NaN or infinite at iteration 1\b") as e:
        trainer.train()
    assert "iteration=1" in str(e.value)  # detectron2's own message is kept
    assert trainer.iter == 1
    # no evaluation after a failed run
    assert not os.path.exists(os.path.join(engine_cfg.OUTPUT_DIR, "metrics.json"))


def test_amp_config_trains_in_float32_on_cpu(engine_cfg):
    engine_cfg.SOLVER.AMP.ENABLED = True
    engine_cfg.DATASETS.TEST = ()
    engine_cfg.freeze()
    trainer = Trainer(engine_cfg)
    assert trainer.cfg.SOLVER.AMP.ENABLED is False and engine_cfg.SOLVER.AMP.ENABLED is True
    trainer.train()
    assert trainer.iter == 2


def test_nan_at_the_last_iteration_does_not_evaluate(engine_cfg):
    engine_cfg.MODEL.META_ARCHITECTURE = "EngineTestNaN"
    engine_cfg.SOLVER.MAX_ITER = 2  # NaN at iteration 1 = the last one
    with pytest.raises(FloatingPointError, match="iteration 1"):
        Trainer(engine_cfg).train()
    assert not os.path.exists(os.path.join(engine_cfg.OUTPUT_DIR, "metrics.json"))


def test_resume_continues_the_iteration_counter(engine_cfg):
    engine_cfg.DATASETS.TEST = ()
    engine_cfg.SOLVER.CHECKPOINT_PERIOD = 1
    first = Trainer(engine_cfg)
    first.resume_or_load(resume=False)
    first.train()
    out = engine_cfg.OUTPUT_DIR
    assert os.path.isfile(os.path.join(out, "model_0000000.pth"))
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    weights_after_first = first.model.conv.weight.detach().clone()

    cfg = engine_cfg.clone()
    cfg.SOLVER.MAX_ITER = 4
    second = Trainer(cfg)
    second.resume_or_load(resume=True)
    assert second.start_iter == 2
    assert torch.equal(second.model.conv.weight, weights_after_first)
    second.train()
    assert second.iter == 4
    assert second.model.calls == 2  # iterations 2 and 3 only
    for it in (2, 3):
        assert os.path.isfile(os.path.join(out, f"model_{it:07d}.pth"))
    ckpt = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 3
    # the LR schedule continued too: poly lr at iteration 3 of 4 (stepped 4 times)
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_eval_only_loads_weights_and_writes_metrics(engine_cfg):
    model = Trainer.build_model(engine_cfg)
    with torch.no_grad():
        model.conv.weight.fill_(0.5)
    os.makedirs(engine_cfg.OUTPUT_DIR)
    build_checkpointer(model, save_dir=engine_cfg.OUTPUT_DIR).save("weights")
    engine_cfg.MODEL.WEIGHTS = os.path.join(engine_cfg.OUTPUT_DIR, "weights.pth")
    engine_cfg.TEST.INSTANCE_ON = False
    results = evaluate_checkpoint(engine_cfg)
    assert set(results) == {"panoptic_seg", "sem_seg"}
    assert _read_metrics(engine_cfg)["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert len(os.listdir(os.path.join(engine_cfg.OUTPUT_DIR, "vis"))) == 2

    engine_cfg.MODEL.WEIGHTS = os.path.join(engine_cfg.OUTPUT_DIR, "missing.pth")
    with pytest.raises(AssertionError, match="missing.pth"):
        evaluate_checkpoint(engine_cfg)


def test_setup_merges_file_and_opts_and_falls_back_to_cpu(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "SOLVER:\n  BASE_LR: 0.5\nINPUT:\n  DATASET_MAPPER_NAME: coco_panoptic_lsj\n"
    )
    out = tmp_path / "out"
    args = argparse.Namespace(
        config_file=str(cfg_file),
        opts=[
            "OUTPUT_DIR",
            str(out),
            "SEED",
            "3",
            "MODEL.DEVICE",
            "cuda",
            "SOLVER.AMP.ENABLED",
            "True",
        ],
        eval_only=False,
        resume=False,
    )
    cfg = setup(args)
    assert cfg.is_frozen()
    assert cfg.SOLVER.BASE_LR == 0.5 and cfg.INPUT.DATASET_MAPPER_NAME == "coco_panoptic_lsj"
    assert cfg.SEED == 3 and cfg.OUTPUT_DIR == str(out)
    assert cfg.MODEL.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cfg.SOLVER.AMP.ENABLED == torch.cuda.is_available()  # AMPTrainer needs CUDA
    assert (out / "config.yaml").is_file()
    assert "MASK_CLS" in cfg.MODEL  # seg_methods keys present


def test_setup_refuses_python_tags_in_yaml(tmp_path):
    cfg_file = tmp_path / "unsafe.yaml"
    cfg_file.write_text("SOLVER:\n  BASE_LR: !!python/object/apply:eval ['0.1']\n")
    args = argparse.Namespace(config_file=str(cfg_file), opts=[], eval_only=False, resume=False)
    with pytest.raises(Exception, match="python/object/apply"):
        setup(args)
