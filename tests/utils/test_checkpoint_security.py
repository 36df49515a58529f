"""A crafted weights file must never run code, whichever documented way loads it.

Each malicious file holds an object whose ``__reduce__`` would create a marker file when
unpickled (``os.system``, ``builtins.exec``, ``builtins.open``), saved as a plain pickle
(``.pkl``), a legacy ``torch.save`` file and a zip ``torch.save`` file (``.pth``). Every loading
path we document is tried: detectron2's ``DefaultPredictor``/``DetectionCheckpointer``/fvcore's
``Checkpointer`` after ``import seg_methods``, ``build_predictor``, ``Trainer.resume_or_load``,
``train_net.py`` (training from ``MODEL.WEIGHTS``, ``--resume``, ``--eval-only``),
``evaluate_checkpoint``, ``demo/demo.py`` and both converters in ``tools/``. The marker must
never appear and the error must name the file.
"""

import builtins
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor, default_argument_parser
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import Checkpointer as FvcoreCheckpointer
from iopath.common.file_io import PathHandler
from PIL import Image
from torch import nn

import seg_methods  # noqa: F401  (installs the safe loaders, as any user script does)
from seg_methods.config import get_cfg
from seg_methods.engine import Trainer, build_predictor, evaluate_checkpoint
from seg_methods.engine.trainer import add_weights_arguments
from seg_methods.utils.checkpoint import (
    CheckpointSecurityError,
    NonFiniteWeightsError,
    SegCheckpointer,
    install_safe_loaders,
    safe_loaders_installed,
)
from repo_scripts import load_script


# ------------------------------------------------------------------------------ payloads
class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _Open:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


PAYLOADS = {"system": _System, "exec": _Exec, "open": _Open}
FORMATS = ("pkl", "legacy.pth", "zip.pth")


def _write_evil(folder: Path, kind: str, fmt: str, model: nn.Module = None, name=None):
    """A weights file (the model's real weights, if given) plus one malicious object.

    Returns:
        (path, marker): the file and the marker file its payload would create.
    """
    marker = folder / f"PWNED_{kind}_{fmt.replace('.', '_')}"
    evil = PAYLOADS[kind](marker)
    if model is None:
        weights = {"w": np.zeros(3, np.float32)}
    else:
        weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if fmt == "pkl":
        path = folder / (name or f"evil_{kind}.pkl")
        data = {"model": weights, "__author__": "attacker", "matching_heuristics": False}
        data["payload"] = evil
        path.write_bytes(pickle.dumps(data, protocol=2))
    else:
        path = folder / (name or f"evil_{kind}_{fmt}")
        data = {"model": {k: torch.from_numpy(v) for k, v in weights.items()}, "payload": evil}
        torch.save(data, str(path), _use_new_zipfile_serialization=(fmt == "zip.pth"))
    return str(path), marker


def _assert_refused(excinfo, path, marker):
    assert not marker.exists(), f"the payload of {path} ran"
    assert os.path.basename(path) in str(excinfo.value), str(excinfo.value)


@pytest.fixture(params=[(k, f) for k in PAYLOADS for f in FORMATS], ids=lambda p: "-".join(p))
def evil(request):
    """(kind, format) of one malicious file."""
    return request.param


def test_payloads_do_run_with_plain_pickle(tmp_path):
    # The files are really malicious: plain unpickling creates the marker.
    for kind in PAYLOADS:
        path, marker = _write_evil(tmp_path, kind, "pkl")
        with open(path, "rb") as f:
            pickle.load(f)
        assert marker.exists(), kind


def test_import_installs_the_safe_loaders_idempotently():
    assert safe_loaders_installed()
    before = (DetectionCheckpointer._load_file, FvcoreCheckpointer._load_file)
    install_safe_loaders()
    install_safe_loaders()
    assert (DetectionCheckpointer._load_file, FvcoreCheckpointer._load_file) == before


# ---------------------------------------------------------------- checkpointer-level paths
@pytest.mark.parametrize(
    "loader",
    ["DetectionCheckpointer", "DetectionCheckpointer+query", "fvcore", "SegCheckpointer"],
)
def test_checkpointers_refuse(evil, loader, tmp_path, monkeypatch):
    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns torch.load's default into weights_only=False: our
    # loaders pass weights_only=True explicitly, so it must not matter.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    kind, fmt = evil
    path, marker = _write_evil(tmp_path, kind, fmt)
    model = nn.Linear(1, 3)
    with pytest.raises(Exception) as e:
        if loader == "DetectionCheckpointer":
            DetectionCheckpointer(model).load(path)
        elif loader == "DetectionCheckpointer+query":
            DetectionCheckpointer(model).load(path + "?matching_heuristics=True")
        elif loader == "fvcore":
            FvcoreCheckpointer(model).load(path)
        else:
            SegCheckpointer(model).load(path)
    _assert_refused(e, path, marker)


