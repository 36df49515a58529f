#!/usr/bin/env python
"""Numerical parity check: our Panoptic SegFormer vs the official one (zhiqi-li/Panoptic-SegFormer).

Proves ``tools/convert_panoptic_segformer_weights.py`` and our model end to end:

1. the official detector (``mmdet.models.build_detector`` on an official config of
   :data:`BACKBONES`, ``--backbone``: ``configs/panformer/panformer_{r50,swinl,pvtb5}_24e_coco_
   panoptic.py``, whose ``PanSeg`` / ``PanformerHead`` /
   ``Deformable_Transformer`` / ``MaskHead`` the official ``easymd.models`` package registers;
   imported at run time from ``--official-root``, no file is copied or modified) is built on the
   CPU, made small by overriding layer and query counts (:func:`official_config`), and given
   random weights (every floating-point tensor; :func:`randomize_official_state`);
2. it is saved with mmcv's ``save_checkpoint`` (the official checkpoint format);
3. that file is converted with ``tools/convert_panoptic_segformer_weights.py`` (its command-line
   ``main``, with ``--config-file``: keys and shapes are checked against our model) and loaded
   into ours, built from the matching config under ``configs/coco/panoptic-segmentation/
   panoptic_segformer/`` with the same overrides, with ``SegCheckpointer`` (strict);
4. both run in eval mode on the same random image, and the report compares, as
   max |ours - official| and relative to max |official|: the backbone features (res3-res5),
   the encoder output (all 4 levels, official order 1/8 -> 1/64), the location decoder's class
   logits and boxes of every layer, the top-100 (query, class) selection, the thing and stuff
   mask decoders' final masks and the stuff scores, and the final panoptic map (number of
   segments, COCO category per pixel, segment ids up to renumbering).

The official head hard-codes COCO (``labels < 80``, stuff labels ``arange(80, 134)``,
``easymd.datasets.coco_panoptic.id_and_category_maps`` for the category ids), so the comparison
uses COCO's 80 + 53 classes on both sides (ours reads them from the ``coco_2017_train_panoptic``
metadata, which needs no data on disk).

Two input-side settings must agree; rows downstream of a difference are marked "(info)"
(shown, never failing) while it is in effect:

- the encoder's sine positional encoding: mmdet's ``SinePositionalEncoding(offset=-0.5)`` in the
  official configs, ``MODEL.MSDEFORM_PIXEL_DECODER.POS_OFFSET`` (-0.5 in our COCO configs, 0 in
  the shared encoder's default) in ours. ``--official-pos-offset`` (default -0.5, as the
  configs are written) sets the official value, ``--our-pos-offset`` ours (default: the
  config's);
- padding: the official test pipeline never pads; ours pads to
  ``MODEL.PANOPTIC_SEGFORMER.SIZE_DIVISIBILITY`` without a padding mask (0 in our COCO configs:
  no padding; ``--size-divisibility 32`` shows the difference on sizes not multiples of 32).

With equal offsets and no padding every row must agree to float32 precision.

Usage::

    python tools/compare_with_official_panoptic_segformer.py \\
        --official-root /work/ref/PanopticSegFormer --mm-site /work/ref/mm017/site \\
        --mmdet-site /work/ref/psf_site
    # both configs as written (offset -0.5 on both sides, no padding), a size not a multiple of 32
    python tools/compare_with_official_panoptic_segformer.py ... --size 120 150
    # the deviations made visible: ours without the offset / with padding to 32
    python tools/compare_with_official_panoptic_segformer.py ... --our-pos-offset 0
    python tools/compare_with_official_panoptic_segformer.py ... --size 120 150 \
        --size-divisibility 32
    # the other official backbones (Swin-L shortened to 2 blocks per stage, PVTv2-B5)
    python tools/compare_with_official_panoptic_segformer.py ... --backbone swinl

``--official-root`` is a zhiqi-li/Panoptic-SegFormer checkout; ``--mm-site`` a folder with mmcv
1.3.x (the "lite" build without compiled ops is enough) and einops; ``--mmdet-site`` a folder with
the pure-Python mmdet 2.12.0 package (the official pin) plus its small pure-Python dependencies
``terminaltables`` and ``six``. The two library folders are appended to ``sys.path`` of this
process (after the environment's own packages); the official root is not put on it.
Environment variables PSF_OFFICIAL_ROOT, PSF_MM_SITE and PSF_MMDET_SITE are the defaults.

Run-time changes made to run the official code here (none of its files is modified):

- ``mmcv._ext`` (compiled ops, absent from the lite build) is a stand-in whose every attribute
  raises RuntimeError when called (shared with ``compare_with_official_regproxy.py``).
- mmcv's ``MultiScaleDeformableAttnFunction.apply`` (the compiled deformable attention, which
  mmcv calls whenever CUDA is available, even for CPU tensors) is routed to mmcv's own
  pure-PyTorch ``multi_scale_deformable_attn_pytorch``. Without CUDA mmcv 1.3.13 takes that path
  itself but calls it with 6 arguments (``level_start_index`` and ``im2col_step`` too) while it
  accepts 4 (a TypeError in mmcv 1.3.13's CPU branch); the module-level name is replaced by a
  wrapper that drops the two extra arguments. No other compiled op is on this model's path
  (ResNet, Swin, PVTv2, GroupNorm, ``nn.MultiheadAttention``, the mask heads: plain PyTorch).
- mmcv's ``Registry`` scope inference (``inspect.stack``) is made fast while importing (shared
  helper, see the RegProxy tool).
- The top-level ``easymd`` package is a stand-in module whose ``__path__`` is the official
  ``easymd/`` folder, so that ``easymd/__init__.py`` (which imports ``analysis_tools``,
  ``datasets``, training APIs with extra dependencies such as seaborn) is not executed; only
  ``easymd.models`` (and, through the head, ``easymd.datasets.coco_panoptic``) are imported.
- The official config's ``pretrained='torchvision://resnet50'`` is set to None and its
  ``train_cfg`` to None (no download, no training assigners); the layer / query counts are
  overridden (``--enc-layers`` ...); the positional-encoding offset as above.
- Swin-L: the published ``panformer_swinl`` config inherits ``base.py``'s ResNet keys
  (``depth``, ``num_stages``, ``norm_cfg``, ``norm_eval``, ``style``; mmcv merges the backbone
  dicts), which the official ``SwinTransformer`` rejects (TypeError); they are removed
  (:data:`OFFICIAL_BROKEN_KEYS`).

Tolerance: max |diff| <= ``--rtol`` (default 1e-4) x max |official| per tensor; the panoptic map
must be identical (same segments, categories and pixels).
"""

