#!/usr/bin/env python
"""Numerical parity check: our RegProxy vs the official one (YiF-Zhang/RegionProxy, mmseg 0.17).

Proves ``tools/convert_regproxy_weights.py`` and our model end to end, for one official config
and the matching config of ours (``--model``, see :data:`MODELS`):

1. the official segmentor (``mmseg.models.build_segmentor`` on the official config, with the
   official ``models/`` package registering its ``VisionTransformer``, ``ProxyHead`` and
   ``EncoderDecoder``; imported at run time from ``--official-root``, no file is copied) is
   built on the CPU and given random weights (every floating-point tensor, BN statistics, class /
   distillation tokens and position embedding included; :func:`randomize_official_state`);
2. it is saved with mmcv's own ``save_checkpoint`` (the official checkpoint format);
3. that file is converted with ``tools/convert_regproxy_weights.py`` (its command-line ``main``)
   and loaded into our model, built from our config, with ``SegCheckpointer`` (strict);
4. both run in eval mode on the same normalised random batch, and the report compares, as
   max |ours - official| and relative to max |official|: the association-layer tokens and the
   final (LayerNorm-ed) tokens of the backbone, the 1/4-resolution logits of the head (also our
   head on the official tokens, to separate head from backbone), the full-resolution logits of
   whole-image inference (``EncoderDecoder.whole_inference``) and of sliding-window inference
   with the official ``test_cfg`` (the official ``slide_inference``) against our
   ``SemSegTestTime`` built from our config, their argmax maps, and our ``model.forward`` on the
   raw (unnormalised) image against the official sliding window on the same image normalised.
   The first row compares the two configs as written (:func:`config_row`: association block,
   depth, classes, pixels per token, test mode / window / stride, input normalisation).

The hybrid models (R26+ViT-S/32, R50+ViT-L/32: ``r26-s32-ade20k``, ``r50-l32-ade20k``) are
compared the same way: the official ``VisionTransformerHybrid`` (mmseg ViT whose ``patch_embed``
is timm's ``HybridEmbed`` around timm's ResNetV2, built by the official code with timm's
``_resnetv2``) against our ``build_timm_vit_backbone`` on timm's ``vit_*_r*_s32_384``; their
association features are the token embedding (``out_indices[0] = -1``, "implicit-mid-n1"), their
tokens 32 pixels wide, so the head paints at 1/8. One more row compares the ResNet stem's
features. The official code imports timm; here that is the timm of this environment (1.0.31),
whereas the official README pins timm 0.4.12. The ``_resnetv2`` helper reads the same in a
timm 0.4-era copy (ResNetV2, no pre-activation, "same" padding, ``StdConv2dSame(eps=1e-8)``,
same parameter names); the ResNetV2 modules of the two versions were not compared numerically.

Rows marked "(info)" show what the deliberate differences change and never fail: timm's
antialiased position-embedding resampling (``pos_embed_antialias=True``; ours defaults to
mmseg's), and whole-image inference on an image whose sides are not multiples of the token
stride (16; 32 for the hybrids): the official ``PatchEmbed`` pads the image (the hybrid's
ResNet "same"-pads it), and ``encode_decode`` then *resizes* the padded grid's logits to the
unpadded size; ours crops the padding off, which keeps pixels aligned; official evaluation uses
sliding windows of the full crop size, where neither happens.

Usage::

    python tools/compare_with_official_regproxy.py --model t16-ade20k \\
        --official-root /work/ref/RegionProxy --mm-site /work/ref/mm017/site
    # every pair (ViT-T/S/B/L on ADE20K and Cityscapes, the two ADE20K hybrids):  --model all
    python tools/compare_with_official_regproxy.py --model r26-s32-ade20k --size 128 160 \
        --crop-size 128 128 --stride 96 96 --official-root ... --mm-site ...

``--official-root`` is a YiF-Zhang/RegionProxy checkout; ``--mm-site`` a folder holding mmcv 1.3.x
(the "lite" build without compiled ops is enough), mmsegmentation 0.17 and einops (put on
``sys.path`` only inside this process). Environment variables REGPROXY_OFFICIAL_ROOT and
REGPROXY_MM_SITE are the defaults.

Run-time changes made to run the official code here (none of its files is modified):

- mmseg imports ``mmcv.ops``, which needs the compiled ``mmcv._ext``; a stand-in module whose
  every attribute is a function raising RuntimeError is put in ``sys.modules`` (no compiled op is
  called by this model's forward; a call would raise, not silently differ).
- mmcv's ``Registry`` infers each registry's package with ``inspect.stack()`` +
  ``inspect.getmodule``, which takes many seconds with torch imported; while the official code is
  imported those two functions are replaced by equivalent fast ones (frame list without source
  context; a frame's module from its globals' ``__name__``), then restored.
- ``SyncBN`` in the decode head becomes ``BN`` (``norm_cfg``; same parameters and buffers, and
  the same computation in eval mode), and ours uses ``MODEL.REGPROXY.NORM "BN"``, since this is
  one CPU process.
- ``--depth`` / ``--crop-size`` / ``--stride`` (used by the unit test to stay small) override
  the number of ViT layers and the sliding-window ``test_cfg`` on both sides alike.

Tolerance: max |diff| <= ``--rtol`` (default 1e-4) x max |official| for tensors, identical argmax
maps except where the official top-2 gap is within ``--margin`` (float32 ties).
"""