class _LocalTestHandler(PathHandler):
    """``sectest://local/<abs path>`` -> the local file: a PathManager handler like
    detectron2's ``detectron2://`` (model zoo) or HTTP ones, which download to a local file."""

    PREFIX = "sectest://local"

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path, **kwargs):
        return path[len(self.PREFIX) :]

    def _open(self, path, mode="r", **kwargs):
        return open(path[len(self.PREFIX) :], mode)

    def _isfile(self, path, **kwargs):
        return os.path.isfile(path[len(self.PREFIX) :])


@pytest.mark.parametrize("fmt", FORMATS)
def test_path_manager_urls(fmt, tmp_path):
    # model_zoo.get(..., trained=True) and "detectron2://..." weights go through PathManager
    # to a local file, then through DetectionCheckpointer._load_file.
    if _LocalTestHandler.PREFIX not in PathManager._path_handlers:
        PathManager.register_handler(_LocalTestHandler())
    path, marker = _write_evil(tmp_path, "system", fmt)
    for checkpointer in (DetectionCheckpointer(nn.Linear(1, 3)), SegCheckpointer(nn.Linear(1, 3))):
        with pytest.raises(CheckpointSecurityError) as e:
            checkpointer.load(_LocalTestHandler.PREFIX + path)
        _assert_refused(e, path, marker)


class _StorageBlob:
    """Pickles as ``torch.storage._load_from_bytes(blob)``, the form of tensors pickled with
    plain pickle; here the blob is a malicious ``torch.save`` file."""

    def __init__(self, blob):
        self.blob = blob

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.blob,))


def test_malicious_tensor_storage_nested_in_a_pkl(tmp_path):
    marker = tmp_path / "PWNED_nested"
    blob = io.BytesIO()
    torch.save({"x": _System(marker)}, blob)
    path = tmp_path / "nested.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": _StorageBlob(blob.getvalue())}, "a": 1}))
    for checkpointer in (DetectionCheckpointer(nn.Linear(1, 3)), SegCheckpointer(nn.Linear(1, 3))):
        with pytest.raises(CheckpointSecurityError) as e:
            checkpointer.load(str(path))
        _assert_refused(e, str(path), marker)


def test_pyth_through_detection_checkpointer(tmp_path):
    path, marker = _write_evil(tmp_path, "system", "zip.pth", name="evil.pyth")
    with pytest.raises(CheckpointSecurityError) as e:
        DetectionCheckpointer(nn.Linear(1, 3)).load(path)
    _assert_refused(e, path, marker)


def test_fresh_process_import_seg_methods_then_detectron2_loads(tmp_path):
    # What a user script does: import seg_methods, then use detectron2's own checkpointer.
    paths = [_write_evil(tmp_path, "system", fmt) for fmt in FORMATS]
    code = (
        "import sys, torch, seg_methods\n"
        "from detectron2.checkpoint import DetectionCheckpointer\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        DetectionCheckpointer(torch.nn.Linear(1, 3)).load(p)\n"
        "    except Exception as e:\n"
        "        print('REFUSED', type(e).__name__, p)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code] + [p for p, _ in paths],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for p, marker in paths:
        assert f"REFUSED CheckpointSecurityError {p}" in out.stdout, out.stdout
        assert not marker.exists()


# ---------------------------------------------------------------- model-level paths
class SecurityTestNet(nn.Module):
    """A tiny meta-architecture: a 1x1 conv, a loss in training, sem_seg at inference."""

    def __init__(self, cfg):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1), False)

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs):
        x = torch.stack([b["image"].float() for b in batched_inputs])
        logits = self.conv(x)
        if self.training:
            return {"loss_dummy": logits.mean()}
        return [{"sem_seg": logit} for logit in logits]


if "SecurityTestNet" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(SecurityTestNet)


@pytest.fixture
def net_cfg(tiny_synthetic, tmp_path):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SecurityTestNet"
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = (tiny_synthetic["panoptic_train"],)
    cfg.DATASETS.TEST = (tiny_synthetic["panoptic_val"],)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_panoptic"
    cfg.SOLVER.IMS_PER_BATCH = 1
    cfg.SOLVER.MAX_ITER = 1
    cfg.TEST.NUM_VIS_IMAGES = 0
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    return cfg


def _model_of(cfg):
    return SecurityTestNet(cfg)


def _with_weights(cfg, path):
    cfg = cfg.clone()
    cfg.MODEL.WEIGHTS = path
    return cfg


def test_default_predictor_after_import(evil, net_cfg, tmp_path):
    kind, fmt = evil
    path, marker = _write_evil(tmp_path, kind, fmt, _model_of(net_cfg))
    with pytest.raises(CheckpointSecurityError) as e:
        DefaultPredictor(_with_weights(net_cfg, path))
    _assert_refused(e, path, marker)


