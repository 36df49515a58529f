#!/usr/bin/env python
"""Numerical parity check: seg_methods' Mask2Former vs the official implementation.

Builds the official model (facebookresearch/Mask2Former, imported from a checkout or from the
unpacked PyPI package ``maskformer2``; never copied into this repository) and ours from
corresponding configs, loads ONE checkpoint into both, and compares on the CPU:

- eval mode, on a padded batch of random images of odd sizes: backbone features, pixel-decoder
  outputs, the head's ``pred_logits`` / ``pred_masks`` and every auxiliary prediction, then the
  final ``sem_seg``, ``panoptic_seg`` + ``segments_info`` and ``instances``;
- train mode, same seed and ground truth: the Hungarian matching of every supervised prediction,
  the sequence of ``torch.rand`` draws (matcher points and importance sampling) and the RNG state
  afterwards, every weighted loss term, and the gradients of the summed loss.

Usage::

    M2F=~/src/Mask2Former  # a checkout of facebookresearch/Mask2Former
    OURS=configs/coco/panoptic-segmentation/mask2former
    python tools/compare_with_official_mask2former.py --official-root $M2F \\
        --config-file $OURS/mask2former_R50_bs16_50ep.yaml
    # with the official YAML as well (its model keys are checked against ours first):
    python tools/compare_with_official_mask2former.py --official-root $M2F \\
        --config-file $OURS/mask2former_R50_bs16_50ep.yaml \\
        --official-config $M2F/configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml
    # a released model instead of random weights:
    python tools/compare_with_official_mask2former.py ... --weights model_final_94dc52.pkl

``--official-root`` is a Mask2Former checkout (the folder holding ``mask2former/``) or the
``mask2former`` package folder itself. Swin configs need ``timm`` importable (the official Swin
imports it); ``--python-path DIR`` adds a folder to ``sys.path`` for that.

Without ``--weights``, every floating-point tensor of the official state dict gets random values
(the official initialisation plus normal noise on every tensor; see
:func:`random_official_state`), the result is saved as an official-format ``.pkl`` of numpy
arrays, and loaded into the official model with detectron2's ``DetectionCheckpointer`` and into
ours with ``SegCheckpointer(strict=True)`` (the path users take). The script then checks that
both models hold exactly those values.

How the official code is run (all at run time, nothing in the official files is modified):

- Its ``mask2former`` package is imported under a private alias without running its
  ``__init__.py`` (which registers datasets that ours registers too); only the model modules are
  imported, and they register into private copies of detectron2's BACKBONE / SEM_SEG_HEADS /
  META_ARCH registries, so names such as ``D2SwinTransformer`` do not clash with ours.
- The official CUDA deformable-attention op is not built here. When the module
  ``MultiScaleDeformableAttention`` cannot be imported, a stub whose functions raise is put in
  ``sys.modules`` while the official files are imported: some official versions raise an
  ImportError without it, and with it every version takes its own CPU fallback
  (``ms_deform_attn_core_pytorch``, chosen by the ``except`` around the op call). The script
  counts the calls of that fallback and fails if it was not used.
- The PyPI release ``maskformer2==0.1`` ships a ``criterion.py`` whose ``SetCriterion`` takes the
  three loss weights and the number of auxiliary layers instead of the ``weight_dict`` that its
  own ``maskformer_model.py`` passes (the GitHub code takes ``weight_dict``). Only when the
  signature lacks ``weight_dict``, a small adapter converts one call into the other and checks
  that the criterion's resulting ``weight_dict`` equals the requested one; the loss code is the
  official one either way. The report lists every such patch.

Tolerance: float32 tensors pass when ``max|ours - official| <= rtol * max|official|`` (default
``rtol = 1e-5``, about 80 float32 ulps of the tensor's largest entry). With our PyTorch
reference (``DEFORM_ATTN_IMPL pytorch``) both sides run the same operations in the same order and
the eval outputs are bit-identical. Our compiled deformable-attention kernel sums the bilinear
samples in another order than the official ``grid_sample`` fallback: its pixel-decoder outputs
differ by a few ulps (~5e-7 relative), which the well-conditioned network carries to the head
outputs without growth; anything structural (a wrong layer order, mask, scale, normalisation or
sampling convention) gives relative differences of 1e-3 and more. Rounding-level differences
are turned into discrete ones by thresholds, so, when the head outputs are not bit-identical:
- the decoder's attention masks are compared entry by entry and may differ only where the mask
  logit is within ``--flip-margin`` of 0; if any entry flipped, the comparison is run again with
  the official masks fed to our decoder (the free-running rows are kept, for information);
- final outputs behind thresholds (panoptic ids, segments_info, instance masks/classes/scores,
  semantic argmax) are reported for information, and our inference code is checked exactly on
  the official head outputs instead ("postprocess" rows; ``sem_seg`` stays checked at ``rtol``);
- gradients are compared in L2 norm per group (backbone, pixel decoder, transformer decoder;
  ``--grad-rtol``, default 1e-3): kinks (ReLU, the piecewise-bilinear sampling) make the
  gradient itself sensitive. Measured on the official COCO R50 pixel decoder with these random
  weights: multiplying its input features by ``1 + 1e-7 * N(0, 1)`` moves its parameter gradient
  by 3.4e-4 in L2 (single entries by percents, when a ReLU input sits within rounding distance
  of 0). Our PyTorch reference path stays near 1e-6; the compiled op's backward is checked
  exactly in float64 by tests/layers/test_ms_deform_attn.py.
Matchings, random draws, loss keys and the RNG state must always be identical.
Exit status: 0 when every row passes, 1 otherwise.
"""

import argparse
import collections
import contextlib
import copy
import importlib
import importlib.util
import inspect
import logging
import math
import os
import pickle
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OFFICIAL_ALIAS = "_official_mask2former"
DEFAULT_SIZES = ((200, 249), (128, 160))
# Outputs requested at another size than the input for the first image, as a dataset mapper
# does after resizing (exercises sem_seg_postprocess's crop + resize).
OUTPUT_SCALE_FIRST_IMAGE = 1.5


# =============================================================================================
# Importing the official code
# =============================================================================================
def find_official_package(root: str) -> str:
    """Folder of the official ``mask2former`` package inside ``root``.

    Args:
        root (str): a Mask2Former checkout, an unpacked ``maskformer2`` sdist, or the package
            folder itself.

    Returns:
        str: absolute path of the folder holding ``maskformer_model.py``.
    """
    for cand in (os.path.join(root, "mask2former"), root):
        if os.path.isfile(os.path.join(cand, "maskformer_model.py")) and os.path.isdir(
            os.path.join(cand, "modeling")
        ):
            return os.path.abspath(cand)
    raise FileNotFoundError(
        f"No official Mask2Former package under '{root}' (expected mask2former/maskformer_model.py)"
    )


def _d2_registries():
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

    return (BACKBONE_REGISTRY, SEM_SEG_HEADS_REGISTRY, META_ARCH_REGISTRY)


@contextlib.contextmanager
def _registries_swapped(maps: Sequence[Dict[str, Any]]) -> Iterator[None]:
    """Temporarily replace the object maps of detectron2's registries (see ``_d2_registries``)."""
    regs = _d2_registries()
    saved = [r._obj_map for r in regs]
    for r, m in zip(regs, maps):
        r._obj_map = m
    try:
        yield
    finally:
        for r, m in zip(regs, saved):
            r._obj_map = m


def _not_built(*args, **kwargs):
    raise RuntimeError(
        "MultiScaleDeformableAttention is a stub (the official CUDA op is not built); the "
        "official MSDeformAttn falls back to ms_deform_attn_core_pytorch"
    )