import argparse
import contextlib
import importlib.util
import inspect
import os
import sys
import tempfile
import time
import types
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from seg_methods.config import get_cfg  # noqa: E402
from seg_methods.utils.parity import Report, Row, randomize_state  # noqa: E402  (shared)
from seg_methods.modeling.test_time import SemSegTestTime  # noqa: E402
from seg_methods.utils.checkpoint import SegCheckpointer  # noqa: E402
from seg_methods.modeling.backbone.timm_backbone import parse_timm_extra_args  # noqa: E402

_ADE, _OFF_ADE = "configs/ade20k/semantic-segmentation/regproxy/", "configs/regproxy_ade20k/"
_CS, _OFF_CS = "configs/cityscapes/semantic-segmentation/regproxy/", "configs/regproxy_cityscapes/"
# name -> (official config under --official-root, our config under the repository)
MODELS: Dict[str, Tuple[str, str]] = {
    "t16-ade20k": (
        _OFF_ADE + "regproxy-t16-sub4+implicit-mid-4+512x512+160k+adamw-poly+ade20k.py",
        _ADE + "regproxy_vit_t16_bs16_160k.yaml",
    ),
    "s16-ade20k": (
        _OFF_ADE + "regproxy-s16-sub4+implicit-mid-4+512x512+160k+adamw-poly+ade20k.py",
        _ADE + "regproxy_vit_s16_bs16_160k.yaml",
    ),
    "b16-ade20k": (
        _OFF_ADE + "regproxy-b16-sub4+implicit-mid-4+512x512+160k+adamw-cr+ade20k.py",
        _ADE + "regproxy_vit_b16_bs16_160k.yaml",
    ),
    "l16-ade20k": (
        _OFF_ADE + "regproxy-l16-sub4+implicit-mid-9+640x640+160k+adamw-cr+ade20k.py",
        _ADE + "regproxy_vit_l16_bs16_160k_res640.yaml",
    ),
    "t16-cityscapes": (
        _OFF_CS + "regproxy-t16-sub4+implicit-mid-2+768x768+80k+adamw-poly+cityscapes.py",
        _CS + "regproxy_vit_t16_bs16_80k.yaml",
    ),
    "s16-cityscapes": (
        _OFF_CS + "regproxy-s16-sub4+implicit-mid-2+768x768+80k+adamw-poly+cityscapes.py",
        _CS + "regproxy_vit_s16_bs16_80k.yaml",
    ),
    "b16-cityscapes": (
        _OFF_CS + "regproxy-b16-sub4+implicit-mid-2+768x768+80k+adamw-cr+cityscapes.py",
        _CS + "regproxy_vit_b16_bs16_80k.yaml",
    ),
    "l16-cityscapes": (
        _OFF_CS + "regproxy-l16-sub4+implicit-mid-5+768x768+80k+adamw-cr+cityscapes.py",
        _CS + "regproxy_vit_l16_bs16_80k.yaml",
    ),
    # hybrids: ResNetV2 stem + ViT on 32-pixel tokens, association from the token embedding
    "r26-s32-ade20k": (
        _OFF_ADE + "regproxy-r26-s32-sub4+implicit-mid-n1+512x512+160k+adamw-poly+ade20k.py",
        _ADE + "regproxy_r26_s32_bs16_160k.yaml",
    ),
    "r50-l32-ade20k": (
        _OFF_ADE + "regproxy-r50-l32-sub4+implicit-mid-n1+640x640+160k+adamw-cr+ade20k.py",
        _ADE + "regproxy_r50_l32_bs16_160k_res640.yaml",
    ),
}


