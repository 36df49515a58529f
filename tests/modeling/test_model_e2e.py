"""End-to-end test of every seg_methods meta-architecture with its quick-schedule config.

The meta-architectures are discovered in detectron2's ``META_ARCH_REGISTRY`` (entries whose
class lives in a ``seg_methods`` module) and matched with the configs of
``configs/quick_schedules/`` by their ``MODEL.META_ARCHITECTURE``. A new method is covered by
registering it and adding its quick config; a registered method without one fails
:func:`test_every_meta_architecture_has_a_quick_config`.

For every (meta-architecture, quick config), on the ``tiny_synthetic`` datasets (the quick
config's ``synthetic_*`` datasets are replaced by their ``tiny_synthetic_*`` twins):

* a training step with backward on a batch of two odd-sized images (67x93 and 80x61);
* a training step on a batch holding an image without any ground-truth segment;
* inference on an odd-sized image asked at another output size, and detectron2's
  ``DefaultPredictor`` built from a config whose ``MODEL.WEIGHTS`` is a saved checkpoint;
* a checkpoint round trip through the project checkpointer (identical outputs);
* TorchScript export (``seg_methods.export``): exported outputs equal eager inference on the
  tracing image and on a different one; the maximum differences are printed.

Models are the quick configs' (ResNet-18 from scratch, 64-pixel test size), run on the CPU.
"""

import glob
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch.nn import functional as F

import seg_methods  # noqa: F401  registers the meta-architectures
from seg_methods.config import get_cfg
from seg_methods.data.build import build_dataset_mapper
from seg_methods.engine.trainer import build_checkpointer
from seg_methods.export import export_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK_DIR = os.path.join(REPO, "configs", "quick_schedules")
TRAIN_SIZES = [(67, 93), (80, 61)]  # odd, different aspect ratios, in one batch
TEST_SIZE, OUTPUT_SIZE = (61, 83), (50, 71)  # inference input and requested output size


def seg_methods_meta_architectures():
    """Names of the META_ARCH_REGISTRY entries defined in seg_methods modules."""
    return sorted(
        name
        for name, cls in META_ARCH_REGISTRY._obj_map.items()
        if cls.__module__.startswith("seg_methods")
    )


def quick_configs_by_meta_architecture():
    """{META_ARCHITECTURE: [quick config file name, ...]} over configs/quick_schedules/."""
    found = {}
    for path in sorted(glob.glob(os.path.join(QUICK_DIR, "*.yaml"))):
        cfg = get_cfg()
        cfg.merge_from_file(path)
        found.setdefault(cfg.MODEL.META_ARCHITECTURE, []).append(os.path.basename(path))
    return found


QUICK = quick_configs_by_meta_architecture()
CASES = [
    pytest.param(arch, name, id=name.replace("_instant_test.yaml", ""))
    for arch in seg_methods_meta_architectures()
    for name in QUICK.get(arch, [])
]


def test_every_meta_architecture_has_a_quick_config():
    missing = [a for a in seg_methods_meta_architectures() if a not in QUICK]
    assert not missing, (
        f"registered seg_methods meta-architectures without a config in {QUICK_DIR}: {missing} "
        "(add configs/quick_schedules/<method>_..._instant_test.yaml)"
    )
    assert {"Mask2Former", "ClustSeg", "CMTDeepLab"} <= set(seg_methods_meta_architectures())


# --------------------------------------------------------------------------- helpers
TORCH_THREADS = 1  # one intra-op thread for this module (tests/conftest.py)


def _tiny_dataset(name, tiny_names):
    tiny = "tiny_" + name
    if "superpixel" in name and tiny not in DatasetCatalog.list():
        from seg_methods.data.datasets.superpixel import register_synthetic_superpixel

        register_synthetic_superpixel(tiny_names)  # tiny_synthetic_superpixel_{train,val}
    if not name.startswith("synthetic_") or tiny not in DatasetCatalog.list():
        pytest.fail(
            f"quick config dataset {name!r} has no tiny twin {tiny!r} (the end-to-end test "
            "replaces synthetic_* datasets with the tiny_synthetic_* ones of tests/conftest.py)"
        )
    return tiny