def test_build_predictor(evil, net_cfg, tmp_path):
    kind, fmt = evil
    path, marker = _write_evil(tmp_path, kind, fmt, _model_of(net_cfg))
    with pytest.raises(CheckpointSecurityError) as e:
        build_predictor(_with_weights(net_cfg, path))
    _assert_refused(e, path, marker)


@pytest.mark.parametrize("fmt", FORMATS)
def test_trainer_and_evaluate_checkpoint(fmt, net_cfg, tmp_path):
    path, marker = _write_evil(tmp_path, "system", fmt, _model_of(net_cfg))
    cfg = _with_weights(net_cfg, path)
    trainer = Trainer(cfg)
    with pytest.raises(CheckpointSecurityError) as e:
        trainer.resume_or_load(resume=False)  # training initialised from MODEL.WEIGHTS
    _assert_refused(e, path, marker)
    with pytest.raises(CheckpointSecurityError) as e:
        evaluate_checkpoint(cfg)
    _assert_refused(e, path, marker)


def _train_net_args(cfg_file, *flags_and_opts):
    parser = add_weights_arguments(default_argument_parser())
    return parser.parse_args(["--config-file", cfg_file] + list(flags_and_opts))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["train", "eval-only", "resume", "eval-only+resume"])
def test_train_net(fmt, mode, net_cfg, tmp_path):
    train_net = load_script("train_net.py", "seg_train_net")
    out = Path(net_cfg.OUTPUT_DIR)
    out.mkdir(parents=True)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(net_cfg.dump())
    if "resume" in mode:  # the evil file is the folder's "last checkpoint"
        path, marker = _write_evil(out, "system", fmt, _model_of(net_cfg), name="model_final.pth")
        (out / "last_checkpoint").write_text("model_final.pth")
        opts = ["--resume"]
    else:
        path, marker = _write_evil(tmp_path, "system", fmt, _model_of(net_cfg))
        opts = ["MODEL.WEIGHTS", path]
    if "eval-only" in mode:
        opts = ["--eval-only"] + opts
    with pytest.raises(CheckpointSecurityError) as e:
        train_net.main(_train_net_args(str(cfg_file), *opts))
    _assert_refused(e, path, marker)


def test_demo(evil, net_cfg, tmp_path):
    kind, fmt = evil
    demo = load_script("demo/demo.py", "seg_demo_security")
    path, marker = _write_evil(tmp_path, kind, fmt, _model_of(net_cfg))
    cfg_file = tmp_path / "demo.yaml"
    cfg_file.write_text(net_cfg.dump())
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    argv = ["--config-file", str(cfg_file), "--input", str(image), "--output", str(tmp_path / "v")]
    with pytest.raises(CheckpointSecurityError) as e:
        demo.main(argv + ["MODEL.WEIGHTS", path])
    _assert_refused(e, path, marker)
    assert not (tmp_path / "v").exists()


def test_converters(evil, tmp_path):
    kind, fmt = evil
    path, marker = _write_evil(tmp_path, kind, fmt)
    m2f = load_script("tools/convert_mask2former_weights.py", "seg_convert_m2f")
    with pytest.raises(CheckpointSecurityError) as e:
        m2f.main([path, str(tmp_path / "out.pth")])
    _assert_refused(e, path, marker)
    swin = load_script("tools/convert_swin_imagenet_to_d2.py", "seg_convert_swin")
    with pytest.raises(CheckpointSecurityError) as e:
        swin.main([path, str(tmp_path / "out.pkl")])
    _assert_refused(e, path, marker)
    assert not (tmp_path / "out.pth").exists() and not (tmp_path / "out.pkl").exists()


# ------------------------------------------------------------------------ NaN / Inf weights
@pytest.mark.parametrize("fmt", ["pkl", "pth"])
@pytest.mark.parametrize("loader", ["SegCheckpointer", "DetectionCheckpointer", "fvcore"])
def test_non_finite_weights_are_refused_with_their_names(fmt, loader, tmp_path):
    if loader == "fvcore" and fmt == "pkl":
        pytest.skip("fvcore's Checkpointer reads torch files only")
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["0.weight"][1, 0] = float("nan")
    state["1.bias"][0] = float("inf")
    path = tmp_path / f"w.{fmt}"
    if fmt == "pkl":
        arrays = {k: v.numpy() for k, v in state.items()}
        path.write_bytes(pickle.dumps({"model": arrays, "__author__": "x"}))
    else:
        torch.save({"model": state}, str(path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = {
        "SegCheckpointer": SegCheckpointer,
        "DetectionCheckpointer": DetectionCheckpointer,
        "fvcore": FvcoreCheckpointer,
    }[loader](model)
    with pytest.raises(NonFiniteWeightsError) as e:
        checkpointer.load(str(path))
    msg = str(e.value)
    assert str(path) in msg and "0.weight (1 of 6 values)" in msg and "1.bias (1 of 1" in msg
    assert e.value.names == ["0.weight", "1.bias"]
    assert "0.bias" not in msg
    for k, v in model.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k
