"""The per-pixel semantic template and its shared test-time strategies.

* Sliding windows: the tiling by hand, stitched identity predictions equal the whole image (odd
  sizes, image smaller than the crop), overlaps averaged (by hand), windows padded to the crop.
* Multi-scale + flip: sizes as detectron2's ResizeShortestEdge, a model that is not
  flip-equivariant gives the hand-computed mean (probabilities and logits), scale averaging.
* The loss: void excluded, hard pixel mining by hand, an all-void batch gives 0 (not NaN).
* The baseline (DeepLabV3+ R18 in ``PerPixelSemanticModel``) on ``tiny_synthetic``: a CPU train
  step with backward, evaluation, output sizes, sliding-window and TTA inference, detectron2's
  SemanticSegmentor parameter names, and clear errors.
"""

import math
import warnings

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from seg_methods.config import get_cfg
from seg_methods.data.build import build_dataset_mapper, build_test_loader
from seg_methods.evaluation import build_evaluator
from seg_methods.modeling.meta_arch.per_pixel import (
    PerPixelSemanticModel,
    per_pixel_cross_entropy,
)
from seg_methods.modeling.test_time import (
    SemSegTestTime,
    multi_scale_flip_inference,
    slide_inference,
    sliding_windows,
    tta_sizes,
    whole_inference,
)

SYNTHETIC_CONFIG = (
    "configs/synthetic/semantic-segmentation/deeplabv3plus/deeplabv3plus_R18_bs8_1k.yaml"
)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _coordinate_image(h: int, w: int) -> torch.Tensor:
    """(1, 3, h, w): row index, column index, and a unique id per pixel (all exact in float)."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([yy, xx, yy * w + xx + 1]).float()[None]


# --------------------------------------------------------------------------- sliding windows
def test_sliding_windows_by_hand():
    # rows: 5 px, crop 3, stride 2 -> [0, 3), [2, 5); cols: 7 px, crop 4, stride 3 -> [0, 4), [3, 7)
    assert sliding_windows(5, 7, (3, 4), (2, 3)) == [
        (0, 3, 0, 4),
        (0, 3, 3, 7),
        (2, 5, 0, 4),
        (2, 5, 3, 7),
    ]
    # 8 px, crop 3, stride 3: starts 0, 3, then the last window moved back to end at 8
    assert sliding_windows(1, 8, (1, 3), (1, 3)) == [(0, 1, 0, 3), (0, 1, 3, 6), (0, 1, 5, 8)]
    # image smaller than the crop: one window covering it
    assert sliding_windows(2, 3, (4, 5), (2, 2)) == [(0, 2, 0, 3)]
    with pytest.raises(ValueError, match="no window covers"):
        sliding_windows(10, 10, (4, 4), (5, 2))
    with pytest.raises(ValueError, match="positive"):
        sliding_windows(10, 10, (0, 4), (1, 1))


@pytest.mark.parametrize(
    "size, crop, stride",
    [
        ((5, 7), (3, 4), (2, 3)),  # windows overlap
        ((13, 9), (4, 4), (3, 2)),  # odd sizes, last windows shifted back
        ((2, 3), (4, 5), (2, 2)),  # image smaller than the crop
        ((8, 8), (4, 4), (4, 4)),  # exact tiling, no overlap
    ],
)
def test_slide_of_an_identity_model_equals_whole(size, crop, stride):
    image = _coordinate_image(*size)
    seen = []

    def identity(x):
        seen.append(tuple(x.shape[-2:]))
        return x.clone()

    stitched = slide_inference(identity, image, crop, stride)
    assert set(seen) == {crop}  # every window was padded to the full crop size
    assert torch.equal(stitched, image)
    assert torch.equal(whole_inference(identity, image), image)


def test_whole_inference_pads_to_divisibility_and_crops():
    image = _coordinate_image(5, 7)

    def model(x):
        assert x.shape[-2:] == (8, 8)
        assert torch.equal(x[..., 5:, :], torch.zeros_like(x[..., 5:, :]))  # zero padding
        return x * 2

    assert torch.equal(whole_inference(model, image, size_divisibility=4), image * 2)


def test_slide_averages_overlapping_windows_by_hand():
    # 1 x 5 image of column indices; windows [0, 3) and [2, 5); the model predicts the mean of its
    # window everywhere: 1 and 3; pixel 2 is in both windows -> (1 + 3) / 2.
    image = torch.arange(5.0).view(1, 1, 1, 5)

    def window_mean(x):
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()

    out = slide_inference(window_mean, image, (1, 3), (1, 2))
    assert out.flatten().tolist() == [1.0, 1.0, 2.0, 3.0, 3.0]
    # an image smaller than the crop is zero-padded before the model sees it: [1, 2, 0, 0] -> 0.75
    out = slide_inference(window_mean, torch.tensor([[[[1.0, 2.0]]]]), (1, 4), (1, 2))
    assert out.flatten().tolist() == [0.75, 0.75]


# --------------------------------------------------------------------------- multi-scale + flip
def test_tta_sizes_follow_resize_shortest_edge():
    assert tta_sizes(1024, 2048, [512, 1024, 1536], 4096) == [
        (512, 1024),
        (1024, 2048),
        (1536, 3072),
    ]
    # the longest edge is capped: 1536 x 3072 -> 1024 x 2048
    assert tta_sizes(1024, 2048, [1536], 2048) == [(1024, 2048)]
    assert tta_sizes(7, 5, [10], 100) == [(14, 10)]


def _ramp_model(x):
    """2 classes; class 0's logit is the column index (independent of the image, so the model is
    not flip-equivariant), class 1's is 0."""
    b, _, h, w = x.shape
    ramp = torch.arange(w, dtype=x.dtype).expand(b, h, w)
    return torch.stack([ramp, torch.zeros_like(ramp)], dim=1)