class OfficialCode:
    """The official model modules, imported under an alias with private registries.

    Args:
        root (str): see :func:`find_official_package`.
        with_swin (bool): also import the official Swin backbone (needs ``timm``).

    Attributes:
        modules (dict): short name -> imported official module.
        patches (list[str]): run-time adaptations applied (for the report).
        fallback_calls (int): calls of the official ``ms_deform_attn_core_pytorch`` so far.
    """

    def __init__(self, root: str, with_swin: bool = False):
        self.package_dir = find_official_package(root)
        self.patches: List[str] = []
        self.fallback_calls = 0
        self.registry_maps = [
            {k: v for k, v in r._obj_map.items() if not _is_ours(v)} for r in _d2_registries()
        ]
        self.modules = self._import(with_swin)
        self._count_fallback()
        self._adapt_criterion()

    def _import(self, with_swin: bool) -> Dict[str, types.ModuleType]:
        for name in list(sys.modules):
            if name == OFFICIAL_ALIAS or name.startswith(OFFICIAL_ALIAS + "."):
                del sys.modules[name]
        # Parent packages as bare namespaces: their __init__.py would register datasets.
        for name, path in (
            (OFFICIAL_ALIAS, self.package_dir),
            (OFFICIAL_ALIAS + ".modeling", os.path.join(self.package_dir, "modeling")),
        ):
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            pkg.__package__ = name
            sys.modules[name] = pkg
        stub_added = False
        if importlib.util.find_spec("MultiScaleDeformableAttention") is None:
            stub = types.ModuleType("MultiScaleDeformableAttention")
            stub.ms_deform_attn_forward = _not_built
            stub.ms_deform_attn_backward = _not_built
            sys.modules["MultiScaleDeformableAttention"] = stub
            stub_added = True
            self.patches.append(
                "stub module 'MultiScaleDeformableAttention' (raises when called) during the "
                "import, so the official MSDeformAttn takes its CPU fallback "
                "ms_deform_attn_core_pytorch"
            )
        names = {
            "model": "maskformer_model",
            "config": "config",
            "criterion": "modeling.criterion",
            "head": "modeling.meta_arch.mask_former_head",
            "pixel_decoder": "modeling.pixel_decoder.msdeformattn",
            "ms_deform_attn": "modeling.pixel_decoder.ops.modules.ms_deform_attn",
            "decoder": "modeling.transformer_decoder.mask2former_transformer_decoder",
        }
        if with_swin:
            names["swin"] = "modeling.backbone.swin"
        modules = {}
        try:
            with _registries_swapped(self.registry_maps):
                for key, rel in names.items():
                    modules[key] = importlib.import_module(f"{OFFICIAL_ALIAS}.{rel}")
        finally:
            if stub_added:
                del sys.modules["MultiScaleDeformableAttention"]
        return modules

    def _count_fallback(self):
        mod = self.modules["ms_deform_attn"]
        if not hasattr(mod, "ms_deform_attn_core_pytorch"):
            raise RuntimeError("official ms_deform_attn module has no ms_deform_attn_core_pytorch")
        original = mod.ms_deform_attn_core_pytorch

        def counted(*args, **kwargs):
            self.fallback_calls += 1
            return original(*args, **kwargs)

        mod.ms_deform_attn_core_pytorch = counted

    def _adapt_criterion(self):
        model_mod = self.modules["model"]
        crit_cls = self.modules["criterion"].SetCriterion
        if "weight_dict" in inspect.signature(crit_cls.__init__).parameters:
            return

        def set_criterion_from_weight_dict(num_classes, *, matcher, weight_dict, **kwargs):
            num_layers = sum(1 for k in weight_dict if k.startswith("loss_ce_"))
            crit = crit_cls(
                num_classes,
                matcher,
                weight_dict["loss_ce"],
                weight_dict["loss_mask"],
                weight_dict["loss_dice"],
                num_layers,
                kwargs["eos_coef"],
                kwargs["losses"],
                kwargs["num_points"],
                kwargs["oversample_ratio"],
                kwargs["importance_sample_ratio"],
            )
            if crit.weight_dict != weight_dict:
                raise RuntimeError("criterion adapter: weight_dict differs from the requested one")
            return crit

        model_mod.SetCriterion = set_criterion_from_weight_dict
        self.patches.append(
            "official criterion.py's SetCriterion takes (class_weight, mask_weight, dice_weight, "
            "num_layers) but its maskformer_model.py passes weight_dict (PyPI maskformer2 0.1): "
            "adapter converts the call and checks the resulting weight_dict"
        )

    def default_cfg(self):
        """detectron2 defaults + DeepLab keys + ``add_maskformer2_config`` (as its train_net)."""
        from detectron2.config import get_cfg
        from detectron2.projects.deeplab import add_deeplab_config

        cfg = get_cfg()
        add_deeplab_config(cfg)
        self.modules["config"].add_maskformer2_config(cfg)
        return cfg

    def build_model(self, cfg) -> torch.nn.Module:
        """The official ``MaskFormer`` meta-architecture built from an official config."""
        with _registries_swapped(self.registry_maps):
            model = self.modules["model"].MaskFormer(cfg)
        return model.to(torch.device(cfg.MODEL.DEVICE))


def _is_ours(obj: Any) -> bool:
    return getattr(obj, "__module__", "").startswith("seg_methods")


# =============================================================================================
# Configs
# =============================================================================================
# our key -> official key (values copied unchanged; DEC_LAYERS is handled separately)
KEY_MAP: Tuple[Tuple[str, str], ...] = tuple(
    [(f"MODEL.MSDEFORM_PIXEL_DECODER.{k}", f"MODEL.SEM_SEG_HEAD.{k}") for k in (
        "IN_FEATURES", "CONVS_DIM", "MASK_DIM", "NORM", "COMMON_STRIDE",
        "TRANSFORMER_ENC_LAYERS")]
    + [("MODEL.MSDEFORM_PIXEL_DECODER.TRANSFORMER_IN_FEATURES",
        "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES")]
    # the official pixel decoder reads MASK_FORMER.DROPOUT (its transformer decoder hard-codes 0)
    + [("MODEL.MSDEFORM_PIXEL_DECODER.DROPOUT", "MODEL.MASK_FORMER.DROPOUT")]
    + [(f"MODEL.MASK2FORMER.{k}", f"MODEL.MASK_FORMER.{k}") for k in (
        "HIDDEN_DIM", "NUM_OBJECT_QUERIES", "NHEADS", "DIM_FEEDFORWARD", "PRE_NORM",
        "ENFORCE_INPUT_PROJ", "SIZE_DIVISIBILITY")]
    + [(f"MODEL.MASK_CLS.{k}", f"MODEL.MASK_FORMER.{k}") for k in (
        "DEEP_SUPERVISION", "NO_OBJECT_WEIGHT", "CLASS_WEIGHT", "MASK_WEIGHT", "DICE_WEIGHT",
        "TRAIN_NUM_POINTS", "OVERSAMPLE_RATIO", "IMPORTANCE_SAMPLE_RATIO")]
    + [(f"TEST.{k}", f"MODEL.MASK_FORMER.TEST.{k}") for k in (
        "SEMANTIC_ON", "INSTANCE_ON", "PANOPTIC_ON")]
    + [(f"MODEL.MASK_CLS.{k}", f"MODEL.MASK_FORMER.TEST.{k}") for k in (
        "OBJECT_MASK_THRESHOLD", "OVERLAP_THRESHOLD", "SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE")]
    + [("MODEL.MASK_CLS.TEST_TOPK_PER_IMAGE", "TEST.DETECTIONS_PER_IMAGE")]
)  # fmt: skip
# our keys the official code hard-codes: (key, the only value it supports)
FIXED_IN_OFFICIAL = (
    ("MODEL.MSDEFORM_PIXEL_DECODER.ENC_DIM_FEEDFORWARD", 1024),
    ("MODEL.MSDEFORM_PIXEL_DECODER.ENC_N_POINTS", 4),
    ("MODEL.MASK2FORMER.MASK_ATTENTION_THRESHOLD", 0.5),
    ("MODEL.MASK2FORMER.PIXEL_DECODER_NAME", "Mask2FormerMSDeformAttnPixelDecoder"),
    ("MODEL.MASK2FORMER.TRANSFORMER_DECODER_NAME", "Mask2FormerMaskedAttentionDecoder"),
    ("MODEL.META_ARCHITECTURE", "Mask2Former"),
)
# pairs of our keys that the official code reads from one key (MASK_FORMER.NHEADS sets the heads
# of both its pixel decoder and its transformer decoder)
TIED_IN_OFFICIAL = (("MODEL.MSDEFORM_PIXEL_DECODER.NHEADS", "MODEL.MASK2FORMER.NHEADS"),)
# official keys compared with --official-config: every MODEL leaf except these
OFFICIAL_KEYS_NOT_COMPARED = (
    "MODEL.WEIGHTS",
    "MODEL.DEVICE",
    "MODEL.MASK_FORMER.ENC_LAYERS",  # MaskFormer v1 only
    "MODEL.SEM_SEG_HEAD.LOSS_WEIGHT",  # per-pixel baselines only
    "MODEL.SEM_SEG_HEAD.IGNORE_VALUE",  # not read by the Mask2Former model
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS",  # defined, never read
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS",  # defined, never read
    "MODEL.RESNETS.STEM_TYPE",  # "not used" (official comment)
    "MODEL.RESNETS.RES5_MULTI_GRID",  # "not used" (official comment)
    "MODEL.SWIN.USE_CHECKPOINT",  # memory only
)


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg, key: str, value):
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def _leaves(node, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    from detectron2.config import CfgNode

    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, CfgNode):
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def _norm_value(v):
    if isinstance(v, (list, tuple)):
        return [_norm_value(x) for x in v]
    return v


