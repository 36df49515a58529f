"""Trainer end to end on the CPU with the tiny dataset and models of conftest.py."""

import argparse
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.engine import default_argument_parser

from seg_methods.engine import (
    TRAINING_LOG_FILE,
    Trainer,
    build_checkpointer,
    evaluate_checkpoint,
    setup,
)
from seg_methods.engine.trainer import add_weights_arguments
from seg_methods.engine.visualization import title_band_height
from seg_methods.utils.checkpoint import (
    CheckpointMismatchError,
    CheckpointReadError,
    NonFiniteWeightsError,
    RandomWeightsError,
    SegCheckpointer,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_train_net():
    spec = importlib.util.spec_from_file_location(
        "seg_train_net_test", os.path.join(REPO, "train_net.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    # the longer side is 512 (x16 here), each panel under a title band
    vis = sorted(os.listdir(os.path.join(engine_cfg.OUTPUT_DIR, "vis")))
    assert vis == ["000_000000.png", "001_000001.png"]
    img = np.asarray(Image.open(os.path.join(engine_cfg.OUTPUT_DIR, "vis", vis[0])))
    assert img.shape == (16 * H + title_band_height(16 * H), 4 * 16 * W, 3)

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
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        evaluate_checkpoint(engine_cfg)
    # a wrong path is an error even when random weights are allowed
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        evaluate_checkpoint(engine_cfg, allow_random_weights=True)


def test_eval_only_refuses_random_weights_unless_asked(engine_cfg):
    engine_cfg.MODEL.WEIGHTS = ""
    engine_cfg.TEST.NUM_VIS_IMAGES = 0
    for resume in (False, True):  # --resume with nothing to resume from: same
        with pytest.raises(RandomWeightsError, match=r"MODEL.WEIGHTS is empty.*--random-weights"):
            evaluate_checkpoint(engine_cfg, resume=resume)
    assert not os.path.exists(os.path.join(engine_cfg.OUTPUT_DIR, "metrics.json"))
    results = evaluate_checkpoint(engine_cfg, allow_random_weights=True)
    assert "sem_seg" in results


def test_train_net_flags(engine_cfg, tmp_path):
    train_net = _load_train_net()
    engine_cfg.MODEL.WEIGHTS = ""
    engine_cfg.TEST.NUM_VIS_IMAGES = 0
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(engine_cfg.dump())
    parser = add_weights_arguments(default_argument_parser())
    args = parser.parse_args(["--config-file", str(cfg_file), "--eval-only"])
    with pytest.raises(RandomWeightsError, match="--random-weights"):
        train_net.main(args)
    args = parser.parse_args(["--config-file", str(cfg_file), "--eval-only", "--random-weights"])
    assert "sem_seg" in train_net.main(args)
    args = parser.parse_args(["--config-file", str(cfg_file), "--resume", "--resume-fallback"])
    assert args.resume_fallback and not args.random_weights


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


# ------------------------------------------------------------------ resume and bad checkpoints
def _train_with_checkpoints(cfg):
    """2 iterations with a checkpoint every iteration: model_0000000/1.pth, model_final.pth."""
    cfg = cfg.clone()
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 1
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


@pytest.fixture
def wider_arch():
    """EngineTestOracle with one more layer (other keys than the oracle's checkpoints)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    name = "EngineTestOracleWider"
    if name not in META_ARCH_REGISTRY:
        base = META_ARCH_REGISTRY.get("EngineTestOracle")

        class EngineTestOracleWider(base):
            def __init__(self, cfg):
                super().__init__(cfg)
                self.extra = torch.nn.Conv2d(3, 3, 1)

        META_ARCH_REGISTRY.register(EngineTestOracleWider)
    return name


def test_resume_into_another_models_folder_names_the_file(engine_cfg, wider_arch):
    _train_with_checkpoints(engine_cfg)
    last = os.path.join(engine_cfg.OUTPUT_DIR, "model_final.pth")

    other_keys = engine_cfg.clone()  # a model with a key the checkpoint lacks
    other_keys.MODEL.META_ARCHITECTURE = wider_arch
    trainer = Trainer(other_keys)
    w0 = trainer.model.conv.weight.detach().clone()
    with pytest.raises(CheckpointMismatchError) as e:
        trainer.resume_or_load(resume=True)
    msg = str(e.value)
    assert f"Cannot resume from '{last}'" in msg and "another model" in msg
    assert "extra.weight" in msg and e.value.missing_keys == ["extra.bias", "extra.weight"]
    assert torch.equal(trainer.model.conv.weight, w0)  # nothing was loaded
    # without --resume the same file initialises the shared layers (missing keys allowed)
    init = other_keys.clone()
    init.MODEL.WEIGHTS = last
    Trainer(init).resume_or_load(resume=False)

    other_shapes = engine_cfg.clone()  # same keys, other shapes
    other_shapes.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    with pytest.raises(CheckpointMismatchError, match=r"conv.weight: \(3, 3, 1, 1\) in checkpoint"):
        Trainer(other_shapes).resume_or_load(resume=True)


def test_resume_refuses_checkpoint_keys_the_model_lacks(engine_cfg, wider_arch):
    wider = engine_cfg.clone()
    wider.MODEL.META_ARCHITECTURE = wider_arch
    _train_with_checkpoints(wider)
    with pytest.raises(CheckpointMismatchError) as e:
        Trainer(engine_cfg).resume_or_load(resume=True)
    assert e.value.unexpected_keys == ["extra.bias", "extra.weight"]
    assert "not in the model" in str(e.value)


def test_resume_from_truncated_last_checkpoint_offers_the_previous_one(engine_cfg):
    first = _train_with_checkpoints(engine_cfg)
    out = engine_cfg.OUTPUT_DIR
    final = os.path.join(out, "model_final.pth")
    previous = os.path.join(out, "model_0000001.pth")
    _truncate(final)
    cfg = engine_cfg.clone()
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.MAX_ITER = 4

    with pytest.raises(CheckpointReadError) as e:
        Trainer(cfg).resume_or_load(resume=True)
    msg = str(e.value)
    assert f"the last checkpoint '{final}'" in msg and "truncated" in msg
    assert f"The earlier checkpoint '{previous}' exists" in msg
    assert f"echo model_0000001.pth > {os.path.join(out, 'last_checkpoint')}" in msg
    assert "--resume-fallback" in msg
    assert e.value.earlier == [previous, os.path.join(out, "model_0000000.pth")]

    # automatic fallback: model_0000001.pth holds iteration 1, so training goes on at 2
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True, fallback=True)
    assert trainer.start_iter == 2
    assert torch.equal(trainer.model.conv.weight, first.model.conv.weight)

    # the previous one truncated too: fall back further, to model_0000000.pth
    _truncate(previous)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True, fallback=True)
    assert trainer.start_iter == 1

    # the documented manual way works too
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000000.pth")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 1


def test_resume_with_nothing_readable_says_so(engine_cfg):
    engine_cfg.DATASETS.TEST = ()
    engine_cfg.SOLVER.MAX_ITER = 1
    engine_cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    Trainer(engine_cfg).train()  # model_final.pth only
    _truncate(os.path.join(engine_cfg.OUTPUT_DIR, "model_final.pth"))
    for fallback in (False, True):
        with pytest.raises(CheckpointReadError, match="No earlier model_XXXXXXX.pth exists"):
            Trainer(engine_cfg).resume_or_load(resume=True, fallback=fallback)


def test_non_finite_weights_are_refused_for_training_and_evaluation(engine_cfg):
    model = Trainer.build_model(engine_cfg)
    with torch.no_grad():
        model.conv.bias[1] = float("inf")
    os.makedirs(engine_cfg.OUTPUT_DIR)
    build_checkpointer(model, save_dir=engine_cfg.OUTPUT_DIR).save("diverged")
    engine_cfg.MODEL.WEIGHTS = os.path.join(engine_cfg.OUTPUT_DIR, "diverged.pth")
    with pytest.raises(NonFiniteWeightsError, match=r"diverged.pth.*\n.*conv.bias \(1 of 3"):
        Trainer(engine_cfg).resume_or_load(resume=False)
    with pytest.raises(NonFiniteWeightsError, match="conv.bias"):
        evaluate_checkpoint(engine_cfg)