def test_flip_tta_averages_mirrored_views_by_hand():
    image = torch.zeros(1, 3, 2, 3)
    # logits: view 1 gives [0, 1, 2], the mirrored view mirrored back gives [2, 1, 0]
    out = multi_scale_flip_inference(
        _ramp_model, image, sizes=[(2, 3)], flip=True, output_size=(2, 3), average="logits"
    )
    assert torch.allclose(out[0, 0], torch.ones(2, 3))
    assert torch.allclose(out[0, 1], torch.zeros(2, 3))
    # probabilities: p0 = (sigmoid(j) + sigmoid(2 - j)) / 2 for column j
    out = multi_scale_flip_inference(
        _ramp_model, image, sizes=[(2, 3)], flip=True, output_size=(2, 3), average="probs"
    )
    want = [(_sigmoid(j) + _sigmoid(2 - j)) / 2 for j in range(3)]
    assert torch.allclose(out[0, 0, 0], torch.tensor(want))
    assert torch.allclose(out.sum(dim=1), torch.ones(1, 2, 3))
    # without flip: just the softmax of the one view
    out = multi_scale_flip_inference(
        _ramp_model, image, sizes=[(2, 3)], flip=False, output_size=(2, 3), average="probs"
    )
    assert torch.allclose(out[0, 0, 1], torch.tensor([_sigmoid(j) for j in range(3)]))


def test_multi_scale_averages_views_resized_to_the_output():
    def height_model(x):  # one class whose logit is the height of the view it sees
        return torch.full((x.shape[0], 1, *x.shape[-2:]), float(x.shape[-2]))

    image = torch.randn(1, 3, 8, 8)
    tt = SemSegTestTime(aug_enabled=True, aug_min_sizes=[4, 8, 12], aug_flip=True, average="logits")
    out = tt(height_model, image, output_size=(8, 8))
    assert out.shape == (1, 1, 8, 8)
    assert torch.allclose(out, torch.full_like(out, (4 + 8 + 12) / 3))
    # sizes refer to the original image: a 32x16 original -> views of 8x4, 16x8 and 24x12
    out = tt(height_model, image, output_size=(32, 16), original_size=(32, 16))
    assert out.shape == (1, 1, 32, 16)
    assert torch.allclose(out, torch.full_like(out, (8 + 16 + 24) / 3))


def test_flip_tta_on_top_of_sliding_windows():
    tt = SemSegTestTime(
        mode="slide",
        crop_size=(2, 2),
        stride=(1, 1),
        aug_enabled=True,
        aug_min_sizes=[2],
        average="logits",
    )
    # windows see only their own 2 columns: the ramp restarts at 0 in each window
    out = tt(_ramp_model, torch.zeros(1, 3, 2, 3), output_size=(2, 3))
    # unflipped: windows [0, 2), [1, 3) -> columns 0, (1 + 0) / 2, 1 = [0, .5, 1]; the mirrored
    # pass gives the mirror image [1, .5, 0]; their mean is 0.5 everywhere
    assert torch.allclose(out[0, 0], torch.full((2, 3), 0.5))