def our_cfg(config_file: Optional[str], opts: Sequence[str], impl: str):
    """Our config (CPU, no weights), ``MODEL.MSDEFORM_PIXEL_DECODER.DEFORM_ATTN_IMPL = impl``."""
    from seg_methods.config import get_cfg

    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.MSDEFORM_PIXEL_DECODER.DEFORM_ATTN_IMPL = impl
    cfg.freeze()
    return cfg


def official_cfg_from_ours(official: OfficialCode, ours):
    """The official config describing the same model as ``ours`` (see configs/README.md).

    Shared detectron2 keys (backbone, ResNet, Swin, pixel mean/std, datasets) are copied; the
    Mask2Former keys are renamed with :data:`KEY_MAP`; the official ``DEC_LAYERS`` counts the
    learnable-query prediction too (ours + 1).
    """
    for key, value in FIXED_IN_OFFICIAL:
        if _norm_value(_get(ours, key)) != _norm_value(value):
            raise ValueError(
                f"{key} = {_get(ours, key)!r} has no official counterpart (the official code "
                f"hard-codes {value!r}); compare a config with the official value"
            )
    for key_a, key_b in TIED_IN_OFFICIAL:
        if _norm_value(_get(ours, key_a)) != _norm_value(_get(ours, key_b)):
            raise ValueError(
                f"{key_a} = {_get(ours, key_a)!r} and {key_b} = {_get(ours, key_b)!r} differ: the "
                "official code reads both from one key; compare a config where they are equal"
            )
    cfg = official.default_cfg()
    for key, value in _leaves(ours):
        if not (key.startswith("MODEL.") or key.startswith("DATASETS.")):
            continue
        try:
            _get(cfg, key)
        except KeyError:
            continue
        _set(cfg, key, value)
    for ours_key, official_key in KEY_MAP:
        _set(cfg, official_key, _get(ours, ours_key))
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "MaskFormerHead"
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = ours.MODEL.MASK2FORMER.DEC_LAYERS + 1
    cfg.INPUT.FORMAT = ours.INPUT.FORMAT
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def load_official_cfg(official: OfficialCode, path: str, opts: Sequence[str]):
    """An official YAML (``_BASE_`` chains and ``!!python`` tags as the official train_net)."""
    cfg = official.default_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def config_differences(derived, loaded) -> List[Tuple[str, Any, Any]]:
    """Model keys where the official config ``loaded`` differs from the one ``derived`` from ours.

    Returns:
        list of (key, value derived from ours, value in the official file).
    """
    diffs = []
    for key, value in _leaves(loaded):
        if not key.startswith("MODEL.") or key in OFFICIAL_KEYS_NOT_COMPARED:
            continue
        ours_value = _get(derived, key)
        if _norm_value(ours_value) != _norm_value(value):
            diffs.append((key, ours_value, value))
    for key in ("DATASETS.TRAIN", "TEST.DETECTIONS_PER_IMAGE", "INPUT.FORMAT"):
        a, b = _get(derived, key), _get(loaded, key)
        if key == "DATASETS.TRAIN":
            a, b = list(a)[:1], list(b)[:1]  # only the first one is read (metadata)
        if _norm_value(a) != _norm_value(b):
            diffs.append((key, a, b))
    return diffs


# =============================================================================================
# Weights
# =============================================================================================
def random_official_state(
    model: torch.nn.Module, seed: int, class_logit_gain: float = 12.0, mask_logit_gain: float = 8.0
) -> Dict[str, np.ndarray]:
    """Non-trivial random values for every floating-point tensor of the official state dict.

    Starts from the official model's own (seeded, random) initialisation and adds normal noise
    to every tensor, so that no value is left at a constant such as the zero-initialised sampling
    offsets and attention weights of the deformable attention, the unit norm scales or the zero
    biases:

    - tensors whose initial values vary: ``+ N(0, (0.2 * std)^2)`` (the initialisation's scale is
      kept; unlike i.i.d. ``N(0, 1 / fan_in)`` weights, which make the 9-layer decoder chaotic:
      a relative input change of 1e-6 then grows to ~3e-4 at its output, in the official model as
      in ours, so float rounding could not be told apart from a real difference);
    - constant tensors with >= 2 dims (zero-initialised weights): ``+ N(0, 0.25 / fan_in)``;
    - constant 1-D tensors (norm scales, biases): ``+ N(0, 0.01)``;
    - BatchNorm statistics: ``running_mean ~ N(0, 0.01)``, ``running_var ~ U(0.5, 1.5)``;
    - ``class_embed.weight`` is then scaled by ``class_logit_gain``, so that some queries pass the
      panoptic keep threshold (0.8) and the panoptic comparison is not vacuous (the class head is
      not on the decoder's recurrent path); the last layer of ``mask_embed`` (weight and bias)
      is scaled by ``mask_logit_gain`` so that masks are confident enough for the panoptic
      overlap test (a positive scale of the mask logits leaves every ``sigmoid < 0.5``
      attention-mask decision unchanged).
    Integer buffers (Swin's relative position index) and ``criterion.empty_weight`` (derived
    from the config) keep their values.

    Args:
        model (nn.Module): the official model, freshly built (its state dict defines names,
            shapes and the starting values).
        seed (int): seed of a private generator.
        class_logit_gain (float): extra scale of the class head.
        mask_logit_gain (float): extra scale of the mask logits.

    Returns:
        OrderedDict[str, np.ndarray]: official name -> float32/int array, with the
        ``_metadata`` (module versions) of ``model.state_dict()``.
    """
    g = torch.Generator().manual_seed(seed)
    model_state = model.state_dict()
    out: Dict[str, np.ndarray] = collections.OrderedDict()
    # Keep the per-module version metadata that ``state_dict()`` carries (and the released
    # model-zoo files keep): without it the official MaskFormerHead "upgrades" the names of a
    # version-1 checkpoint and moves the pixel decoder's keys to ``pixel_decoder.pixel_decoder``.
    out._metadata = copy.deepcopy(dict(getattr(model_state, "_metadata", {})))
    mask_layers = [k for k in model_state if ".predictor.mask_embed.layers." in k]
    last_mask_layer = max(int(k.split(".layers.")[1].split(".")[0]) for k in mask_layers)
    for name, t in model_state.items():
        if not t.is_floating_point() or name.startswith("criterion."):
            out[name] = t.detach().cpu().numpy().copy()
            continue
        t = t.detach().cpu().float()
        shape = tuple(t.shape)
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(shape, generator=g)
        spread = float(t.std()) if t.numel() > 1 else 0.0
        if leaf == "running_var":
            v = 0.5 + torch.rand(shape, generator=g)
        elif leaf == "running_mean":
            v = 0.1 * noise
        elif spread > 0:
            v = t + 0.2 * spread * noise
        elif t.dim() >= 2:
            fan_in = max(1, t.numel() // shape[0])
            v = t + 0.5 * noise / math.sqrt(fan_in)
        else:
            v = t + 0.1 * noise
        if "class_embed" in name and leaf == "weight":
            v = v * class_logit_gain
        if f".predictor.mask_embed.layers.{last_mask_layer}." in name:
            v = v * mask_logit_gain
        out[name] = v.to(model_state[name].dtype).numpy()
    return out


def save_official_pkl(state: Dict[str, np.ndarray], path: str, seed: int) -> None:
    """Save a state dict in the official model-zoo format (``{"model": {name: ndarray}}``)."""
    payload = {
        "model": state,
        "__author__": f"seg_methods compare_with_official_mask2former (random, seed {seed})",
        "matching_heuristics": False,
    }
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=2)