import argparse
import contextlib
import importlib.util
import os
import re
import sys
import tempfile
import time
import types
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import ImageList

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from compare_with_official_regproxy import (  # noqa: E402  (shared run-time stand-ins)
    _fast_registry_scope,
    _mmcv_ext_standin,
)

from seg_methods.config import get_cfg  # noqa: E402
from seg_methods.utils.checkpoint import SegCheckpointer  # noqa: E402
from seg_methods.utils.parity import Report, Row, randomize_state  # noqa: E402

_OFF = "configs/panformer/"
_OURS = "configs/coco/panoptic-segmentation/panoptic_segformer/"
# backbone -> (official config, our config, official backbone overrides, our overrides); the
# overrides shorten Swin-L to 2 blocks per stage on both sides (CPU-sized)
BACKBONES: Dict[str, Tuple[str, str, Dict[str, object], List[str]]] = {
    "r50": (
        _OFF + "panformer_r50_24e_coco_panoptic.py",
        _OURS + "panoptic_segformer_R50_bs8_24ep.yaml",
        {},
        [],
    ),
    "swinl": (
        _OFF + "panformer_swinl_24e_coco_panoptic.py",
        _OURS + "panoptic_segformer_swin_large_bs8_24ep.yaml",
        {"depths": [2, 2, 2, 2]},
        ["MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]"],
    ),
    "pvtb5": (
        _OFF + "panformer_pvtb5_24e_coco_panoptic.py",
        _OURS + "panoptic_segformer_pvtv2_b5_bs8_24ep.yaml",
        {},
        [],
    ),
}
# The published panformer_swinl config inherits base.py's ResNet keys (mmcv merges the backbone
# dicts), which the official SwinTransformer.__init__ does not accept (TypeError); removed here.
OFFICIAL_BROKEN_KEYS: Dict[str, Tuple[str, ...]] = {
    "swinl": ("depth", "num_stages", "norm_cfg", "norm_eval", "style"),
}