def test_test_time_config_errors_name_the_keys():
    with pytest.raises(ValueError, match="TEST.PER_PIXEL.MODE"):
        SemSegTestTime(mode="tiles")
    with pytest.raises(ValueError, match="TEST.PER_PIXEL.AVERAGE"):
        SemSegTestTime(average="median")
    with pytest.raises(ValueError, match="TEST.PER_PIXEL.CROP_SIZE / STRIDE"):
        SemSegTestTime(mode="slide", crop_size=(32, 32), stride=(64, 16))
    with pytest.raises(ValueError, match="divisible"):
        SemSegTestTime(mode="slide", crop_size=(48, 48), stride=(16, 16), size_divisibility=32)
    with pytest.raises(ValueError, match="TEST.AUG.MIN_SIZES"):
        SemSegTestTime(aug_enabled=True, aug_min_sizes=[])


# --------------------------------------------------------------------------- loss
def test_cross_entropy_excludes_void_and_mines_hard_pixels_by_hand():
    # one image, 2 classes, 1 x 3 pixels; the last pixel is void (and would have a large loss)
    logits = torch.tensor([[[[2.0, 0.0, -5.0]], [[0.0, 1.0, 5.0]]]])
    targets = torch.tensor([[[0, 0, 255]]])
    ce = [-math.log(_sigmoid(2.0)), -math.log(_sigmoid(-1.0))]  # -log softmax of the true class
    loss = per_pixel_cross_entropy(logits, targets, ignore_value=255)
    assert loss.item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    # top 50% of the 2 valid pixels: the harder one only
    loss = per_pixel_cross_entropy(logits, targets, ignore_value=255, hard_pixel_fraction=0.5)
    assert loss.item() == pytest.approx(max(ce), rel=1e-6)
    # all void: 0, finite, and backward works
    logits.requires_grad_(True)
    loss = per_pixel_cross_entropy(logits, torch.full_like(targets, 255), ignore_value=255)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        per_pixel_cross_entropy(logits, torch.tensor([[[0, 2, 255]]]), ignore_value=255)


# --------------------------------------------------------------------------- the baseline model
@pytest.fixture()
def tiny_cfg(tiny_synthetic):
    cfg = get_cfg()
    cfg.merge_from_file(SYNTHETIC_CONFIG)
    cfg.DATASETS.TRAIN = (tiny_synthetic["sem_seg_train"],)
    cfg.DATASETS.TEST = (tiny_synthetic["sem_seg_val"],)
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 32
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def _train_batch(cfg, n=2):
    mapper = build_dataset_mapper(cfg, is_train=True)
    return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:n]]


def test_deeplabv3plus_train_step_and_eval_on_tiny_synthetic(tiny_cfg, tmp_path):
    cfg = tiny_cfg
    model = build_model(cfg)
    assert isinstance(model, PerPixelSemanticModel)
    assert type(model.sem_seg_head).__name__ == "DeepLabV3PlusHead"  # detectron2's, unchanged

    batch = _train_batch(cfg)
    assert all(x["sem_seg"].dtype == torch.int64 for x in batch)
    model.train()
    with EventStorage():
        losses = model(batch)
    assert set(losses) == {"loss_sem_seg"}
    loss = losses["loss_sem_seg"]
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for prefix in ("backbone.", "sem_seg_head."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), prefix
        assert sum(float(g.abs().sum()) for g in grads) > 0, prefix

    model.eval()
    mapper = build_dataset_mapper(cfg, is_train=False)
    inputs = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])[:2]]
    inputs[1]["height"], inputs[1]["width"] = 48, 80  # another output size
    with torch.no_grad():
        outputs = model(inputs)
    for x, out in zip(inputs, outputs):
        assert set(out) == {"sem_seg"}
        assert out["sem_seg"].shape == (8, x["height"], x["width"])
        assert torch.isfinite(out["sem_seg"]).all()

    evaluator = build_evaluator(cfg, cfg.DATASETS.TEST[0], str(tmp_path))
    results = inference_on_dataset(model, build_test_loader(cfg, cfg.DATASETS.TEST[0]), evaluator)
    assert "sem_seg" in results and 0.0 <= results["sem_seg"]["mIoU"] <= 100.0