def load_official_weights(model: torch.nn.Module, path: str) -> None:
    """detectron2's DetectionCheckpointer, as the official train_net uses it."""
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(model).load(path)


def load_our_weights(model: torch.nn.Module, path: str) -> None:
    """``SegCheckpointer(strict=True)``, the path of our --eval-only and DefaultPredictor."""
    from seg_methods.utils.checkpoint import SegCheckpointer

    SegCheckpointer(model, strict=True).load(path)


def reference_state(path: str) -> Dict[str, torch.Tensor]:
    """The checkpoint's tensors as our safe loader reads them (official names)."""
    from seg_methods.utils.checkpoint import load_checkpoint_file

    state = load_checkpoint_file(path)["model"]
    out = {}
    for k, v in state.items():
        out[k[len("module.") :] if k.startswith("module.") else k] = torch.as_tensor(np.asarray(v))
    return out


# =============================================================================================
# Inputs
# =============================================================================================
def make_inputs(
    sizes: Sequence[Tuple[int, int]], num_classes: int, seed: int, with_gt: bool
) -> List[Dict[str, Any]]:
    """Random uint8 images and (optionally) panoptic-style ground truth.

    The first image asks for outputs at ``OUTPUT_SCALE_FIRST_IMAGE`` times its size (as after a
    test-time resize); the others at their own size. Ground truth: 3-6 random rectangles painted
    in order on a label map, each surviving one a segment of a random class; masks never overlap
    (as panoptic annotations) and are given at the image size as a bool tensor.

    Args:
        sizes (list[tuple]): (H, W) per image.
        num_classes (int): classes drawn in [0, num_classes).
        seed (int): seed of a private generator.
        with_gt (bool): add "instances" with gt_classes / gt_masks.

    Returns:
        list[dict]: detectron2 model inputs.
    """
    from detectron2.structures import Instances

    g = torch.Generator().manual_seed(seed)
    inputs = []
    for i, (h, w) in enumerate(sizes):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        x: Dict[str, Any] = {"image": image}
        if i == 0:
            x["height"] = int(round(h * OUTPUT_SCALE_FIRST_IMAGE))
            x["width"] = int(round(w * OUTPUT_SCALE_FIRST_IMAGE))
        if with_gt:
            label = torch.full((h, w), -1, dtype=torch.int64)
            n = int(torch.randint(3, 7, (1,), generator=g))
            for k in range(n):
                y0 = int(torch.randint(0, h - 8, (1,), generator=g))
                x0 = int(torch.randint(0, w - 8, (1,), generator=g))
                y1 = y0 + 8 + int(torch.randint(0, h - y0 - 7, (1,), generator=g))
                x1 = x0 + 8 + int(torch.randint(0, w - x0 - 7, (1,), generator=g))
                label[y0:y1, x0:x1] = k
            ids = [k for k in range(n) if bool((label == k).any())]
            classes = torch.randint(0, num_classes, (len(ids),), generator=g)
            inst = Instances((h, w))
            inst.gt_classes = classes
            inst.gt_masks = torch.stack([label == k for k in ids])
            x["instances"] = inst
        inputs.append(x)
    return inputs


# =============================================================================================
# Comparison rows
# =============================================================================================
@dataclass
class Row:
    """One compared quantity."""

    section: str
    name: str
    ok: bool
    shape: str = ""
    ref_max: Optional[float] = None
    abs_diff: Optional[float] = None
    rel_diff: Optional[float] = None
    tol: str = ""
    note: str = ""


@dataclass
class Report:
    rows: List[Row] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def failed(self) -> List[Row]:
        return [r for r in self.rows if not r.ok]