# --------------------------------------------------------------------------- official side
def find_official(
    root: Optional[str], mm_site: Optional[str], mmdet_site: Optional[str]
) -> Tuple[str, str, str]:
    """Check the three folders (or PSF_OFFICIAL_ROOT / PSF_MM_SITE / PSF_MMDET_SITE).

    Raises:
        FileNotFoundError: naming the option / variable whose folder lacks what is needed.
    """
    root = root or os.environ.get("PSF_OFFICIAL_ROOT")
    mm_site = mm_site or os.environ.get("PSF_MM_SITE")
    mmdet_site = mmdet_site or os.environ.get("PSF_MMDET_SITE")
    if not root or not os.path.isfile(
        os.path.join(root, "easymd", "models", "panformer", "panformer_head.py")
    ):
        raise FileNotFoundError(
            f"official Panoptic SegFormer source not found at {root!r} (PSF_OFFICIAL_ROOT / "
            "--official-root: a zhiqi-li/Panoptic-SegFormer checkout with easymd/models/)"
        )
    if not mm_site or not all(os.path.isdir(os.path.join(mm_site, p)) for p in ("mmcv", "einops")):
        raise FileNotFoundError(
            f"mmcv / einops not found in {mm_site!r} (PSF_MM_SITE / --mm-site: a folder holding "
            "mmcv 1.3.x and einops)"
        )
    if not mmdet_site or not all(
        os.path.exists(os.path.join(mmdet_site, p)) for p in ("mmdet", "terminaltables", "six.py")
    ):
        raise FileNotFoundError(
            f"mmdet / terminaltables / six not found in {mmdet_site!r} (PSF_MMDET_SITE / "
            "--mmdet-site: a folder holding the pure-Python mmdet 2.12.0 package, terminaltables "
            "and six.py)"
        )
    return root, mm_site, mmdet_site


def _route_msda_to_pytorch() -> None:
    """mmcv's multi-scale deformable attention -> its pure-PyTorch version, on both branches of
    ``MultiScaleDeformableAttention.forward`` (compiled op when CUDA is available, else
    ``multi_scale_deformable_attn_pytorch``, which mmcv 1.3.13 calls with 6 arguments although
    it takes 4; the extra ``level_start_index`` / ``im2col_step`` are dropped here)."""
    from mmcv.ops import multi_scale_deform_attn as msda

    pytorch_fn = getattr(msda, "_psf_parity_original", msda.multi_scale_deformable_attn_pytorch)
    msda._psf_parity_original = pytorch_fn

    def routed(value, spatial_shapes, *rest):
        if len(rest) == 4:  # (level_start_index, locations, weights, im2col_step)
            rest = rest[1:3]
        return pytorch_fn(value, spatial_shapes, *rest)

    msda.multi_scale_deformable_attn_pytorch = routed
    msda.MultiScaleDeformableAttnFunction.apply = staticmethod(routed)


class OfficialCode:
    """mmcv, mmdet 2.12 and the official ``easymd.models``, imported into this process once.

    ``--mm-site`` / ``--mmdet-site`` are appended to ``sys.path`` (after this environment's own
    packages, so nothing else in the process changes; mmcv and mmdet are imported lazily at build
    time, so they stay there); ``--official-root`` is never put on ``sys.path``: the stand-in
    ``easymd`` package points into it.

    Raises:
        ImportError: mmcv or mmdet came from elsewhere than the given folders.
    """

    def __init__(self, root: str, mm_site: str, mmdet_site: str):
        self.root = root
        for p in (mm_site, mmdet_site):
            if p not in sys.path:
                sys.path.append(p)
        sys.modules.setdefault("mmcv._ext", _mmcv_ext_standin())
        if "easymd" not in sys.modules:  # skip easymd/__init__.py (see the module docstring)
            pkg = types.ModuleType("easymd")
            pkg.__path__ = [os.path.join(root, "easymd")]
            sys.modules["easymd"] = pkg
        with _fast_registry_scope():
            import mmcv
            import mmdet
            import easymd.models  # noqa: F401  (registers PanSeg, PanformerHead, MaskHead, ...)
            from mmcv.runner import save_checkpoint
            from mmdet.models import build_detector
        for mod, site in ((mmcv, mm_site), (mmdet, mmdet_site)):
            if not os.path.realpath(mod.__file__).startswith(os.path.realpath(site) + os.sep):
                raise ImportError(f"{mod.__name__} imported from {mod.__file__}, not from {site}")
        _route_msda_to_pytorch()
        self.mmcv, self.build_detector, self.save_checkpoint = mmcv, build_detector, save_checkpoint