def test_sliding_window_and_tta_through_the_model(tiny_cfg):
    cfg = tiny_cfg
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = build_dataset_mapper(cfg, is_train=False)(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0])
    assert tuple(x["image"].shape[-2:]) == (64, 64)
    with torch.no_grad():
        whole = model([x])[0]["sem_seg"]

        # one 64x64 window is the whole (divisible) image: identical logits
        cfg.TEST.PER_PIXEL.MODE = "slide"
        cfg.TEST.PER_PIXEL.CROP_SIZE = [64, 64]
        cfg.TEST.PER_PIXEL.STRIDE = [32, 32]
        model.test_time = SemSegTestTime(cfg, size_divisibility=model.size_divisibility)
        assert torch.allclose(model([x])[0]["sem_seg"], whole, atol=1e-5)

        # 32x32 windows every 16 pixels: 9 windows, all of the crop size
        cfg.TEST.PER_PIXEL.CROP_SIZE = [32, 32]
        cfg.TEST.PER_PIXEL.STRIDE = [16, 16]
        model.test_time = SemSegTestTime(cfg, size_divisibility=model.size_divisibility)
        calls = []
        handle = model.backbone.register_forward_hook(
            lambda m, i, o: calls.append(tuple(i[0].shape[-2:]))
        )
        slid = model([x])[0]["sem_seg"]
        handle.remove()
        assert calls == [(32, 32)] * 9
        assert slid.shape == whole.shape and torch.isfinite(slid).all()

        # multi-scale + flip on the sliding windows: probabilities at the output size
        cfg.TEST.AUG.ENABLED = True
        cfg.TEST.AUG.MIN_SIZES = [48, 64]
        cfg.TEST.AUG.FLIP = True
        model.test_time = SemSegTestTime(cfg, size_divisibility=model.size_divisibility)
        x["height"], x["width"] = 256, 256  # the original size, which MIN_SIZES refer to
        probs = model([x])[0]["sem_seg"]
    assert probs.shape == (8, 256, 256)
    assert torch.allclose(probs.sum(dim=0), torch.ones(256, 256), atol=1e-5)


def test_odd_sizes_train_and_infer(tiny_cfg):
    """Two images of different odd sizes: padded in training, each inferred at its own size."""
    model = build_model(tiny_cfg)
    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in [(61, 75), (37, 29)]:
        sem = torch.randint(0, 8, (h, w), generator=g)
        sem[:5] = 255  # some void rows
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        batch.append({"image": image, "sem_seg": sem, "height": h, "width": w})
    model.train()
    with EventStorage():
        loss = model(batch)["loss_sem_seg"]
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
    assert [tuple(o["sem_seg"].shape) for o in outputs] == [(8, 61, 75), (8, 37, 29)]
    # inference of an image does not depend on the other images of the batch
    with torch.no_grad():
        alone = model(batch[1:])[0]["sem_seg"]
    assert torch.allclose(alone, outputs[1]["sem_seg"], atol=1e-5)


def test_traced_model_pads_other_input_sizes_like_eager(tiny_cfg):
    """Whole-image inference traced on one size gives eager's output on another size (the
    padding to the size divisibility stays symbolic)."""
    model = build_model(tiny_cfg).eval()
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 45, 70), generator=g).float()
    adapter = TracingAdapter(model, [{"image": image}], lambda m, inputs: m(inputs))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(adapter, adapter.flattened_inputs)
        other = torch.randint(0, 256, (3, 70, 37), generator=g).float()
        want = model([{"image": other}])[0]["sem_seg"]
        got = traced(other)[0]
    assert got.shape == want.shape == (8, 70, 37)
    assert torch.allclose(got, want, atol=1e-5)


def test_all_void_batch_gives_a_finite_zero_loss(tiny_cfg):
    model = build_model(tiny_cfg).train()
    batch = _train_batch(tiny_cfg)
    for x in batch:
        x["sem_seg"] = torch.full_like(x["sem_seg"], tiny_cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
    with EventStorage():
        loss = model(batch)["loss_sem_seg"]
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_parameter_names_are_detectron2_semantic_segmentor(tiny_cfg):
    """Same modules as detectron2's SemanticSegmentor, so its checkpoints load unchanged."""
    ours = build_model(tiny_cfg)
    cfg = tiny_cfg.clone()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    d2 = build_model(cfg)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(d2)


def test_clear_errors(tiny_cfg):
    model = build_model(tiny_cfg).train()
    batch = _train_batch(tiny_cfg)
    del batch[1]["sem_seg"]
    with pytest.raises(ValueError, match="'sem_seg'.*missing in inputs \\[1\\]"):
        model(batch)

    cfg = tiny_cfg.clone()
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "focal"
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.LOSS_TYPE"):
        build_model(cfg)

    cfg = tiny_cfg.clone()  # detectron2's DeepLabV3Head has no layers() method
    cfg.MODEL.SEM_SEG_HEAD.NAME = "DeepLabV3Head"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.NAME"):
        build_model(cfg)