@pytest.fixture
def cfg(request, tiny_synthetic, tmp_path):
    arch, name = request.param
    c = get_cfg()
    c.merge_from_file(os.path.join(QUICK_DIR, name))
    assert c.MODEL.META_ARCHITECTURE == arch
    c.DATASETS.TRAIN = tuple(_tiny_dataset(n, tiny_synthetic) for n in c.DATASETS.TRAIN)
    c.DATASETS.TEST = tuple(_tiny_dataset(n, tiny_synthetic) for n in c.DATASETS.TEST)
    c.MODEL.DEVICE = "cpu"
    c.MODEL.WEIGHTS = ""
    c.DATALOADER.NUM_WORKERS = 0
    c.OUTPUT_DIR = str(tmp_path)
    return c


def cases(fn):
    """Parametrize ``fn`` over every (meta-architecture, quick config) through the cfg fixture."""
    params = [c.values for c in CASES]
    return pytest.mark.parametrize("cfg", params, ids=[c.id for c in CASES], indirect=True)(fn)


def _resize(t, size, nearest):
    """Resize a (..., H, W) tensor (any dtype) to ``size``."""
    lead = t.shape[:-2]
    x = t.reshape(-1, 1, *t.shape[-2:]).float()
    if nearest:
        x = F.interpolate(x, size=size, mode="nearest")
    else:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if not t.is_floating_point():
        x = x.round()
    return x.to(t.dtype).reshape(*lead, *size)


def _resize_record(rec, size):
    """A mapped training record with its image and every per-pixel target resized to ``size``."""
    h0, w0 = rec["image"].shape[-2:]
    out = dict(rec)
    for key, value in rec.items():
        if key == "image":
            out[key] = _resize(value, size, nearest=False)
        elif torch.is_tensor(value) and value.dim() >= 2 and tuple(value.shape[-2:]) == (h0, w0):
            out[key] = _resize(value, size, nearest=True)  # sem_seg, regions, ...
        elif isinstance(value, Instances):
            inst = Instances(size)
            for field, v in value.get_fields().items():
                if isinstance(v, BitMasks):
                    v = BitMasks(_resize(v.tensor, size, nearest=True))
                elif isinstance(v, Boxes):
                    scale = torch.tensor([size[1] / w0, size[0] / h0] * 2)
                    v = Boxes(v.tensor * scale)
                elif torch.is_tensor(v) and v.dim() == 3:
                    v = _resize(v, size, nearest=True)
                inst.set(field, v)
            out[key] = inst
    return out


def _without_ground_truth(rec, ignore_value):
    """The record with no ground-truth segment: no instance, every pixel void."""
    out = dict(rec)
    if "instances" in rec:
        out["instances"] = rec["instances"][torch.zeros(len(rec["instances"]), dtype=torch.bool)]
    if "sem_seg" in rec:
        out["sem_seg"] = torch.full_like(rec["sem_seg"], ignore_value)
    return out


def _train_records(cfg, n=2):
    mapper = build_dataset_mapper(cfg, is_train=True)
    return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:n]]


def _test_image(size, seed=0):
    return torch.from_numpy(np.random.RandomState(seed).randint(0, 256, (3, *size), dtype=np.uint8))


def _check_finite_step(model, batch):
    with EventStorage():
        losses = model(batch)
    assert losses, "no loss"
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), (k, v)
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    return losses, grads


def _check_output_sizes(out, size):
    """Every per-pixel output of one image is at the requested (height, width)."""
    assert out, "empty inference result"
    for key, value in out.items():
        if key == "sem_seg":
            assert value.shape[-2:] == size and value.dim() == 3, key
        elif key == "panoptic_seg":
            assert value[0].shape == size, key
        elif key == "instances":
            assert value.image_size == size and value.pred_masks.shape[-2:] == size, key
        elif torch.is_tensor(value):
            assert value.shape[-2:] == size, key