def official_config(
    official: OfficialCode, sizes: Dict[str, int], pos_offset: float, backbone: str = "r50"
):
    """The official config of ``backbone`` (:data:`BACKBONES`) with ``sizes`` (enc_layers,
    dec_layers, thing_layers, stuff_layers, queries), the backbone overrides and the
    positional-encoding offset overridden."""
    rel, _, backbone_overrides, _ = BACKBONES[backbone]
    with _fast_registry_scope():
        cfg = official.mmcv.Config.fromfile(os.path.join(official.root, rel))
    m = cfg.model
    for key in OFFICIAL_BROKEN_KEYS.get(backbone, ()):
        m.backbone.pop(key)
    m.backbone.update(backbone_overrides)
    m.pretrained = None
    m.train_cfg = None
    head = m.bbox_head
    head.num_query = sizes["queries"]
    head.transformer.encoder.num_layers = sizes["enc_layers"]
    head.transformer.decoder.num_layers = sizes["dec_layers"]
    head.thing_transformer_head.num_decoder_layers = sizes["thing_layers"]
    head.stuff_transformer_head.num_decoder_layers = sizes["stuff_layers"]
    head.positional_encoding.offset = pos_offset
    return cfg


def randomize_official_state(model: torch.nn.Module, seed: int, mask_bias: float = 0.0) -> None:
    """Fresh random values for every floating-point tensor of the official state dict
    (:func:`~seg_methods.utils.parity.randomize_state` with ``matrices="fresh"``): matrices /
    convolutions N(0, 1 / fan_in); norm weights U(0.5, 1.5); biases and BN running means
    N(0, 0.1^2) (``sampling_offsets`` biases N(0, 2^2): offsets of a few pixels; the mask
    heads' first attention-map biases ``+ mask_bias``); running variances U(0.5, 2); embeddings
    (queries, level embeddings) N(0, 1). Fresh values (not the module's initialisation) because
    mmcv's ``level_embeds`` is an uninitialised tensor until ``init_weights`` and
    ``init_weights`` zeroes the sampling-offset weights.
    """

    def rules(key, value, g):
        last = key.split(".")[-1]
        if "sampling_offsets" in key and last == "bias":
            return torch.randn(value.shape, generator=g) * 2.0
        if mask_bias and re.fullmatch(r".+_mask_head\.attnen\.linear\.0\.bias", key):
            return torch.randn(value.shape, generator=g) * 0.1 + mask_bias
        if last == "level_embeds" or key.split(".")[-2] in ("query_embedding", "stuff_query"):
            return torch.randn(value.shape, generator=g)
        if last != "bias" and last.endswith("bias"):
            # nn.MultiheadAttention's in_proj_bias: drawn as a norm weight (1-D) or a matrix,
            # the draws the README's parity numbers were measured with
            if value.dim() == 1:
                return torch.rand(value.shape, generator=g) + 0.5
            return torch.randn(value.shape, generator=g) / float(np.prod(value.shape[1:])) ** 0.5
        return None

    randomize_state(model, seed, matrices="fresh", special=rules)


# --------------------------------------------------------------------------- our side
def our_opts(sizes: Dict[str, int]) -> List[str]:
    """Config overrides giving our model the official model's sizes."""
    return [
        "MODEL.WEIGHTS",
        "",
        "MODEL.MSDEFORM_PIXEL_DECODER.TRANSFORMER_ENC_LAYERS",
        str(sizes["enc_layers"]),
        "MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS",
        str(sizes["dec_layers"]),
        "MODEL.PANOPTIC_SEGFORMER.THING_MASK_LAYERS",
        str(sizes["thing_layers"]),
        "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_LAYERS",
        str(sizes["stuff_layers"]),
        "MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES",
        str(sizes["queries"]),
    ]


def build_ours(config_file: str, opts: Sequence[str]) -> Tuple[torch.nn.Module, object]:
    cfg = get_cfg()
    cfg.merge_from_file(config_file, allow_unsafe=False)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.TIMM.PRETRAINED = False  # PVTv2: no download
    return build_model(cfg).eval(), cfg