def tensor_row(section: str, name: str, ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> Row:
    """Float comparison: ok when ``max|ours - ref| <= rtol * max|ref|`` (shapes must agree)."""
    if tuple(ours.shape) != tuple(ref.shape):
        return Row(section, name, False, note=f"shape {tuple(ours.shape)} vs {tuple(ref.shape)}")
    ours = ours.detach().double()
    ref = ref.detach().double()
    ref_max = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((ours - ref).abs().max()) if ref.numel() else 0.0
    finite = bool(torch.isfinite(ours).all() and torch.isfinite(ref).all())
    rel = diff / max(ref_max, 1e-30)
    ok = finite and diff <= rtol * ref_max
    return Row(
        section,
        name,
        ok,
        shape="x".join(map(str, ours.shape)),
        ref_max=ref_max,
        abs_diff=diff,
        rel_diff=rel,
        tol=f"rel {rtol:g}",
        note="" if finite else "non-finite values",
    )


def norm_row(section: str, name: str, ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> Row:
    """Comparison in L2 norm: ok when ``||ours - ref||_2 <= rtol * ||ref||_2``.

    Used for gradients: a ReLU (or any kink) whose input lies within rounding distance of 0
    switches its derivative, which moves single gradient entries by a large fraction (one such
    pixel of 1.8M changed a GroupNorm bias gradient by 0.7% in the COCO R50 check) while the
    gradient as a whole agrees closely. The max-abs difference is still reported.
    """
    row = tensor_row(section, name, ours, ref, rtol)
    if ours.shape != ref.shape:
        return row
    diff = float((ours.double() - ref.double()).norm())
    ref_norm = float(ref.double().norm())
    rel = diff / max(ref_norm, 1e-30)
    row.ok = bool(torch.isfinite(ours).all()) and diff <= rtol * ref_norm
    row.note = f"L2: rel {rel:.2e} (max-abs rel {row.rel_diff:.2e})"
    row.rel_diff = rel
    row.tol = f"L2 rel {rtol:g}"
    return row


def exact_row(section: str, name: str, mismatches: int, total: int, note: str = "") -> Row:
    return Row(
        section,
        name,
        mismatches == 0,
        shape=str(total),
        abs_diff=float(mismatches),
        tol="exact",
        note=note or f"{mismatches} of {total} differ",
    )


# =============================================================================================
# Attention masks of the masked-attention decoder
# =============================================================================================
class OfficialMaskRecorder:
    """Context manager recording the boolean attention masks the official decoder uses.

    The official decoder returns each mask from ``forward_prediction_heads`` and unblocks its
    fully-blocked rows in place just before the cross-attention; the copies are taken on exit,
    and the same rule is applied to the last mask (which no layer uses).

    Args:
        model (nn.Module): the official MaskFormer.
    """

    def __init__(self, model: torch.nn.Module):
        self.predictor = model.sem_seg_head.predictor
        self.masks: List[torch.Tensor] = []
        self._raw: List[torch.Tensor] = []

    def __enter__(self):
        original = self.predictor.forward_prediction_heads

        def forward_prediction_heads(*args, **kwargs):
            out = original(*args, **kwargs)
            self._raw.append(out[2])
            return out

        self._raw = []
        self.predictor.forward_prediction_heads = forward_prediction_heads
        return self

    def __exit__(self, *exc):
        del self.predictor.forward_prediction_heads
        self.masks = [m.detach().clone() for m in self._raw]
        for m in self.masks:
            m[m.all(-1)] = False
        self._raw = []
        return False


class OurMaskController:
    """Context manager comparing (and optionally replacing) our decoder's attention masks.

    Each call of our ``masked_attention_mask`` is compared with the official mask of the same
    call; entries that differ ("flips") are counted together with the largest ``|mask logit|``
    (resized to the attended level) at a flipped entry. With ``force``, the official mask is
    returned instead of ours, so that a difference of rounding (our compiled deformable-attention
    kernel sums in another order than the official ``grid_sample``) cannot be turned into a
    different hard decision by the ``sigmoid < 0.5`` threshold and amplified by the next layers.

    Args:
        ref_masks (list[Tensor]): the official masks, in call order.
        force (bool): use the official masks.
    """

    def __init__(self, ref_masks: Sequence[torch.Tensor], force: bool):
        self.ref_masks = list(ref_masks)
        self.force = force
        self.calls = 0
        self.flips = 0
        self.entries = 0
        self.max_flip_logit = 0.0
        self.shape_mismatch = False

    def __enter__(self):
        import torch.nn.functional as F

        mod = importlib.import_module(
            "seg_methods.modeling.transformer_decoder.mask2former_decoder"
        )
        original = mod.masked_attention_mask

        def masked_attention_mask(mask_logits, target_size, num_heads, threshold=0.5):
            own = original(mask_logits, target_size, num_heads, threshold)
            idx = self.calls
            self.calls += 1
            if idx >= len(self.ref_masks) or self.ref_masks[idx].shape != own.shape:
                self.shape_mismatch = True
                return own
            ref = self.ref_masks[idx]
            flipped = own != ref  # (B*h, Q, H_l*W_l)
            n = int(flipped.sum())
            if n:
                logits = (
                    F.interpolate(
                        mask_logits.detach().float(),
                        size=tuple(target_size),
                        mode="bilinear",
                        align_corners=False,
                    )
                    .flatten(2)
                    .repeat_interleave(num_heads, dim=0)
                )
                self.max_flip_logit = max(self.max_flip_logit, float(logits[flipped].abs().max()))
            self.flips += n
            self.entries += own.numel()
            return ref.clone() if self.force else own

        self._mod, self._original = mod, original
        mod.masked_attention_mask = masked_attention_mask
        return self

    def __exit__(self, *exc):
        self._mod.masked_attention_mask = self._original
        return False

    def row(self, section: str, flip_margin: float) -> Row:
        """Report row: ok when the masks agree, or every flip is within ``flip_margin``."""
        ok = (
            not self.shape_mismatch
            and self.calls == len(self.ref_masks)
            and (self.flips == 0 or self.max_flip_logit <= flip_margin)
        )
        note = (
            f"{self.calls} vs {len(self.ref_masks)} masks; {self.flips} of {self.entries} entries "
            "differ"
        )
        if self.flips:
            note += f", all with abs(mask logit) <= {self.max_flip_logit:.2e}"
        if self.force:
            note += "; official masks used from here on"
        return Row(
            section,
            "attention masks (sigmoid < 0.5)",
            ok,
            shape=str(self.entries),
            abs_diff=float(self.flips),
            tol=f"flips at abs(logit) <= {flip_margin:g}",
            note=note,
        )


def informational(rows: List[Row]) -> List[Row]:
    """Mark rows as information only (they never fail the run)."""
    for r in rows:
        if not r.ok:
            r.note = (r.note + "; " if r.note else "") + f"above {r.tol}"
        r.ok = True
        r.tol = "info"
    return rows


# =============================================================================================
# Eval
# =============================================================================================
def run_eval(model: torch.nn.Module, inputs: List[Dict]) -> Dict[str, Any]:
    """Eval-mode forward with the intermediate outputs captured.

    Returns:
        dict: "backbone" (dict of features), "pixel_decoder" (mask_features, encoder output,
        multi-scale list), "head" (prediction dict), "results" (model output list).
    """
    model.eval()
    captured: Dict[str, Any] = {}
    hooks = [
        model.backbone.register_forward_hook(lambda m, i, o: captured.__setitem__("backbone", o)),
        model.sem_seg_head.register_forward_hook(lambda m, i, o: captured.__setitem__("head", o)),
    ]
    pixel_decoder = model.sem_seg_head.pixel_decoder
    original = pixel_decoder.forward_features

    def forward_features(features):
        out = original(features)
        captured["pixel_decoder"] = out
        return out

    pixel_decoder.forward_features = forward_features
    try:
        with torch.no_grad():
            captured["results"] = model([dict(x) for x in inputs])
    finally:
        del pixel_decoder.forward_features
        for h in hooks:
            h.remove()
    return captured


def compare_eval(report: Report, label: str, ours: Dict, ref: Dict, rtol: float) -> None:
    sec = f"eval [{label}]"
    for k in sorted(ref["backbone"]):
        report.add(tensor_row(sec, f"backbone.{k}", ours["backbone"][k], ref["backbone"][k], rtol))
    o_mf, o_enc, o_ms = ours["pixel_decoder"]
    r_mf, r_enc, r_ms = ref["pixel_decoder"]
    report.add(tensor_row(sec, "pixel_decoder.mask_features", o_mf, r_mf, rtol))
    report.add(tensor_row(sec, "pixel_decoder.encoder_out (1/32)", o_enc, r_enc, rtol))
    if len(o_ms) != len(r_ms):
        report.add(Row(sec, "pixel_decoder.multi_scale", False, note=f"{len(o_ms)} vs {len(r_ms)}"))
    for i, (a, b) in enumerate(zip(o_ms, r_ms)):
        report.add(tensor_row(sec, f"pixel_decoder.multi_scale[{i}]", a, b, rtol))
    oh, rh = ours["head"], ref["head"]
    report.add(tensor_row(sec, "head.pred_logits", oh["pred_logits"], rh["pred_logits"], rtol))
    report.add(tensor_row(sec, "head.pred_masks", oh["pred_masks"], rh["pred_masks"], rtol))
    o_aux, r_aux = oh.get("aux_outputs", []), rh.get("aux_outputs", [])
    report.add(
        exact_row(
            sec,
            "head.aux_outputs count",
            int(len(o_aux) != len(r_aux)),
            1,
            note=f"{len(o_aux)} vs {len(r_aux)}",
        )
    )
    skipped = 0
    for i, (a, b) in enumerate(zip(o_aux, r_aux)):
        for key in ("pred_logits", "pred_masks"):
            if key not in a:  # MODEL.MASK2FORMER.EVAL_LEVEL_SIZE_ATTENTION_MASKS: not computed
                skipped += 1
                continue
            report.add(tensor_row(sec, f"head.aux_outputs[{i}].{key}", a[key], b[key], rtol))
    if skipped:
        report.add(
            Row(
                sec,
                "head.aux_outputs pred_masks",
                True,
                tol="info",
                note=f"{skipped} not computed by ours (EVAL_LEVEL_SIZE_ATTENTION_MASKS); their "
                "attention masks are compared entry by entry",
            )
        )

    head_identical = all(
        k in a and torch.equal(a[k], b[k])
        for a, b in zip(o_aux + [oh], r_aux + [rh])
        for k in ("pred_logits", "pred_masks")
    )
    final = Report()
    compare_results(final, sec, ours["results"], ref["results"], rtol)
    if head_identical:
        report.rows.extend(final.rows)
    else:
        # Thresholds (argmax, mask > 0, score > 0.8, area ratios) turn rounding-level head
        # differences into a few different pixels; the inference code itself is checked exactly
        # by feeding the official head outputs to ours ("postprocess" rows).
        report.rows.extend(
            r if r.name.endswith(" sem_seg") else informational([r])[0] for r in final.rows
        )


def compare_results(report: Report, sec: str, ours: List[Dict], ref: List[Dict], rtol: float):
    """Final per-image outputs: sem_seg, panoptic_seg + segments_info, instances."""
    for b, (o, r) in enumerate(zip(ours, ref)):
        report.add(
            exact_row(
                sec,
                f"image{b} output keys",
                int(set(o) != set(r)),
                1,
                note=f"{sorted(o)} vs {sorted(r)}",
            )
        )
        if "sem_seg" in r and "sem_seg" in o:
            report.add(tensor_row(sec, f"image{b} sem_seg", o["sem_seg"], r["sem_seg"], rtol))
            am_o, am_r = o["sem_seg"].argmax(0), r["sem_seg"].argmax(0)
            report.add(
                exact_row(sec, f"image{b} sem_seg argmax", int((am_o != am_r).sum()), am_r.numel())
            )
        if "panoptic_seg" in r and "panoptic_seg" in o:
            (o_seg, o_info), (r_seg, r_info) = o["panoptic_seg"], r["panoptic_seg"]
            if o_seg.shape != r_seg.shape:
                report.add(Row(sec, f"image{b} panoptic_seg", False, note="shape differs"))
            else:
                report.add(
                    exact_row(
                        sec,
                        f"image{b} panoptic_seg ids",
                        int((o_seg != r_seg).sum()),
                        r_seg.numel(),
                        note=f"{len(r_info)} segments "
                        f"({sum(s['isthing'] for s in r_info)} things), "
                        f"{int((r_seg == 0).sum())} void px",
                    )
                )
            report.add(
                exact_row(
                    sec,
                    f"image{b} segments_info",
                    int(o_info != r_info),
                    1,
                    note="equal" if o_info == r_info else f"{o_info} vs {r_info}",
                )
            )
        if "instances" in r and "instances" in o:
            compare_instances(
                report, sec, f"image{b} instances", o["instances"], r["instances"], rtol
            )


def compare_postprocess(
    report: Report, model: torch.nn.Module, inputs: List[Dict], ref: Dict, rtol: float
) -> None:
    """Our inference code on the official head outputs must give the official final outputs."""
    from seg_methods.modeling.postprocessing import mask_cls_postprocess, output_sizes_from_inputs

    images = model.preprocess_images([dict(x) for x in inputs])
    with torch.no_grad():
        results = mask_cls_postprocess(
            ref["head"]["pred_logits"],
            ref["head"]["pred_masks"],
            padded_size=images.tensor.shape[-2:],
            image_sizes=images.image_sizes,
            output_sizes=output_sizes_from_inputs(inputs, images.image_sizes),
            **model.postprocess_kwargs,
        )
    compare_results(
        report, "postprocess [ours on official head outputs]", results, ref["results"], rtol
    )


def compare_instances(report: Report, sec: str, name: str, o, r, rtol: float) -> None:
    if o.image_size != r.image_size or len(o) != len(r):
        report.add(
            Row(
                sec, name, False, note=f"{len(o)} @ {o.image_size} vs {len(r)} @ " f"{r.image_size}"
            )
        )
        return
    report.add(
        exact_row(
            sec,
            f"{name}.pred_classes",
            int((o.pred_classes != r.pred_classes).sum()),
            len(r),
            note=f"{len(r)} instances",
        )
    )
    report.add(tensor_row(sec, f"{name}.scores", o.scores, r.scores, rtol))
    om, rm = o.pred_masks.bool(), r.pred_masks.bool()  # ours bool, official float 0/1
    report.add(
        exact_row(
            sec,
            f"{name}.pred_masks",
            int((om != rm).sum()),
            rm.numel(),
            note=f"{int(rm.sum())} fg px; ours {o.pred_masks.dtype}, official "
            f"{r.pred_masks.dtype}",
        )
    )
    report.add(
        tensor_row(
            sec, f"{name}.pred_boxes", o.pred_boxes.tensor.cpu(), r.pred_boxes.tensor.cpu(), rtol
        )
    )


# =============================================================================================
# Train
# =============================================================================================
@contextlib.contextmanager
def recording_torch_rand(calls: List[torch.Tensor]) -> Iterator[None]:
    """Record every ``torch.rand`` result (matcher points, PointRend importance sampling)."""
    original = torch.rand

    def rand(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out.detach().clone())
        return out

    torch.rand = rand
    try:
        yield
    finally:
        torch.rand = original


def run_train(model: torch.nn.Module, inputs: List[Dict], seed: int) -> Dict[str, Any]:
    """One training forward + backward from ``torch.manual_seed(seed)``.

    Returns:
        dict: "losses" (weighted), "rand" (list of torch.rand outputs), "rng_after" (CPU RNG
        state after the forward), "matchings" (matcher outputs in call order), "grads"
        (name -> gradient of the summed loss).
    """
    model.train()
    model.zero_grad(set_to_none=True)
    matchings: List[Any] = []
    hook = model.criterion.matcher.register_forward_hook(lambda m, i, o: matchings.append(o))
    rand_calls: List[torch.Tensor] = []
    torch.manual_seed(seed)
    try:
        with recording_torch_rand(rand_calls):
            losses = model([dict(x) for x in inputs])
    finally:
        hook.remove()
    rng_after = torch.get_rng_state()
    sum(losses.values()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    return {
        "losses": {k: v.detach() for k, v in losses.items()},
        "rand": rand_calls,
        "rng_after": rng_after,
        "matchings": matchings,
        "grads": grads,
    }


def compare_train(
    report: Report, label: str, ours: Dict, ref: Dict, rtol: float, grad_rtol: float
) -> None:
    sec = f"train [{label}]"
    o_rand, r_rand = ours["rand"], ref["rand"]
    same_rand = len(o_rand) == len(r_rand) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(o_rand, r_rand)
    )
    report.add(
        exact_row(
            sec,
            "torch.rand draws (order, shapes, values)",
            int(not same_rand),
            1,
            note=f"{len(o_rand)} vs {len(r_rand)} calls, "
            f"{sum(t.numel() for t in r_rand)} numbers; "
            + ("identical" if same_rand else "DIFFERENT"),
        )
    )
    same_state = torch.equal(ours["rng_after"], ref["rng_after"])
    report.add(
        exact_row(
            sec,
            "RNG state after forward",
            int(not same_state),
            1,
            note="equal" if same_state else "different",
        )
    )
    o_m, r_m = ours["matchings"], ref["matchings"]
    n_diff = sum(
        1
        for a, b in zip(o_m, r_m)
        for (ai, aj), (bi, bj) in zip(a, b)
        if not (torch.equal(ai.cpu(), bi.cpu()) and torch.equal(aj.cpu(), bj.cpu()))
    ) + abs(len(o_m) - len(r_m))
    report.add(
        exact_row(
            sec,
            "Hungarian matchings",
            n_diff,
            sum(len(m) for m in r_m),
            note=f"{len(r_m)} matcher calls x {len(r_m[0]) if r_m else 0} images",
        )
    )
    o_l, r_l = ours["losses"], ref["losses"]
    report.add(
        exact_row(
            sec,
            "loss keys",
            int(set(o_l) != set(r_l)),
            len(r_l),
            note=f"{len(o_l)} vs {len(r_l)} terms"
            + ("" if set(o_l) == set(r_l) else f"; {sorted(set(o_l) ^ set(r_l))}"),
        )
    )

    def loss_order(k):
        base, _, idx = k.rpartition("_")
        return (1, int(idx), base) if idx.isdigit() else (0, -1, k)

    for k in sorted(set(o_l) & set(r_l), key=loss_order):
        report.add(tensor_row(sec, k, o_l[k], r_l[k], rtol))
    report.add(tensor_row(sec, "total loss", sum(o_l.values()), sum(r_l.values()), rtol))
    o_g, r_g = ours["grads"], ref["grads"]
    report.add(
        exact_row(
            sec,
            "parameters with a gradient",
            int(set(o_g) != set(r_g)),
            len(r_g),
            note=f"{len(o_g)} vs {len(r_g)}",
        )
    )
    groups = ("backbone.", "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor.")
    for prefix in groups:
        names = sorted(n for n in set(o_g) & set(r_g) if n.startswith(prefix))
        if not names:
            continue
        a = torch.cat([o_g[n].flatten() for n in names])
        b = torch.cat([r_g[n].flatten() for n in names])
        report.add(norm_row(sec, f"grad {prefix}* ({len(names)} tensors)", a, b, grad_rtol))


# =============================================================================================
# Driver
# =============================================================================================
def check_loaded(report: Report, label: str, model: torch.nn.Module, state: Dict) -> None:
    """Every checkpoint tensor is in the model with exactly its value; no model key is left."""
    model_state = model.state_dict()
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    wrong = [
        k
        for k in state
        if k in model_state
        and not torch.equal(model_state[k].cpu(), state[k].to(model_state[k].dtype))
    ]
    note = f"{len(state)} tensors"
    if missing:
        note += f"; missing in checkpoint: {missing[:5]}"
    if unexpected:
        note += f"; not in model: {unexpected[:5]}"
    if wrong:
        note += f"; values differ: {wrong[:5]}"
    report.add(
        exact_row(
            "weights",
            f"{label} state dict == checkpoint",
            len(missing) + len(unexpected) + len(wrong),
            len(state),
            note=note,
        )
    )


def _compare_with_masks(
    report: Report,
    section: str,
    ref_masks: Sequence[torch.Tensor],
    force_masks: str,
    flip_margin: float,
    run: Callable[[], Dict],
    compare_fn: Callable[[Report, str, Dict], None],
) -> None:
    """Run ours, compare; if attention masks flipped, re-run with the official masks.

    The free-running rows become information only when a forced re-run follows (the flips
    themselves are still checked against ``flip_margin``).
    """
    label = section[section.index("[") + 1 : -1]
    kind = section[: section.index(" [")]
    force_first = force_masks == "always"
    with OurMaskController(ref_masks, force=force_first) as ctl:
        ours = run()
    sub = Report()
    suffix = ", official attention masks" if force_first else ""
    sub.add(ctl.row(f"{kind} [{label}{suffix}]", flip_margin))
    compare_fn(sub, label + suffix, ours)
    if force_first or not ctl.flips or force_masks == "never":
        report.rows.extend(sub.rows)
        return
    report.rows.extend([sub.rows[0]] + informational(sub.rows[1:]))
    with OurMaskController(ref_masks, force=True) as ctl:
        ours = run()
    report.add(ctl.row(f"{kind} [{label}, official attention masks]", flip_margin))
    compare_fn(report, f"{label}, official attention masks", ours)


def compare(
    official_root: str,
    config_file: Optional[str],
    *,
    official_config: Optional[str] = None,
    weights: Optional[str] = None,
    opts: Sequence[str] = (),
    official_opts: Sequence[str] = (),
    impls: Sequence[str] = ("op", "pytorch"),
    sizes: Sequence[Tuple[int, int]] = DEFAULT_SIZES,
    train: bool = True,
    seed: int = 0,
    rtol: float = 1e-5,
    grad_rtol: float = 1e-3,
    flip_margin: float = 1e-3,
    force_masks: str = "auto",
    allow_config_mismatch: bool = False,
    work_dir: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> Report:
    """Run the whole comparison (see the module docstring).

    Args:
        official_root (str): official checkout or package folder.
        config_file (str): our YAML (None: our Python defaults).
        official_config (str, optional): official YAML; its model keys must match ours.
        weights (str, optional): checkpoint loaded into both; None: random official-format .pkl.
        opts, official_opts (list[str]): KEY VALUE overrides of our / the official config
            (with no official config, ours are translated).
        impls (list[str]): our MODEL.MSDEFORM_PIXEL_DECODER.DEFORM_ATTN_IMPL values to check.
        sizes (list[tuple]): (H, W) of the images of the batch.
        train (bool): also compare a training step.
        seed (int): seed of weights, inputs and the training step.
        rtol, grad_rtol (float): relative tolerances (see the module docstring).
        flip_margin (float): attention-mask entries may differ only where the mask logit is
            within this of 0 (sigmoid within ~flip_margin / 4 of the 0.5 threshold).
        force_masks (str): "auto": when some attention-mask entries differ (all within
            ``flip_margin``), report the free-running rows for information and compare again with
            the official masks in our decoder; "always": only with the official masks; "never".
        allow_config_mismatch (bool): only report differences with ``official_config``.
        work_dir (str, optional): where the random checkpoint is written (default: a temp dir).
        log (callable): progress messages.

    Returns:
        Report
    """
    report = Report()
    t0 = time.perf_counter()
    cfg0 = our_cfg(config_file, opts, impls[0])
    with_swin = cfg0.MODEL.BACKBONE.NAME == "D2SwinTransformer"
    official = OfficialCode(official_root, with_swin=with_swin)
    report.notes.append(f"official code: {official.package_dir}")
    report.notes.extend(f"run-time patch: {p}" for p in official.patches)

    derived = official_cfg_from_ours(official, cfg0)
    if official_config:
        off_cfg = load_official_cfg(official, official_config, official_opts)
        diffs = config_differences(derived, off_cfg)
        for key, a, b in diffs:
            report.add(
                Row(
                    "config",
                    key,
                    allow_config_mismatch,
                    tol="equal",
                    note=f"ours -> {a!r}, official file {b!r}",
                )
            )
        if diffs and not allow_config_mismatch:
            report.notes.append(
                "stopped: the official config describes another model than ours (rows "
                "'config'); fix the config or pass --allow-config-mismatch"
            )
            return report
        if not diffs:
            report.add(
                Row(
                    "config",
                    "official YAML vs ours (model keys)",
                    True,
                    tol="equal",
                    note="all model keys equal",
                )
            )
    else:
        off_cfg = derived
        off_cfg.merge_from_list(list(official_opts))
        report.notes.append("official config: translated from ours (configs/README.md table)")

    log(f"building the official model ({time.perf_counter() - t0:.1f}s)")
    torch.manual_seed(seed)
    official_model = official.build_model(off_cfg)
    official_model.eval()

    tmp = None
    if weights is None:
        tmp = tempfile.TemporaryDirectory(dir=work_dir)
        weights = os.path.join(tmp.name, "random_official_weights.pkl")
        save_official_pkl(random_official_state(official_model, seed), weights, seed)
        report.notes.append(f"weights: random (seed {seed}), official-format .pkl")
    else:
        report.notes.append(f"weights: {weights}")
    try:
        state = reference_state(weights)
        load_official_weights(official_model, weights)
        check_loaded(report, "official", official_model, state)

        num_classes = cfg0.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        eval_inputs = make_inputs(sizes, num_classes, seed, with_gt=False)
        train_inputs = make_inputs(sizes, num_classes, seed + 1, with_gt=True)

        log(f"official eval ({time.perf_counter() - t0:.1f}s)")
        calls_before = official.fallback_calls
        with OfficialMaskRecorder(official_model) as ref_eval_masks:
            ref_eval = run_eval(official_model, eval_inputs)
        n_fallback = official.fallback_calls - calls_before
        enc_layers = off_cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS
        report.add(
            Row(
                "official",
                "deformable attention = pure-PyTorch fallback",
                n_fallback == enc_layers,
                tol=f"{enc_layers} calls",
                note=f"ms_deform_attn_core_pytorch called {n_fallback} times",
            )
        )
        ref_train = ref_train_masks = None
        if train:
            log(f"official train step ({time.perf_counter() - t0:.1f}s)")
            with OfficialMaskRecorder(official_model) as ref_train_masks:
                ref_train = run_train(official_model, train_inputs, seed)
        del official_model

        from detectron2.modeling import build_model

        for impl in impls:
            cfg = our_cfg(config_file, opts, impl)
            torch.manual_seed(seed)
            model = build_model(cfg)
            load_our_weights(model, weights)
            model.eval()
            check_loaded(report, f"ours ({impl})", model, state)
            used = {m.impl for m in model.modules() if type(m).__name__ == "MSDeformAttn"}
            report.notes.append(f"ours [{impl}]: MSDeformAttn impl = {sorted(used)}")
            if impl == impls[0]:
                compare_postprocess(report, model, eval_inputs, ref_eval, rtol)
            log(f"ours [{impl}] eval ({time.perf_counter() - t0:.1f}s)")
            _compare_with_masks(
                report,
                f"eval [{impl}]",
                ref_eval_masks.masks,
                force_masks,
                flip_margin,
                lambda m=model: run_eval(m, eval_inputs),
                lambda rep, label, ours: compare_eval(rep, label, ours, ref_eval, rtol),
            )
            if train:
                log(f"ours [{impl}] train step ({time.perf_counter() - t0:.1f}s)")
                _compare_with_masks(
                    report,
                    f"train [{impl}]",
                    ref_train_masks.masks,
                    force_masks,
                    flip_margin,
                    lambda m=model: run_train(m, train_inputs, seed),
                    lambda rep, label, ours: compare_train(
                        rep, label, ours, ref_train, rtol, grad_rtol
                    ),
                )
            del model
    finally:
        if tmp is not None:
            tmp.cleanup()
    report.notes.append(f"wall time {time.perf_counter() - t0:.1f}s")
    return report


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return ""
    if x == 0:
        return "0"
    return f"{x:.2e}" if (abs(x) < 1e-3 or abs(x) >= 1e4) else f"{x:.4g}"


def format_report(report: Report, verbose: bool = True) -> str:
    """Markdown table of the rows (only the failed ones and the summaries when not verbose)."""
    lines = [
        "| section | quantity | shape / count | max abs ref | max abs diff | rel diff | "
        "tolerance | ok | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        if not verbose and r.ok:
            continue
        lines.append(
            f"| {r.section} | {r.name} | {r.shape} | {_fmt(r.ref_max)} | {_fmt(r.abs_diff)} | "
            f"{_fmt(r.rel_diff)} | {r.tol} | {'yes' if r.ok else 'NO'} | {r.note.replace('|', '/')} |"
        )
    lines.append("")
    lines.extend(f"- {n}" for n in report.notes)
    floats = [r for r in report.rows if r.rel_diff is not None]
    if floats:
        worst = max(floats, key=lambda r: r.rel_diff)
        lines.append(
            f"- largest relative difference: {_fmt(worst.rel_diff)} ({worst.section} "
            f"{worst.name})"
        )
    lines.append(
        f"- {sum(r.ok for r in report.rows)} of {len(report.rows)} rows pass: "
        + ("PASS" if report.ok else "FAIL")
    )
    return "\n".join(lines)


def _parse_sizes(text: str) -> List[Tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        h, w = item.lower().split("x")
        sizes.append((int(h), int(w)))
    return sizes


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--official-root",
        required=True,
        help="Mask2Former checkout (holding mask2former/) or the package folder",
    )
    parser.add_argument("--config-file", default=None, help="our YAML under configs/")
    parser.add_argument(
        "--official-config", default=None, help="the official YAML (default: translated from ours)"
    )
    parser.add_argument(
        "--weights",
        default=None,
        help=".pkl/.pth loaded into both (default: random official-format .pkl)",
    )
    parser.add_argument(
        "--impl",
        default="both",
        choices=("both", "op", "pytorch", "auto"),
        help="our MODEL.MSDEFORM_PIXEL_DECODER.DEFORM_ATTN_IMPL (both = op and pytorch)",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(f"{h}x{w}" for h, w in DEFAULT_SIZES),
        help="image sizes of the batch, e.g. 200x249,128x160",
    )
    parser.add_argument("--no-train", action="store_true", help="skip the training comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--grad-rtol", type=float, default=1e-3)
    parser.add_argument(
        "--flip-margin",
        type=float,
        default=1e-3,
        help="attention-mask flips allowed only where |mask logit| <= this",
    )
    parser.add_argument(
        "--force-attention-masks",
        default="auto",
        choices=("auto", "always", "never"),
        help="use the official attention masks in our decoder (auto: re-run "
        "with them when a mask entry flipped within --flip-margin)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--python-path",
        action="append",
        default=[],
        help="extra sys.path entry (e.g. where timm is, for Swin); repeatable",
    )
    parser.add_argument(
        "--allow-config-mismatch",
        action="store_true",
        help="report differences with --official-config without failing",
    )
    parser.add_argument("--quiet", action="store_true", help="print only failed rows")
    parser.add_argument(
        "--opts",
        nargs="*",
        default=[],
        metavar="KEY VALUE",
        help="overrides of our config (translated to the official one unless "
        "--official-config is given)",
    )
    parser.add_argument(
        "--official-opts",
        nargs="*",
        default=[],
        metavar="KEY VALUE",
        help="overrides of the official config",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for p in args.python_path:
        sys.path.insert(0, p)
    torch.set_num_threads(args.threads)
    import seg_methods  # noqa: F401  (registers our components and datasets)

    impls = ("op", "pytorch") if args.impl == "both" else (args.impl,)
    report = compare(
        args.official_root,
        args.config_file,
        official_config=args.official_config,
        weights=args.weights,
        opts=args.opts,
        official_opts=args.official_opts,
        impls=impls,
        sizes=_parse_sizes(args.sizes),
        train=not args.no_train,
        seed=args.seed,
        rtol=args.rtol,
        grad_rtol=args.grad_rtol,
        flip_margin=args.flip_margin,
        force_masks=args.force_attention_masks,
        allow_config_mismatch=args.allow_config_mismatch,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print(format_report(report, verbose=not args.quiet))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