# --------------------------------------------------------------------------- official side
def find_official(root: Optional[str], mm_site: Optional[str]) -> Tuple[str, str]:
    """Check ``--official-root`` / ``--mm-site`` (or REGPROXY_OFFICIAL_ROOT / REGPROXY_MM_SITE)."""
    root = root or os.environ.get("REGPROXY_OFFICIAL_ROOT")
    mm_site = mm_site or os.environ.get("REGPROXY_MM_SITE")
    if not root or not os.path.isfile(os.path.join(root, "models", "proxy_head.py")):
        raise FileNotFoundError(
            f"official RegProxy source not found at {root!r} (REGPROXY_OFFICIAL_ROOT / "
            "--official-root: a YiF-Zhang/RegionProxy checkout with models/proxy_head.py)"
        )
    if not mm_site or not all(
        os.path.isdir(os.path.join(mm_site, p)) for p in ("mmcv", "mmseg", "einops")
    ):
        raise FileNotFoundError(
            f"mmcv / mmseg / einops not found in {mm_site!r} (REGPROXY_MM_SITE / --mm-site: a "
            "folder holding mmcv 1.3.x, mmsegmentation 0.17 and einops)"
        )
    return root, mm_site


def _mmcv_ext_standin() -> types.ModuleType:
    mod = types.ModuleType("mmcv._ext")

    def getattr_(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise RuntimeError(f"mmcv compiled op {name!r} is not available here")

        return missing

    mod.__getattr__ = getattr_
    return mod


@contextlib.contextmanager
def _fast_registry_scope() -> Iterator[None]:
    """Fast equivalents of ``inspect.stack`` / ``inspect.getmodule`` for mmcv's
    ``Registry.infer_scope`` (``getmodule(stack()[2][0]).__name__``) while importing."""
    stack, getmodule = inspect.stack, inspect.getmodule

    def fast_stack(context=1):
        frame, out = sys._getframe(1), []
        while frame is not None:
            out.append((frame,))
            frame = frame.f_back
        return out

    def fast_getmodule(obj, _filename=None):
        if inspect.isframe(obj):
            return sys.modules.get(obj.f_globals.get("__name__"))
        return getmodule(obj, _filename)

    inspect.stack, inspect.getmodule = fast_stack, fast_getmodule
    try:
        yield
    finally:
        inspect.stack, inspect.getmodule = stack, getmodule


class OfficialCode:
    """The official package and mmcv / mmseg, imported into this process once.

    ``--mm-site`` and ``--official-root`` are on ``sys.path``, and the official top-level
    packages ``models`` / ``utils`` in ``sys.modules``, only while the official code is imported,
    configured (its configs' ``custom_imports`` import ``models``) or built (:meth:`_on_path`),
    so that nothing else in the process (e.g. another test of the same pytest run) imports them
    by accident; the official classes stay registered in mmseg's registries.
    """

    _TOP_LEVEL = ("models", "utils")

    def __init__(self, root: str, mm_site: str):
        self.root, self.mm_site = root, mm_site
        self._hidden: Dict[str, types.ModuleType] = {}
        sys.modules.setdefault("mmcv._ext", _mmcv_ext_standin())
        with self._on_path(), _fast_registry_scope():
            import mmcv  # noqa: F401
            import models  # noqa: F401  (official: registers VisionTransformer, ProxyHead, ...)
            from mmcv.runner import save_checkpoint
            from mmseg.models import build_segmentor
        self.mmcv = mmcv
        self.build_segmentor, self.save_checkpoint = build_segmentor, save_checkpoint

    @contextlib.contextmanager
    def _on_path(self) -> Iterator[None]:
        added = [p for p in (self.mm_site, self.root) if p not in sys.path]
        sys.path[:0] = added
        sys.modules.update(self._hidden)
        try:
            yield
        finally:
            for p in added:
                sys.path.remove(p)
            official = os.path.realpath(self.root) + os.sep
            for name in list(sys.modules):
                if name.split(".")[0] in self._TOP_LEVEL:
                    path = getattr(sys.modules[name], "__file__", None) or ""
                    if os.path.realpath(path).startswith(official):
                        self._hidden[name] = sys.modules.pop(name)

    def config(self, rel_path: str, depth: int = 0, crop=None, stride=None):
        """The official mmcv ``Config`` at ``rel_path`` (SyncBN -> BN; optional overrides of the
        ViT depth, keeping the association layer below the last, and of the test window)."""
        with self._on_path():
            cfg = self.mmcv.Config.fromfile(os.path.join(self.root, rel_path))
        cfg.model.decode_head.norm_cfg = dict(type="BN", requires_grad=True)  # SyncBN -> BN
        if depth:
            cfg.model.backbone.num_layers = depth
            mid = min(cfg.model.backbone.out_indices[0], depth - 2)  # -1 (embedding) stays
            cfg.model.backbone.out_indices = [mid, depth - 1]
        if crop:
            cfg.model.test_cfg.crop_size = tuple(crop)
        if stride:
            cfg.model.test_cfg.stride = tuple(stride)
        return cfg

    def build(self, cfg) -> torch.nn.Module:
        """The official segmentor of ``cfg`` in eval mode, on the CPU."""
        with self._on_path():
            return self.build_segmentor(cfg.model).eval()


def randomize_official_state(model: torch.nn.Module, seed: int) -> None:
    """Random values for every floating-point tensor of the official state dict (in place;
    :func:`~seg_methods.utils.parity.randomize_state`): matrices and convolutions PyTorch's
    default initialisation times (1 + N(0, 0.1^2)); LayerNorm / BN weights U(0.5, 1.5); biases
    and BN running means N(0, 0.1^2); running variances U(0.5, 2); class / distillation tokens
    and the position embedding N(0, 0.2^2) (they start at zero)."""

    def tokens(key, value, g):
        if key.split(".")[-1] in ("cls_token", "dist_token", "pos_embed"):
            return torch.randn(value.shape, generator=g) * 0.2
        return None

    randomize_state(model, seed, special=tokens)


# --------------------------------------------------------------------------- our side
def build_ours(config_file: str, opts: Sequence[str] = ()) -> Tuple[torch.nn.Module, object]:
    cfg = get_cfg()
    cfg.merge_from_file(config_file, allow_unsafe=False)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.TIMM.PRETRAINED = False
    cfg.MODEL.REGPROXY.NORM = "BN"  # one CPU process (same keys as SyncBN)
    cfg.MODEL.WEIGHTS = ""
    return build_model(cfg).eval(), cfg


def config_row(official: OfficialCode, off_rel: str, our_rel: str) -> Row:
    """The two configs as written (before ``--depth`` / ``--crop-size`` / ``--stride``): ViT
    depth and association layer, classes, pixels per token, test mode / window / stride, the
    input normalisation, the training size (position-embedding grid) and, for the hybrids, the
    stem (official ``embed_type`` = our timm ``MODEL.TIMM.NAME``) and the padding to 32."""
    off = official.config(off_rel)
    ours = get_cfg()
    ours.merge_from_file(os.path.join(REPO, our_rel), allow_unsafe=False)
    bb, head, test, norm = (
        off.model.backbone,
        off.model.decode_head,
        off.model.test_cfg,
        off.img_norm_cfg,
    )
    checks = {
        "out_indices": list(ours.MODEL.TIMM.OUT_INDICES) == list(bb.out_indices),
        "num_layers": list(ours.MODEL.TIMM.OUT_INDICES)[-1] == bb.num_layers - 1,
        "classes": ours.MODEL.SEM_SEG_HEAD.NUM_CLASSES == head.num_classes,
        "region_res": tuple(ours.MODEL.REGPROXY.REGION_RES) == tuple(head.region_res),
        "test mode": ours.TEST.PER_PIXEL.MODE == test.mode,
        "test crop": tuple(ours.TEST.PER_PIXEL.CROP_SIZE) == tuple(test.crop_size),
        "test stride": tuple(ours.TEST.PER_PIXEL.STRIDE) == tuple(test.stride),
        "mean/std": (list(ours.MODEL.PIXEL_MEAN), list(ours.MODEL.PIXEL_STD))
        == (list(norm.mean), list(norm.std)),
        "RGB": (ours.INPUT.FORMAT == "RGB") == bool(norm.to_rgb),
        "img_size": _img_size(ours) == _pair(bb.img_size),
    }
    if bb.type == "VisionTransformerHybrid":
        checks["embed_type"] = ours.MODEL.TIMM.NAME == bb.embed_type
        checks["padding /32"] = ours.MODEL.PER_PIXEL.SIZE_DIVISIBILITY == bb.patch_size
    bad = [k for k, v in checks.items() if not v]
    note = (
        f"ours {list(ours.MODEL.TIMM.OUT_INDICES)}, {ours.MODEL.SEM_SEG_HEAD.NUM_CLASSES} classes, "
        f"{ours.TEST.PER_PIXEL.MODE} {list(ours.TEST.PER_PIXEL.CROP_SIZE)}/"
        f"{list(ours.TEST.PER_PIXEL.STRIDE)}" + (f"; differ: {bad}" if bad else "")
    )
    return Row(
        "config: out_indices, classes, test_cfg, normalisation", float(len(bad)), 1.0, not bad, note
    )


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _img_size(cfg) -> Optional[Tuple[int, int]]:
    """``img_size`` of ``MODEL.TIMM.EXTRA_ARGS`` (None if unset)."""
    v = parse_timm_extra_args(cfg.MODEL.TIMM.EXTRA_ARGS).get("img_size")
    return None if v is None else _pair(v)


def _load_converter():
    path = os.path.join(REPO, "tools", "convert_regproxy_weights.py")
    spec = importlib.util.spec_from_file_location("convert_regproxy_weights", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- comparison
def _max(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def _tensor_row(name, ours, off, rtol, note="", info=False) -> Row:
    if ours.shape != off.shape:
        return Row(name, float("inf"), _max(off), info, f"shape {tuple(ours.shape)} vs official")
    diff = _max(ours - off)
    return Row(name, diff, _max(off), info or diff <= rtol * _max(off), note)


def _argmax_row(name, ours, off, margin) -> Row:
    """Compare argmax maps; disagreements are allowed only at official near-ties."""
    top2 = off.topk(2, dim=1).values
    differ = ours.argmax(1) != off.argmax(1)
    bad = differ & (top2[:, 0] - top2[:, 1] > margin)
    note = f"{int(differ.sum())} of {differ.numel()} pixels differ, {int(bad.sum())} not at ties"
    return Row(name, float(differ.float().mean()), 1.0, not bool(bad.any()), note)


def _meta(h: int, w: int) -> List[Dict]:
    return [dict(ori_shape=(h, w, 3), img_shape=(h, w, 3), pad_shape=(h, w, 3), flip=False)]


def compare(
    official: OfficialCode,
    model: str = "t16-ade20k",
    *,
    size: Sequence[int] = (512, 683),
    batch: int = 1,
    depth: int = 0,
    crop_size: Optional[Sequence[int]] = None,
    stride: Optional[Sequence[int]] = None,
    seed: int = 0,
    rtol: float = 1e-4,
    margin: float = 1e-4,
    info_rows: bool = True,
    log: Callable[[str], None] = print,
) -> Report:
    """Run the whole check for one ``MODELS`` entry (see the module docstring)."""
    report = Report(model=model)
    off_rel, our_rel = MODELS[model]
    h, w = int(size[0]), int(size[1])

    t = time.perf_counter()
    off_cfg = official.config(off_rel, depth, crop_size, stride)
    off_model = official.build(off_cfg)
    randomize_official_state(off_model, seed)
    report.timings["build official"] = time.perf_counter() - t
    bb = off_cfg.model.backbone
    mid_index, num_layers = bb.out_indices[0], bb.num_layers
    log(
        f"{model}: official {os.path.basename(off_rel)}: {bb.embed_dims}-d, {num_layers} layers, "
        f"association after block {mid_index}, deit={bb.get('deit', False)}, "
        f"test_cfg {dict(off_cfg.model.test_cfg)}"
    )

    opts = []
    if depth:
        opts += [
            "MODEL.TIMM.EXTRA_ARGS",
            str(_extra_args_with_depth(our_rel, depth)),
            "MODEL.TIMM.OUT_INDICES",
            str([mid_index, num_layers - 1]),
        ]
    if crop_size:
        opts += ["TEST.PER_PIXEL.CROP_SIZE", str(list(crop_size))]
    if stride:
        opts += ["TEST.PER_PIXEL.STRIDE", str(list(stride))]
    t = time.perf_counter()
    ours, cfg = build_ours(os.path.join(REPO, our_rel), opts)
    report.timings["build ours"] = time.perf_counter() - t

    report.rows.append(config_row(official, off_rel, our_rel))
    with tempfile.TemporaryDirectory() as tmp:
        official_path = os.path.join(tmp, "official_regproxy.pth")
        official.save_checkpoint(off_model, official_path)  # mmcv's format, as released
        converted_path = os.path.join(tmp, "converted.pth")
        t = time.perf_counter()
        _load_converter().main([official_path, converted_path])
        report.timings["convert"] = time.perf_counter() - t
        SegCheckpointer(ours, strict=True).load(converted_path)

    g = torch.Generator().manual_seed(seed + 1)
    raw = torch.rand(batch, 3, h, w, generator=g) * 255.0  # RGB image(s), 0..255
    x = (raw - ours.pixel_mean) / ours.pixel_std  # the normalisation of both pipelines
    crop = tuple(off_cfg.model.test_cfg.crop_size)
    p = ours.backbone.size_divisibility  # token stride: 16, or 32 for the hybrids
    if p != bb.patch_size:
        raise ValueError(f"{model}: our token stride {p} != official patch_size {bb.patch_size}")
    hybrid = bb.type == "VisionTransformerHybrid"
    # the token rows use one window-sized input; whole-image inference the image cut to /p
    xw = x[..., : min(h, crop[0]) // p * p, : min(w, crop[1]) // p * p]
    xm = x[..., : h // p * p, : w // p * p]
    hm, wm = xm.shape[-2:]
    whole = SemSegTestTime(mode="whole", size_divisibility=ours.size_divisibility)
    with torch.no_grad():
        t = time.perf_counter()
        off_feats = off_model.backbone(xw)  # (association tokens, final tokens)
        off_stem = off_model.backbone.patch_embed.backbone(xw) if hybrid else None
        off_q = off_model.decode_head(off_feats)
        off_whole = off_model.whole_inference(xm, _meta(hm, wm), False)
        # per image, as ours below: convolution kernels may round differently for another batch
        # size (the hybrids' ResNet stem: 2e-5 relative between batch 1 and 2, official alone)
        off_slide = torch.cat(
            [off_model.slide_inference(x[i : i + 1], _meta(h, w), False) for i in range(batch)]
        )
        report.timings["official forward"] = time.perf_counter() - t
        t = time.perf_counter()
        our_feats = ours.backbone(xw)
        our_stem = ours.backbone.model.patch_embed.backbone(xw) if hybrid else None
        our_q = ours.sem_seg_head.layers(our_feats)
        names = cfg.MODEL.REGPROXY
        our_q_on_off = ours.sem_seg_head.layers(
            {names.ASSOC_FEATURE: off_feats[0], names.CLS_FEATURE: off_feats[1]}
        )
        our_whole = whole(ours.dense_logits, xm, (hm, wm))
        our_slide = torch.cat(
            [ours.test_time(ours.dense_logits, x[i : i + 1], (h, w)) for i in range(batch)]
        )
        inputs = [{"image": raw[i], "height": h, "width": w} for i in range(batch)]
        our_forward = torch.stack([r["sem_seg"] for r in ours(inputs)])
        report.timings["our forward"] = time.perf_counter() - t

    gh, gw = xw.shape[-2] // p, xw.shape[-1] // p
    if mid_index == -1:
        assoc = f"association tokens, token embedding (block -1) (B,D,{gh},{gw})"
    else:
        assoc = f"association tokens, after block {mid_index} (B,D,{gh},{gw})"
    res = f"1/{p // int(off_cfg.model.decode_head.region_res[0])}"
    rows = []
    if hybrid:
        rows.append((f"ResNetV2 stem features {tuple(off_stem.shape)}", our_stem, off_stem))
    rows += [
        (assoc, our_feats[names.ASSOC_FEATURE], off_feats[0]),
        (
            f"final tokens, block {num_layers - 1} + LayerNorm",
            our_feats[names.CLS_FEATURE],
            off_feats[1],
        ),
        (f"{res} logits {tuple(off_q.shape)}", our_q, off_q),
        (f"{res} logits, our head on the official tokens", our_q_on_off, off_q),
        (f"whole-image logits {tuple(off_whole.shape)}", our_whole, off_whole),
        (f"sliding-window logits {tuple(off_slide.shape)}", our_slide, off_slide),
        ("model.forward(raw image) vs official slide", our_forward, off_slide),
    ]
    for name, a, b in rows:
        report.rows.append(_tensor_row(name, a, b, rtol))
    report.rows.append(_argmax_row("argmax, whole image", our_whole, off_whole, margin))
    report.rows.append(_argmax_row("argmax, sliding window", our_slide, off_slide, margin))
    if info_rows:
        _add_info_rows(report, ours, off_model, x, xm, off_whole, rtol, h, w)
    return report


def _add_info_rows(report, ours, off_model, x, xm, off_whole, rtol, h, w) -> None:
    """Rows showing what the deliberate differences change (they never fail): timm's antialiased
    position-embedding resampling on the whole (B, 3, hm, wm) image ``xm``, and whole-image
    inference on a crop of ``x`` whose sides are not multiples of the token stride p."""
    whole = SemSegTestTime(mode="whole", size_divisibility=ours.size_divisibility)
    with torch.no_grad():
        ours.backbone.pos_embed_antialias = True
        try:
            alt = whole(ours.dense_logits, xm, tuple(xm.shape[-2:]))
        finally:
            ours.backbone.pos_embed_antialias = False
    p = ours.backbone.size_divisibility
    grid = tuple(ours.backbone.model.patch_embed.grid_size)
    same = grid == (xm.shape[-2] // p, xm.shape[-1] // p)
    note = "no resampling at this size" if same else "pos_embed_antialias=True (timm's)"
    report.rows.append(
        _tensor_row(
            "whole-image logits, antialiased pos-embed (info)",
            alt,
            off_whole,
            rtol,
            note,
            info=True,
        )
    )
    # whole image whose sides are not multiples of p
    ho, wo = max(h // p * p - 7, p + 1), max(w // p * p - 9, p + 1)
    xo = x[..., :ho, :wo]
    with torch.no_grad():
        off = off_model.whole_inference(xo, _meta(ho, wo), False)
        our = whole(ours.dense_logits, xo, (ho, wo))
    report.rows.append(
        _tensor_row(
            f"whole image {ho}x{wo} (not /{p}) (info)",
            our,
            off,
            rtol,
            "official resizes padded-grid logits; ours crops",
            info=True,
        )
    )


def _extra_args_with_depth(our_rel: str, depth: int) -> List[str]:
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, our_rel), allow_unsafe=False)
    args = [a for a in cfg.MODEL.TIMM.EXTRA_ARGS if not a.startswith("depth=")]
    return args + [f"depth={depth}"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official-root", help="YiF-Zhang/RegionProxy source (models/, configs/)")
    parser.add_argument("--mm-site", help="folder with mmcv 1.3.x, mmseg 0.17 and einops")
    parser.add_argument("--model", default="t16-ade20k", choices=sorted(MODELS) + ["all"])
    parser.add_argument("--size", type=int, nargs=2, default=[512, 683], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--depth", type=int, default=0, help="override the ViT depth (both)")
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--margin", type=float, default=1e-4)
    parser.add_argument("--no-info-rows", action="store_true")
    args = parser.parse_args(argv)
    official = OfficialCode(*find_official(args.official_root, args.mm_site))
    ok = True
    for name in sorted(MODELS) if args.model == "all" else [args.model]:
        report = compare(
            official,
            name,
            size=args.size,
            batch=args.batch,
            depth=args.depth,
            crop_size=args.crop_size,
            stride=args.stride,
            seed=args.seed,
            rtol=args.rtol,
            margin=args.margin,
            info_rows=not args.no_info_rows,
        )
        print(report.format(), flush=True)
        ok &= report.ok
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