def _load_converter():
    spec = importlib.util.spec_from_file_location(
        "convert_panoptic_segformer_weights",
        os.path.join(REPO, "tools", "convert_panoptic_segformer_weights.py"),
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- comparison
@contextlib.contextmanager
def _capture(modules: Dict[str, torch.nn.Module]) -> Iterator[Dict[str, object]]:
    """Record the output of each module's (last) forward call."""
    got: Dict[str, object] = {}
    handles = [
        m.register_forward_hook(lambda mod, inp, out, n=n: got.__setitem__(n, out))
        for n, m in modules.items()
    ]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def _max(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _tensor_row(name: str, ours: torch.Tensor, off: torch.Tensor, rtol: float, info: bool) -> Row:
    """max |ours - official| against ``rtol`` x max |official|; info rows never fail."""
    if tuple(ours.shape) != tuple(off.shape):
        note = f"shapes {tuple(ours.shape)} vs {tuple(off.shape)}"
        return Row(name, float("inf"), _max(off), info, note)
    diff = _max(ours.float() - off.float())
    return Row(name, diff, _max(off), info or diff <= rtol * _max(off))


def _panoptic_rows(ours: Dict, off_map: np.ndarray, meta, info: bool) -> List[Row]:
    """Rows for the final panoptic maps: ours (segment map + segments_info, contiguous ids)
    against the official (H, W, 2) array (COCO category id, instance id)."""
    seg, infos = ours["panoptic_seg"]
    seg = seg.numpy()
    contiguous_to_id = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    contiguous_to_id.update({v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()})
    our_cat = np.zeros(seg.shape, dtype=np.int64)
    for s in infos:
        our_cat[seg == s["id"]] = contiguous_to_id[int(s["category_id"])]
    off_cat, off_inst = off_map[..., 0], off_map[..., 1]
    # official segments: things by instance id, stuff by category
    off_seg = np.where(off_inst > 0, off_inst + 1000, off_cat)
    off_n = len([u for u in np.unique(off_seg) if u != 0])
    our_n = len(infos)
    cat_diff = float((our_cat != off_cat).mean())
    # segments equal up to renumbering: the pairs (ours, official) form a bijection
    pairs = set(zip(seg.ravel().tolist(), off_seg.ravel().tolist()))
    same_partition = len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    tag = " (info)" if info else ""
    return [
        Row(
            f"panoptic: number of segments{tag}",
            abs(our_n - off_n),
            off_n,
            info or our_n == off_n,
            f"ours {our_n}, official {off_n}",
        ),
        Row(
            f"panoptic: COCO category per pixel{tag}",
            cat_diff,
            1.0,
            info or cat_diff == 0.0,
            f"{int((our_cat != off_cat).sum())} of {our_cat.size} pixels differ",
        ),
        Row(
            f"panoptic: segments up to renumbering{tag}",
            0.0 if same_partition else 1.0,
            1.0,
            info or same_partition,
            "same partition" if same_partition else "partitions differ",
        ),
    ]


def compare(
    official: OfficialCode,
    *,
    backbone: str = "r50",
    size: Sequence[int] = (128, 160),
    sizes: Optional[Dict[str, int]] = None,
    pos_offset: float = -0.5,
    our_pos_offset: Optional[float] = None,
    size_divisibility: Optional[int] = None,
    score_threshold: Optional[float] = None,
    mask_bias: float = 0.0,
    seed: int = 0,
    rtol: float = 1e-4,
    log: Callable[[str], None] = print,
) -> Report:
    """Run the whole check (see the module docstring); returns the report."""
    sizes = dict(
        sizes or dict(enc_layers=2, dec_layers=2, thing_layers=2, stuff_layers=2, queries=50)
    )
    h, w = int(size[0]), int(size[1])
    report = Report()

    t = time.perf_counter()
    off_cfg = official_config(official, sizes, pos_offset, backbone)
    off_model = official.build_detector(off_cfg.model).eval()
    randomize_official_state(off_model, seed, mask_bias)
    off_head = off_model.bbox_head
    report.timings["build official"] = time.perf_counter() - t
    our_config = os.path.join(REPO, BACKBONES[backbone][1])
    opts = our_opts(sizes) + BACKBONES[backbone][3]
    if size_divisibility is not None:
        opts += ["MODEL.PANOPTIC_SEGFORMER.SIZE_DIVISIBILITY", str(size_divisibility)]
    if our_pos_offset is not None:
        opts += ["MODEL.MSDEFORM_PIXEL_DECODER.POS_OFFSET", str(our_pos_offset)]
    if score_threshold is not None:  # both sides alike
        off_head.quality_threshold_things = off_head.quality_threshold_stuff = score_threshold
        opts += [
            "MODEL.PANOPTIC_SEGFORMER.THING_SCORE_THRESHOLD",
            str(score_threshold),
            "MODEL.PANOPTIC_SEGFORMER.STUFF_SCORE_THRESHOLD",
            str(score_threshold),
        ]
    t = time.perf_counter()
    ours, cfg = build_ours(our_config, opts)
    our_pos_offset = cfg.MODEL.MSDEFORM_PIXEL_DECODER.POS_OFFSET
    report.timings["build ours"] = time.perf_counter() - t
    report.model = (
        f"Panoptic SegFormer {backbone}, {h}x{w}, pos offset official {pos_offset} / ours "
        f"{our_pos_offset}, our SIZE_DIVISIBILITY {ours.size_divisibility}"
    )
    log(f"sizes {sizes}; {report.model}")

    with tempfile.TemporaryDirectory() as tmp:
        official_path = os.path.join(tmp, "official_panoptic_segformer.pth")
        official.save_checkpoint(off_model, official_path)  # mmcv's format, as released
        converted = os.path.join(tmp, "converted.pth")
        t = time.perf_counter()
        rc = _load_converter().main([official_path, converted, "--config-file", our_config] + opts)
        if rc != 0:
            raise RuntimeError("the converter refused the official state dict (see above)")
        report.timings["convert"] = time.perf_counter() - t
        SegCheckpointer(ours, strict=True).load(converted)

    g = torch.Generator().manual_seed(seed + 1)
    raw = torch.rand(3, h, w, generator=g) * 255.0  # an RGB image, 0..255
    x = ((raw - ours.pixel_mean) / ours.pixel_std)[None]  # the normalisation of both pipelines
    images = ImageList.from_tensors([x[0]], ours.size_divisibility)  # ours pads (no mask)
    padded = tuple(images.tensor.shape[-2:]) != (h, w)  # the official test pipeline never pads
    # rows downstream of a deliberate difference become info rows
    deviates = pos_offset != our_pos_offset or padded
    metas = [
        dict(
            batch_input_shape=(h, w),
            img_shape=(h, w, 3),
            ori_shape=(h, w, 3),
            pad_shape=(h, w, 3),
            scale_factor=np.ones(4, dtype=np.float32),
            filename="parity.png",
            flip=False,
        )
    ]
    with torch.no_grad():
        t = time.perf_counter()
        capture = {
            "encoder": off_head.transformer.encoder,
            "things": off_head.things_mask_head,
            "stuff": off_head.stuff_mask_head,
        }
        with _capture(capture) as got:
            off_feats = off_model.backbone(x)
            off_out = off_head(off_model.neck(off_feats), metas)
            off_res = off_head.get_bboxes(*off_out, metas, rescale=False)
        report.timings["official forward"] = time.perf_counter() - t

        t = time.perf_counter()
        our_feats = ours.backbone(images.tensor)
        _, _, maps = ours.sem_seg_head.pixel_decoder.forward_features(our_feats)
        our_out = ours.forward_head(images, [])
        our_res = ours([{"image": raw, "height": h, "width": w}])[0]
        report.timings["our forward"] = time.perf_counter() - t

    rows: List[Tuple[str, torch.Tensor, torch.Tensor, bool]] = []
    for i, name in enumerate(("res3", "res4", "res5")):
        rows.append(
            (f"backbone {name} {tuple(off_feats[i].shape)}", our_feats[name], off_feats[i], padded)
        )
    enc_off = got["encoder"].permute(1, 0, 2)  # (B, S, C), levels 1/8 .. 1/64
    enc_ours = torch.cat([m.flatten(2).transpose(1, 2) for m in maps[::-1]], 1)
    rows.append((f"encoder output, 4 levels {tuple(enc_off.shape)}", enc_ours, enc_off, deviates))
    off_cls, off_box = off_out[0], off_out[1]  # (layers, B, Q, K), (layers, B, Q, 4)
    our_cls = [a["pred_logits"] for a in our_out["aux_outputs"]] + [our_out["pred_logits"]]
    our_box = [a["pred_boxes"] for a in our_out["aux_outputs"]] + [our_out["pred_boxes"]]
    for lvl in range(off_cls.shape[0]):
        rows.append(
            (
                f"location decoder layer {lvl}: class logits {tuple(off_cls[lvl].shape)}",
                our_cls[lvl],
                off_cls[lvl],
                deviates,
            )
        )
        rows.append(
            (
                f"location decoder layer {lvl}: boxes (cx,cy,w,h)",
                our_box[lvl],
                off_box[lvl],
                deviates,
            )
        )
    off_index, off_bbox, off_labels = off_head._get_bboxes_single(
        off_cls[-1][0], off_box[-1][0], (h, w, 3), None, False
    )
    rows.append(
        ("top-100 (query, class) scores", our_out["topk_scores"][0], off_bbox[:, 4], deviates)
    )
    off_sel_boxes = off_box[-1][0][off_index]
    same_sel = bool(torch.equal(our_out["topk_labels"][0], off_labels)) and bool(
        torch.allclose(our_out["topk_boxes"][0], off_sel_boxes, rtol=0, atol=1e-5)
    )
    rows_extra = [
        Row(
            "top-100 selection: same labels in the same order" + (" (info)" if deviates else ""),
            0.0 if same_sel else 1.0,
            1.0,
            deviates or same_sel,
        )
    ]
    mh, mw = off_feats[0].shape[-2:]  # the 1/8 level
    off_things = got["things"][0].reshape(-1, mh, mw)
    off_stuff = got["stuff"][0].reshape(-1, mh, mw)
    rows.append(
        (
            f"thing mask decoder: final masks {tuple(off_things.shape)}",
            our_out["thing_masks"][0],
            off_things,
            deviates,
        )
    )
    rows.append(
        (
            f"stuff mask decoder: final masks {tuple(off_stuff.shape)}",
            our_out["stuff_masks"][0],
            off_stuff,
            deviates,
        )
    )
    with torch.no_grad():
        off_stuff_logits = off_head.cls_stuff_branches[-1](got["stuff"][2][-1]).reshape(-1)
    rows.append(
        (
            "stuff scores (logits, last block)",
            our_out["stuff_logits_aux"][-1][0],
            off_stuff_logits,
            deviates,
        )
    )
    for name, a, b, info in rows:
        report.rows.append(_tensor_row(name + (" (info)" if info else ""), a, b, rtol, info))
    report.rows += rows_extra
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
    report.rows += _panoptic_rows(our_res, off_res["panoptic"][0][0], meta, deviates)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official-root", help="zhiqi-li/Panoptic-SegFormer source")
    parser.add_argument("--mm-site", help="folder with mmcv 1.3.x and einops")
    parser.add_argument("--mmdet-site", help="folder with mmdet 2.12.0, terminaltables, six")
    parser.add_argument("--backbone", default="r50", choices=sorted(BACKBONES))
    parser.add_argument("--size", type=int, nargs=2, default=[128, 160], metavar=("H", "W"))
    parser.add_argument("--enc-layers", type=int, default=2)
    parser.add_argument("--dec-layers", type=int, default=2)
    parser.add_argument("--thing-layers", type=int, default=2)
    parser.add_argument("--stuff-layers", type=int, default=2)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--official-pos-offset", type=float, default=-0.5)
    parser.add_argument(
        "--our-pos-offset",
        type=float,
        default=None,
        help="our MODEL.MSDEFORM_PIXEL_DECODER.POS_OFFSET (default: the config's, -0.5)",
    )
    parser.add_argument(
        "--size-divisibility",
        type=int,
        default=None,
        help="our MODEL.PANOPTIC_SEGFORMER.SIZE_DIVISIBILITY (default: the config's 0)",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="merging score threshold, both sides (default: the configs' 0.25)",
    )
    parser.add_argument(
        "--mask-bias",
        type=float,
        default=0.0,
        help="added to the official mask tails' fusion bias (sparser masks: more "
        "panoptic segments to compare)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    official = OfficialCode(*find_official(args.official_root, args.mm_site, args.mmdet_site))
    sizes = dict(
        enc_layers=args.enc_layers,
        dec_layers=args.dec_layers,
        thing_layers=args.thing_layers,
        stuff_layers=args.stuff_layers,
        queries=args.queries,
    )
    report = compare(
        official,
        backbone=args.backbone,
        size=args.size,
        sizes=sizes,
        pos_offset=args.official_pos_offset,
        our_pos_offset=args.our_pos_offset,
        size_divisibility=args.size_divisibility,
        score_threshold=args.score_threshold,
        mask_bias=args.mask_bias,
        seed=args.seed,
        rtol=args.rtol,
    )
    print(report.format(), flush=True)
    print("PARITY OK" if report.ok else "PARITY FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