def _tensors(out):
    """The tensors of one image's result dict, by name (for exact comparisons)."""
    flat = {}
    for key, value in out.items():
        if key == "panoptic_seg":
            flat[key] = value[0]
            flat["segments_info"] = str(value[1])
        elif key == "instances":
            for field, v in value.get_fields().items():
                flat[f"{key}.{field}"] = v.tensor if isinstance(v, Boxes) else v
        else:
            flat[key] = value
    return flat


def _assert_same_outputs(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        if isinstance(ta[k], str):
            assert ta[k] == tb[k], k
        else:
            assert torch.equal(ta[k], tb[k]), k


# --------------------------------------------------------------------------- tests
@cases
def test_train_step_on_odd_sizes(cfg):
    model = build_model(cfg).train()
    batch = [_resize_record(r, s) for r, s in zip(_train_records(cfg), TRAIN_SIZES)]
    losses, grads = _check_finite_step(model, batch)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@cases
def test_train_step_with_an_image_without_ground_truth(cfg):
    model = build_model(cfg).train()
    full, other = _train_records(cfg)
    empty = _without_ground_truth(other, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
    _check_finite_step(model, [full, empty])
    # a batch in which no image has ground truth still gives finite losses and gradients
    model.zero_grad()
    _check_finite_step(
        model, [_without_ground_truth(full, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE), empty]
    )


@cases
def test_inference_on_odd_size_and_default_predictor(cfg, tmp_path):
    model = build_model(cfg).eval()
    image = _test_image(TEST_SIZE)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": OUTPUT_SIZE[0], "width": OUTPUT_SIZE[1]}])
        (same,) = model([{"image": image}])
    _check_output_sizes(out, OUTPUT_SIZE)
    _check_output_sizes(same, TEST_SIZE)

    build_checkpointer(model, str(tmp_path)).save("model_e2e")
    cfg.MODEL.WEIGHTS = str(tmp_path / "model_e2e.pth")
    predictor = DefaultPredictor(cfg)
    bgr = np.random.RandomState(1).randint(0, 256, (45, 59, 3), dtype=np.uint8)
    _check_output_sizes(predictor(bgr), (45, 59))
    saved = model.state_dict()
    for k, v in predictor.model.state_dict().items():
        assert torch.equal(v, saved[k]), f"DefaultPredictor did not load {k}"


@cases
def test_checkpoint_round_trip(cfg, tmp_path):
    model = build_model(cfg)
    with EventStorage():  # one step, so that running statistics and memory banks are non-trivial
        model.train()(_train_records(cfg))
    model.eval()
    build_checkpointer(model, str(tmp_path)).save("model_rt")
    torch.manual_seed(123)
    fresh = build_model(cfg).eval()
    build_checkpointer(fresh, str(tmp_path), strict=True).load(str(tmp_path / "model_rt.pth"))
    inputs = [{"image": _test_image(TEST_SIZE, seed=2)}]
    with torch.no_grad():
        (a,), (b,) = model(inputs), fresh(inputs)
    _assert_same_outputs(a, b)


@cases
def test_torchscript_export_equals_eager(cfg, tmp_path):
    model = build_model(cfg).eval()
    result = export_model(cfg, model, "torchscript", str(tmp_path), image_size=TEST_SIZE)
    print(
        f"\n{cfg.MODEL.META_ARCHITECTURE}: exported {result.output_names}, ops {result.ops}, "
        f"max |TorchScript - eager| {result.max_abs_diff}"
    )
    assert result.verified and set(result.max_abs_diff) == {"trace_image", "check_image"}
    for image, diffs in result.max_abs_diff.items():
        for name, d in diffs.items():
            assert d <= 1e-4, (image, name, d)
    assert os.path.isfile(result.path)
